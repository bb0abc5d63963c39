"""lmms-eval integration: the ``qwen2_vl_psa``, ``qwen2_5_vl_psa`` and ``qwen3_vl_psa`` models and the
accuracy-against-sparsity sweep.

Importing this package does not import lmms-eval; ``psa_vlm.eval.lmms_model`` does. lmms-eval finds the models
through the ``lmms_eval.models`` entry point, which points at ``lmms_eval_manifest`` (it returns the manifests
of all three, so one entry point registers every model).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["MODEL_ID", "MODEL_IDS", "LMMS_MODEL_FOR_FAMILY", "PSA_MODEL_ARGS", "lmms_eval_manifest", "manifest"]

#: The original model name (``--model qwen2_5_vl_psa``).
MODEL_ID = "qwen2_5_vl_psa"

#: lmms-eval model name -> (chat class, simple class) in ``psa_vlm.eval.lmms_model`` (``None``: none).
MODEL_IDS: Dict[str, Tuple[Optional[str], str]] = {
    "qwen2_vl_psa": (None, "Qwen2_VL_PSASimple"),  # lmms-eval has no chat qwen2_vl
    "qwen2_5_vl_psa": ("Qwen2_5_VL_PSA", "Qwen2_5_VL_PSASimple"),
    "qwen3_vl_psa": ("Qwen3_VL_PSA", "Qwen3_VL_PSASimple"),
}

#: Checkpoint ``model_type`` -> the lmms-eval model that serves it.
LMMS_MODEL_FOR_FAMILY = {
    "qwen2_vl": "qwen2_vl_psa",
    "qwen2_5_vl": "qwen2_5_vl_psa",
    "qwen3_vl": "qwen3_vl_psa",
    "qwen3_vl_moe": "qwen3_vl_psa",
}

#: ``--model_args`` keys the ``*_psa`` models consume (everything else goes to lmms-eval's model of the family).
PSA_MODEL_ARGS = (
    "preset",
    "thresholds",
    "quotas",
    "min_seq_len",
    "backend",
    "block_size",
    "block_q",
    "block_k",
    "stride",
    "estimate_heads",
    "text_tail",
    "sim_thresholds",
    "pool_factors",
    "psa_layers",
    "psa_config",
)


def manifest(model_id: str) -> Any:
    """The ``lmms_eval.models.registry_v2.ModelManifest`` of one model in ``MODEL_IDS``.

    Raises:
        ValueError: Unknown ``model_id``.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    if model_id not in MODEL_IDS:
        raise ValueError(f"unknown psa_vlm lmms-eval model {model_id!r}; choose one of {', '.join(MODEL_IDS)}")
    chat, simple = MODEL_IDS[model_id]
    return ModelManifest(
        model_id=model_id,
        chat_class_path=None if chat is None else f"psa_vlm.eval.lmms_model.{chat}",
        simple_class_path=f"psa_vlm.eval.lmms_model.{simple}",
    )


def lmms_eval_manifest() -> Tuple[Any, ...]:
    """The ``lmms_eval.models`` entry point: the ``ModelManifest`` of every model in ``MODEL_IDS``.

    lmms-eval accepts an iterable of manifests from one entry point (``ModelRegistryV2``); each has the chat
    class (default) where lmms-eval has one and the simple class (``--force_simple``).
    """
    return tuple(manifest(m) for m in MODEL_IDS)
