"""Model patches: Pyramid Sparse Attention inside Hugging Face transformers models.

Importing this package imports transformers and registers PSA's attention functions (``"psa"``,
``"psa_eager"``) in ``AttentionInterface`` / ``AttentionMaskInterface``, so that a model can also be loaded with
``attn_implementation={"text_config": "psa", "vision_config": "sdpa"}``. ``import psa_vlm`` alone does not
import this package (its patch functions load it on first use).

Example:
    >>> import psa_vlm
    >>> model = psa_vlm.patch_qwen25vl(model, "paper")  # doctest: +SKIP
    >>> psa_vlm.psa_stats(model)["density"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging

from .qwen2_5_vl import (
    MIN_TRANSFORMERS,
    PSA_ATTENTION_NAME,
    is_patched,
    observe,
    patch_qwen25vl,
    psa_stats,
    register_attention,
    unpatch_qwen25vl,
)

__all__ = [
    "patch_qwen25vl",
    "unpatch_qwen25vl",
    "psa_stats",
    "register_attention",
    "is_patched",
    "observe",
    "PSA_ATTENTION_NAME",
    "MIN_TRANSFORMERS",
]

try:
    register_attention()
except RuntimeError as _exc:  # too old a transformers: patch_qwen25vl raises the same message when called
    logging.getLogger(__name__).debug("PSA attention not registered: %s", _exc)
