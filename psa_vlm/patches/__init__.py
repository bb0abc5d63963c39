"""Model patches: Pyramid Sparse Attention inside the text attention of Hugging Face transformers models.

``psa_vlm.patch(model, config)`` recognises Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (the
conditional-generation class, the base model and the text model of each) loaded with any text attention
(``sdpa``, ``eager``, ``flash_attention_2/3/4``, ``kernels`` hub names); ``psa_vlm.unpatch(model)`` undoes it.
``patch_qwen2vl`` / ``patch_qwen25vl`` / ``patch_qwen3vl`` are the same restricted to one family. One module per
family declares its classes; the machinery is in ``core``.

Importing this package imports transformers and registers PSA's attention functions ``"psa"`` (sdpa fallback)
and ``"psa_eager"`` in ``AttentionInterface`` / ``AttentionMaskInterface``. ``import psa_vlm`` alone does not
import this package (its patch functions load it on first use).

Example:
    >>> import psa_vlm
    >>> model = psa_vlm.patch(model, "paper")  # doctest: +SKIP
    >>> psa_vlm.psa_stats(model)["density"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Union

from ..config import PSAConfig
from .core import (
    MIN_TRANSFORMERS,
    PSA_ATTENTION_NAME,
    Family,
    is_patched,
    observe,
    patch_model,
    psa_stats,
    register_attention,
    token_types_from_ids,
    unpatch_model,
)
from .qwen2_5_vl import QWEN2_5_VL, patch_qwen25vl, unpatch_qwen25vl
from .qwen2_vl import QWEN2_VL, patch_qwen2vl, unpatch_qwen2vl
from .qwen3_vl import QWEN3_VL, QWEN3_VL_MOE, patch_qwen3vl, unpatch_qwen3vl

__all__ = [
    "patch",
    "unpatch",
    "patch_qwen2vl",
    "unpatch_qwen2vl",
    "patch_qwen25vl",
    "unpatch_qwen25vl",
    "patch_qwen3vl",
    "unpatch_qwen3vl",
    "psa_stats",
    "observe",
    "register_attention",
    "is_patched",
    "token_types_from_ids",
    "FAMILIES",
    "Family",
    "PSA_ATTENTION_NAME",
    "MIN_TRANSFORMERS",
]

#: Every family ``patch`` recognises, in lookup order.
FAMILIES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE)


def patch(
    model: Any,
    config: Union[PSAConfig, str, None] = None,
    *,
    layers: Optional[Iterable[int]] = None,
    backend: str = "auto",
) -> Any:
    """Make a Qwen VL model use Pyramid Sparse Attention for long prefills of its language model.

    The text config's attention implementation becomes PSA's (``"psa"`` for sdpa, ``"psa_eager"`` for eager,
    ``"psa_<original>"`` otherwise, e.g. ``"psa_flash_attention_2"``): prefills with at least
    ``config.min_seq_len`` query tokens whose mask is causal + key padding run PSA; everything else (decode,
    short inputs, packed sequences, custom masks, ``output_attentions=True``, ...) runs the original function
    with its own arguments. The vision tower is untouched. Patching again with the same arguments changes
    nothing; with other arguments the settings are updated in place. One INFO line says what changed.

    Args:
        model: ``Qwen2VL*``, ``Qwen2_5_VL*``, ``Qwen3VL*`` or ``Qwen3VLMoe*`` ``ForConditionalGeneration``,
            ``Model`` or ``TextModel``.
        config: ``PSAConfig``, preset name or path of a JSON config (``PSAConfig.load``; default: the ``"paper"``
            preset). Its ``layer_overrides`` apply per decoder layer (``config.for_layer(i)``).
        layers: Decoder layer indices that use PSA (default: all); the others keep the original attention.
        backend: ``"auto"`` (Triton on CUDA, the PyTorch reference on the CPU), ``"triton"`` or ``"reference"``;
            checked against the config and the model's head_dim here (``check_config_for_backend``).

    Returns:
        The same ``model``, patched in place.

    Raises:
        TypeError: ``model`` is not a supported model (the message lists the supported classes), or ``config``
            has the wrong type.
        ValueError: Bad ``layers`` / ``backend``, or a config the backend cannot run.
        RuntimeError: Unsupported transformers version.
    """
    return patch_model(model, config, layers, backend, FAMILIES, "psa_vlm.patch")


def unpatch(model: Any) -> Any:
    """Undo ``patch``: the original text attention, no hook, no PSA attributes (no-op if not patched).

    Args:
        model: A model ``patch`` accepts.

    Returns:
        The same ``model``.
    """
    return unpatch_model(model, FAMILIES, "psa_vlm.unpatch")


try:
    register_attention()
except RuntimeError as _exc:  # too old a transformers: patch raises the same message when called
    logging.getLogger(__name__).debug("PSA attention not registered: %s", _exc)
