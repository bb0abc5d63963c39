"""Pyramid Sparse Attention for the language model of Qwen2.5-VL (3B, 7B, 32B, 72B).

``patch_qwen25vl(model)`` is ``psa_vlm.patch`` restricted to Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration``,
``Qwen2_5_VLModel`` or ``Qwen2_5_VLTextModel``. The machinery (attention function, pre-hook, state, fallbacks)
is in ``psa_vlm.patches.core``; token types follow the prompt's visual spans (``core.token_types_from_ids``):
``<|vision_start|>`` ... ``<|vision_end|>`` with the ``<|video_pad|>`` / ``<|image_pad|>`` placeholders inside.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from ..config import PSAConfig
from .core import Family, patch_model, unpatch_model

__all__ = ["QWEN2_5_VL", "patch_qwen25vl", "unpatch_qwen25vl"]

QWEN2_5_VL = Family(
    name="Qwen2.5-VL",
    modeling="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    conditional="Qwen2_5_VLForConditionalGeneration",
    base="Qwen2_5_VLModel",
    text="Qwen2_5_VLTextModel",
    attention="Qwen2_5_VLAttention",
)


def patch_qwen25vl(
    model: Any,
    config: Union[PSAConfig, str, None] = None,
    *,
    layers: Optional[Iterable[int]] = None,
    backend: str = "auto",
) -> Any:
    """``psa_vlm.patch`` for Qwen2.5-VL only (a ``TypeError`` names the Qwen2.5-VL classes otherwise).

    Example:
        >>> model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
        >>> psa_vlm.patch_qwen25vl(model, "paper")  # doctest: +SKIP
    """
    return patch_model(model, config, layers, backend, (QWEN2_5_VL,), "patch_qwen25vl")


def unpatch_qwen25vl(model: Any) -> Any:
    """``psa_vlm.unpatch`` for Qwen2.5-VL only."""
    return unpatch_model(model, (QWEN2_5_VL,), "unpatch_qwen25vl")
