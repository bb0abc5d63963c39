"""lmms-eval model ``qwen2_5_vl_psa``: lmms-eval's own Qwen2.5-VL models with PSA patched in.

``Qwen2_5_VL_PSA`` subclasses lmms-eval's chat model ``qwen2_5_vl`` (``Qwen2_5_VL_PSASimple`` its simple
model, used with ``--force_simple``), so video loading, frame sampling, prompting and generation are exactly
the dense baseline's. The checkpoint is loaded with dense attention (``sdpa``, one of the values lmms-eval's
class accepts) and then patched with ``psa_vlm.patch_qwen25vl``. ``preset=dense`` leaves the model unpatched:
it *is* lmms-eval's ``qwen2_5_vl`` (the in-harness control), with the same per-sample logging.

PSA options in ``--model_args`` (lists use ``/`` because ``,`` separates arguments)::

    preset=paper            dense, paper, binary, quota-0.1/0.2/0.3, binary-0.1/0.2/0.3
    thresholds=0.7/0.8/0.9/0.9   tau for factors 1/2/4/8 (threshold mode)
    quotas=0.1/0.1/0.1/0.2       fractions for factors 1/2/4/8 (quota mode)
    min_seq_len=4096  block_size=128  block_q=..  block_k=..  stride=8  text_tail=512
    sim_thresholds=0.75/0.7/0.7 | none      pool_factors=2/4/8 | none
    backend=auto | triton | reference       psa_layers=0/1/2 (default: all layers)
    psa_config=path.json    a JSON config (PSAConfig.save, psa-vlm calibrate; per-layer overrides included)
                            used instead of a preset; the other PSA options above then override its fields

Besides lmms-eval's ``qwen2_5_vl`` arguments it accepts ``dtype=float32`` (or ``float16``): lmms-eval loads the
weights in bf16, which is very slow on CPUs; the cast happens after loading (default: keep bf16).

Per sample, the logged output (``--log_samples``) records under ``token_counts``: ``input_tokens`` (prompt
tokens), ``output_tokens``, ``psa_preset``, ``psa_density`` (FLOP-equivalent density of the prefill, mean
over layers; 1.0 when dense attention ran), ``psa_engaged``, ``prefill_s`` (language-model prefill, wall
time, CUDA-synchronised) and ``vision_s`` (the vision encoder). The same records are kept on
the instance as ``psa_records``. Requests are generated ``batch_size`` at a time (use ``batch_size=1``, the
default, for exact per-sample numbers).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _LmmsQwen25VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _LmmsQwen25VLSimple

from ..config import PSAConfig
from ..inference import PrefillTimer, psa_config_from_options, summarize_psa_stats
from . import PSA_MODEL_ARGS

__all__ = ["Qwen2_5_VL_PSA", "Qwen2_5_VL_PSASimple", "PSATokenCounts", "PSA_MODEL_ARGS"]

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "triton", "reference")


@dataclass
class PSATokenCounts(TokenCounts):
    """lmms-eval's per-request ``TokenCounts`` plus PSA's per-sample measurements."""

    psa_preset: Optional[str] = None
    psa_density: Optional[float] = None
    psa_engaged: Optional[bool] = None
    prefill_s: Optional[float] = None
    vision_s: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = super().to_dict()
        for name in ("psa_preset", "psa_density", "psa_engaged", "prefill_s", "vision_s"):
            val = getattr(self, name)
            if val is not None:
                d[name] = val
        return d


def _parse_layers(value: Any) -> Optional[List[int]]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all", "none")):
        return None
    if isinstance(value, int):
        return [value]
    try:
        return [int(x) for x in str(value).replace(",", "/").split("/") if x.strip()]
    except ValueError:
        raise ValueError(f"psa_layers must be layer indices separated by '/', got {value!r}") from None


class _PSAMixin:
    """PSA patching and per-sample measurement on top of an lmms-eval Qwen2.5-VL class."""

    psa_preset: str
    psa_config: PSAConfig
    psa_records: List[Dict[str, Any]]

    @staticmethod
    def _split_psa_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
        return {k: kwargs.pop(k) for k in PSA_MODEL_ARGS if k in kwargs}

    #: If true, ``clean()`` (called by lmms-eval at the end of every evaluation) keeps the model loaded, so that
    #: one instance can serve several ``simple_evaluate`` calls (the sweep sets it).
    keep_model_loaded: bool = False

    def clean(self) -> None:
        """lmms-eval's end-of-evaluation cleanup (drops the model) unless ``keep_model_loaded``."""
        if self.keep_model_loaded:
            import gc

            gc.collect()
            return
        self._psa_timer.detach()
        super().clean()  # type: ignore[misc]

    def _psa_setup(self, options: Dict[str, Any]) -> None:
        self.psa_records = []
        self._psa_timer = PrefillTimer(self.model).attach()
        self.set_psa(**options)

    def set_psa(self, preset: Optional[str] = None, psa_config: Optional[str] = None, **options: Any) -> PSAConfig:
        """(Re)configure PSA in place: ``preset`` (default ``paper``) or a JSON config ``psa_config``, plus the
        ``--model_args`` overrides (see module docstring).

        ``preset="dense"`` (with no overrides) removes the patch: unpatched lmms-eval ``qwen2_5_vl``.

        Returns:
            The active ``PSAConfig`` (the ``dense`` preset's for the unpatched control).
        """
        from ..patches import patch_qwen25vl, unpatch_qwen25vl

        options = dict(options)
        backend = str(options.pop("backend", "auto"))
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        layers = _parse_layers(options.pop("psa_layers", None))
        unknown = set(options) - set(PSA_MODEL_ARGS)
        if unknown:
            raise ValueError(f"unknown PSA options {sorted(unknown)}; known: {', '.join(PSA_MODEL_ARGS)}")
        if psa_config is not None:
            if preset is not None:
                raise ValueError(f"give preset or psa_config, not both (got preset={preset!r}, psa_config={psa_config!r})")
            from pathlib import Path

            config = psa_config_from_options(base=PSAConfig.load(psa_config), **options)
            preset = Path(str(psa_config)).stem
        else:
            preset = "paper" if preset is None else preset
            config = psa_config_from_options(preset, **options)
        self.psa_preset = str(preset)
        self.psa_config = config
        self.psa_backend = backend
        if preset == "dense" and psa_config is None:
            unpatch_qwen25vl(self.model)
            logger.info("qwen2_5_vl_psa: preset dense -> unpatched dense attention (the control)")
        else:
            patch_qwen25vl(self.model, config, layers=layers, backend=backend)
        return config

    def _measure(self) -> Dict[str, Any]:
        from ..patches import is_patched, psa_stats

        timer = self._psa_timer
        if is_patched(self.model):
            n_layers = getattr(self.model.config.get_text_config(), "num_hidden_layers", None)
            stats = summarize_psa_stats(psa_stats(self.model), n_layers)
            density = stats["density"] if stats["engaged"] else 1.0
            engaged = stats["engaged"]
        else:
            density, engaged = 1.0, False
        return {
            "psa_preset": self.psa_preset,
            "psa_density": density,
            "psa_engaged": engaged,
            "prefill_s": timer.prefill_s,
            "vision_s": timer.vision_s,
            "input_tokens": timer.prompt_tokens,
        }

    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        """lmms-eval's generation, ``batch_size`` requests at a time, each result carrying PSA measurements."""
        step = max(1, int(self.batch_size))
        out: List[GenerationResult] = []
        for i in range(0, len(requests), step):
            chunk = requests[i : i + step]
            self._psa_timer.reset()
            results = super().generate_until(chunk)  # type: ignore[misc]
            m = self._measure()
            for req, res in zip(chunk, results):
                text = res.text if isinstance(res, GenerationResult) else res
                tc = res.token_counts if isinstance(res, GenerationResult) else None
                counts = PSATokenCounts(
                    input_tokens=m["input_tokens"],
                    output_tokens=tc.output_tokens if tc is not None else None,
                    reasoning_tokens=tc.reasoning_tokens if tc is not None else None,
                    psa_preset=m["psa_preset"],
                    psa_density=m["psa_density"],
                    psa_engaged=m["psa_engaged"],
                    prefill_s=m["prefill_s"],
                    vision_s=m["vision_s"],
                )
                out.append(GenerationResult(text=text, token_counts=counts))
                self.psa_records.append(
                    {"task": req.task_name, "doc_id": req.doc_id, **{k: v for k, v in m.items()}}
                )
            dens = m["psa_density"]
            logger.debug(
                "qwen2_5_vl_psa %s: %s tokens, density %s, prefill %s s", self.psa_preset, m["input_tokens"],
                "n/a" if dens is None else f"{dens:.3f}",
                "n/a" if m["prefill_s"] is None or math.isnan(m["prefill_s"]) else f"{m['prefill_s']:.4f}",
            )
        return out


_DTYPES = ("bfloat16", "float16", "float32")


def _init(self: Any, base: type, pretrained: str, attn_implementation: Optional[str], kwargs: Dict[str, Any]) -> None:
    psa_options = _PSAMixin._split_psa_kwargs(kwargs)
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    # validate before the (slow) model load
    probe = dict(psa_options)
    probe.pop("backend", None)
    _parse_layers(probe.pop("psa_layers", None))
    json_path = probe.pop("psa_config", None)
    if json_path is not None:
        if "preset" in probe:
            raise ValueError(f"give preset or psa_config, not both (got preset={probe['preset']!r})")
        psa_config_from_options(base=PSAConfig.load(json_path), **probe)
    else:
        psa_config_from_options(str(probe.pop("preset", "paper")), **probe)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"qwen2_5_vl_psa loads the checkpoint with dense 'sdpa' or 'eager' attention and then patches PSA in; "
            f"got attn_implementation={attn_implementation!r}"
        )
    base.__init__(self, pretrained=pretrained, attn_implementation=attn_implementation, **kwargs)
    if dtype is not None and dtype != "bfloat16":  # lmms-eval loads bf16; float32 is much faster on CPUs
        import torch

        self._model.to(getattr(torch, dtype))
        logger.info("qwen2_5_vl_psa: weights cast to %s", dtype)
    self._psa_setup(psa_options)


class Qwen2_5_VL_PSA(_PSAMixin, _LmmsQwen25VLChat):
    """lmms-eval chat model ``qwen2_5_vl_psa`` (see the module docstring for the options).

    Args:
        pretrained: Local checkpoint directory (or hub id where the hub is reachable).
        attn_implementation: Dense attention the checkpoint is loaded with before patching (``sdpa``).
        **kwargs: PSA options (``PSA_MODEL_ARGS``) and lmms-eval ``qwen2_5_vl`` arguments (``device``,
            ``device_map``, ``max_pixels``, ``min_pixels``, ``max_num_frames``, ``fps``, ``batch_size``, ...).
    """

    is_simple = False

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", attn_implementation: str = "sdpa",
                 **kwargs: Any) -> None:
        _init(self, _LmmsQwen25VLChat, pretrained, attn_implementation, kwargs)


class Qwen2_5_VL_PSASimple(_PSAMixin, _LmmsQwen25VLSimple):
    """lmms-eval simple model ``qwen2_5_vl_psa`` (``--force_simple``); same options as ``Qwen2_5_VL_PSA``."""

    is_simple = True

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", attn_implementation: str = "sdpa",
                 **kwargs: Any) -> None:
        _init(self, _LmmsQwen25VLSimple, pretrained, attn_implementation, kwargs)
