"""Tiny random Qwen VL models of every family the patch supports, with real processors, loaded offline.

Used by the session fixtures in ``conftest.py`` (imported by name: pytest puts this directory on sys.path).
The models are the library's tiny checkpoints (``psa_vlm.models.tiny.build_tiny_checkpoint``, per-family parts
in ``psa_vlm.models.tiny_family``), built at most once per family per test run by the ``tiny_family_checkpoint``
fixture of ``tests/conftest.py`` and shared with every other test that needs a family, then loaded here in
float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from psa_vlm.models.tiny_family import FAMILIES  # noqa: E402,F401  (re-exported for the tests)
# frames of the test clip: 12 frames of 224 x 112 at 4 fps (6 temporal patches)
FRAMES, WIDTH, HEIGHT, FPS = 12, 224, 112, 4.0


@dataclass
class Tiny:
    """One family's tiny model and processor."""

    family: str
    model: Any
    processor: Any
    patch_size: int  # vision patch size (14 for Qwen2/2.5-VL, 16 for Qwen3-VL)


def load_tiny(family: str, checkpoint) -> Tiny:
    """One family's tiny checkpoint (``psa_vlm.models.tiny.build_tiny_checkpoint``) as model + processor."""
    import transformers as tf

    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration, "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration}
    model = cls[family].from_pretrained(checkpoint, dtype=torch.float32).eval()
    patch = model.config.vision_config.patch_size
    return Tiny(family, model, tf.AutoProcessor.from_pretrained(checkpoint), patch)
