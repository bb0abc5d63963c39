"""lmms-eval integration: the ``qwen2_5_vl_psa`` model and the accuracy-against-sparsity sweep.

Importing this package does not import lmms-eval; ``psa_vlm.eval.lmms_model`` does. lmms-eval finds the model
through the ``lmms_eval.models`` entry point, which points at ``lmms_eval_manifest``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_ID", "PSA_MODEL_ARGS", "lmms_eval_manifest"]

#: The model name to pass to lmms-eval (``--model qwen2_5_vl_psa``).
MODEL_ID = "qwen2_5_vl_psa"

#: ``--model_args`` keys ``qwen2_5_vl_psa`` consumes (everything else goes to lmms-eval's ``qwen2_5_vl``).
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
    "text_tail",
    "sim_thresholds",
    "pool_factors",
    "psa_layers",
    "psa_config",
)


def lmms_eval_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: a ``ModelManifest`` for ``qwen2_5_vl_psa``.

    Returns:
        ``lmms_eval.models.registry_v2.ModelManifest`` with the chat class (default) and the simple class
        (``--force_simple``).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        chat_class_path="psa_vlm.eval.lmms_model.Qwen2_5_VL_PSA",
        simple_class_path="psa_vlm.eval.lmms_model.Qwen2_5_VL_PSASimple",
    )
