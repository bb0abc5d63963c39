"""Pyramid Sparse Attention for the language model of Qwen2-VL (2B, 7B, 72B).

Qwen2-VL's text attention is Qwen2.5-VL's under other class names (same mRoPE, same placeholder and span ids),
so the family only names its classes; the machinery is ``psa_vlm.patches.core``.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from ..config import PSAConfig
from .core import Family, patch_model, unpatch_model

__all__ = ["QWEN2_VL", "patch_qwen2vl", "unpatch_qwen2vl"]

QWEN2_VL = Family(
    name="Qwen2-VL",
    modeling="transformers.models.qwen2_vl.modeling_qwen2_vl",
    conditional="Qwen2VLForConditionalGeneration",
    base="Qwen2VLModel",
    text="Qwen2VLTextModel",
    attention="Qwen2VLAttention",
)


def patch_qwen2vl(
    model: Any,
    config: Union[PSAConfig, str, None] = None,
    *,
    layers: Optional[Iterable[int]] = None,
    backend: str = "auto",
) -> Any:
    """``psa_vlm.patch`` for Qwen2-VL only (a ``TypeError`` names the Qwen2-VL classes otherwise)."""
    return patch_model(model, config, layers, backend, (QWEN2_VL,), "patch_qwen2vl")


def unpatch_qwen2vl(model: Any) -> Any:
    """``psa_vlm.unpatch`` for Qwen2-VL only."""
    return unpatch_model(model, (QWEN2_VL,), "unpatch_qwen2vl")
