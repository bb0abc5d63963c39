"""The trained tiny Qwen2.5-VL shipped with the package (``psa_vlm/data/tiny_trained``).

Unlike ``psa_vlm.models.tiny`` (random weights, built on demand), this checkpoint was trained by
``psa_vlm.models.train_tiny`` on the synthetic video QA of ``psa_vlm.video.synth`` and answers its
multiple-choice questions well above chance under dense attention. It loads like any checkpoint::

    from psa_vlm.models.trained import trained_tiny_checkpoint
    from psa_vlm.inference import load_qwen25vl
    model, processor = load_qwen25vl(trained_tiny_checkpoint())

``psa_vlm/data/tiny_trained/TRAINING.md`` records how it was trained and its accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

__all__ = ["TRAINED_DIR_NAME", "trained_tiny_checkpoint", "trained_tiny_info"]

#: Folder of the shipped checkpoint inside ``psa_vlm/data``.
TRAINED_DIR_NAME = "tiny_trained"

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


def trained_tiny_checkpoint() -> Path:
    """Directory of the shipped trained tiny checkpoint (model, processor, ``training.json``).

    Returns:
        The absolute path of ``psa_vlm/data/tiny_trained``.

    Raises:
        FileNotFoundError: The directory or one of its files is missing (for example an installation
            without package data, or a checkout where the weights were not committed).
    """
    path = (Path(__file__).resolve().parent.parent / "data" / TRAINED_DIR_NAME)
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the trained tiny checkpoint is missing from {path} (no {', '.join(missing)}); reinstall psa_vlm "
            "with its package data, or train one with `python3 -m psa_vlm.models.train_tiny --out DIR` and "
            "pass DIR as the model"
        )
    return path


def trained_tiny_info() -> Dict[str, Any]:
    """The shipped checkpoint's ``training.json`` (settings, steps, loss curve, held-out accuracy)."""
    return json.loads((trained_tiny_checkpoint() / "training.json").read_text())
