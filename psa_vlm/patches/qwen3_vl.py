"""Pyramid Sparse Attention for the language model of Qwen3-VL, dense (2B-32B) and MoE (30B-A3B, 235B-A22B).

Token types need the span rule here: Qwen3-VL's processor writes, for every temporal patch of a video, a text
timestamp ``<t seconds>`` followed by ``<|vision_start|>`` + ``<|video_pad|>`` x n + ``<|vision_end|>``, all inside
the chat template's own ``<|vision_start|>...<|vision_end|>`` (``Qwen3VLProcessor.replace_video_token``).
Counting every non-placeholder token as text would put "text" in almost every KV block and force it to full
resolution; ``core.token_types_from_ids`` counts everything inside the outer span as visual instead. The
DeepStack visual features are added to the hidden states between layers and do not touch attention.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from ..config import PSAConfig
from .core import Family, patch_model, unpatch_model

__all__ = ["QWEN3_VL", "QWEN3_VL_MOE", "patch_qwen3vl", "unpatch_qwen3vl"]

QWEN3_VL = Family(
    name="Qwen3-VL",
    modeling="transformers.models.qwen3_vl.modeling_qwen3_vl",
    conditional="Qwen3VLForConditionalGeneration",
    base="Qwen3VLModel",
    text="Qwen3VLTextModel",
    attention="Qwen3VLTextAttention",
)

QWEN3_VL_MOE = Family(
    name="Qwen3-VL-MoE",
    modeling="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
    conditional="Qwen3VLMoeForConditionalGeneration",
    base="Qwen3VLMoeModel",
    text="Qwen3VLMoeTextModel",
    attention="Qwen3VLMoeTextAttention",
)


def patch_qwen3vl(
    model: Any,
    config: Union[PSAConfig, str, None] = None,
    *,
    layers: Optional[Iterable[int]] = None,
    backend: str = "auto",
) -> Any:
    """``psa_vlm.patch`` for Qwen3-VL and Qwen3-VL-MoE only (a ``TypeError`` names their classes otherwise)."""
    return patch_model(model, config, layers, backend, (QWEN3_VL, QWEN3_VL_MOE), "patch_qwen3vl")


def unpatch_qwen3vl(model: Any) -> Any:
    """``psa_vlm.unpatch`` for Qwen3-VL and Qwen3-VL-MoE only."""
    return unpatch_model(model, (QWEN3_VL, QWEN3_VL_MOE), "unpatch_qwen3vl")
