"""lmms-eval models ``qwen2_vl_psa``, ``qwen2_5_vl_psa`` and ``qwen3_vl_psa``: lmms-eval's own models with PSA.

Each class subclasses lmms-eval's model of its family, so video loading, frame sampling, prompting and
generation are exactly the dense baseline's:

=================== ============================================= ============================================
lmms-eval model     chat class (default) / simple (``--force_simple``) checkpoints (``model_type``)
=================== ============================================= ============================================
``qwen2_vl_psa``    - / ``Qwen2_VL_PSASimple`` (lmms-eval has no   ``qwen2_vl``
                    chat ``qwen2_vl``)
``qwen2_5_vl_psa``  ``Qwen2_5_VL_PSA`` / ``Qwen2_5_VL_PSASimple``  ``qwen2_5_vl``
``qwen3_vl_psa``    ``Qwen3_VL_PSA`` / ``Qwen3_VL_PSASimple``      ``qwen3_vl``, ``qwen3_vl_moe``
=================== ============================================= ============================================

The checkpoint is loaded with ``attn_implementation`` (default ``sdpa``; ``eager``, ``flash_attention_2``
(the model cards' choice for video) and any other name transformers knows) and then patched with
``psa_vlm.patch``, which runs PSA for long prefills and the loaded attention for everything else.
``preset=dense`` leaves the model unpatched: it *is* lmms-eval's model of that family (the in-harness
control), with the same per-sample logging. Two fixes over lmms-eval's classes, both about loading:
lmms-eval's ``qwen2_vl`` takes only ``use_flash_attention_2``, so other attention names are set after loading
(``set_attn_implementation``); lmms-eval's ``qwen3_vl`` picks the MoE class from an ``A<n>B`` in the
checkpoint *path*, so ``qwen3_vl_psa`` picks it from the checkpoint's ``model_type`` instead (a renamed MoE
directory would otherwise load as a dense model with random MLPs).

PSA options in ``--model_args`` (lists use ``/`` because ``,`` separates arguments)::

    preset=paper            dense, paper, binary, quota-0.1/0.2/0.3, binary-0.1/0.2/0.3
    thresholds=0.7/0.8/0.9/0.9   tau for factors 1/2/4/8 (threshold mode)
    quotas=0.1/0.1/0.1/0.2       fractions for factors 1/2/4/8 (quota mode)
    min_seq_len=4096  block_size=128  block_q=..  block_k=..  stride=8  text_tail=512
    estimate_heads=query | kv    kv: one estimate per KV head from its query group's mean (GQA-shared)
    sim_thresholds=0.75/0.7/0.7 | none      pool_factors=2/4/8 | none
    backend=auto | fa4 | triton | reference  psa_layers=0/1/2 (default: all layers)
    psa_config=path.json    a JSON config (PSAConfig.save, psa-vlm calibrate; per-layer overrides included)
                            used instead of a preset; the other PSA options above then override its fields

The PSA config is checked against the backend that will run it in the constructor, before the model loads
(``psa_vlm.api.check_config_for_backend``: e.g. ``block_size=24`` on a GPU raises ``ValueError`` there, not
inside ``generate``), and again with the model's head dimension once it is loaded. A prompt longer than the
model's ``max_position_embeddings`` raises ``PromptTooLongError`` before its prefill (lower
``max_num_frames``, ``fps`` or ``max_pixels``). Videos decord cannot read are read with PyAV
(``psa_vlm.video.decode``).

Besides the lmms-eval model's own arguments each accepts ``dtype=float32`` (or ``float16``): lmms-eval loads the
weights in bf16 (``qwen2_vl``: the checkpoint's dtype), which is very slow on CPUs; the cast happens after
loading (default: keep what lmms-eval loaded).

Per sample, the logged output (``--log_samples``) records under ``token_counts``: ``input_tokens`` (prompt
tokens), ``output_tokens``, ``psa_preset``, ``psa_density`` (FLOP-equivalent density of the prefill, mean
over layers; 1.0 when dense attention ran), ``psa_engaged``, ``prefill_s`` (language-model prefill, wall
time, CUDA-synchronised) and ``vision_s`` (the vision encoder). The same records are kept on
the instance as ``psa_records``. Requests are generated ``batch_size`` at a time (use ``batch_size=1``, the
default, for exact per-sample numbers).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import lmms_eval.models.simple.qwen3_vl as _lmms_qwen3_vl_module
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _LmmsQwen25VLChat
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as _LmmsQwen3VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _LmmsQwen25VLSimple
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as _LmmsQwen2VLSimple
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as _LmmsQwen3VLSimple

from ..api import BACKENDS, check_config_for_backend
from ..config import PSAConfig
from ..inference import (
    CheckpointError,
    PrefillTimer,
    check_prompt_length,
    checkpoint_family,
    psa_config_from_options,
    summarize_psa_stats,
)
from ..video.decode import pyav_fallback
from . import LMMS_MODEL_FOR_FAMILY, PSA_MODEL_ARGS

__all__ = [
    "Qwen2_VL_PSASimple",
    "Qwen2_5_VL_PSA",
    "Qwen2_5_VL_PSASimple",
    "Qwen3_VL_PSA",
    "Qwen3_VL_PSASimple",
    "PSATokenCounts",
    "PSA_MODEL_ARGS",
]

logger = logging.getLogger(__name__)

_BACKENDS = BACKENDS


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
    """PSA patching and per-sample measurement on top of an lmms-eval Qwen VL class.

    A family class sets ``model_id`` (the lmms-eval name), ``families`` (checkpoint ``model_type`` values it
    serves) and, where lmms-eval's ``__init__`` needs it, overrides ``_base_load_kwargs``.
    """

    model_id: str = "qwen2_5_vl_psa"
    families: Tuple[str, ...] = ("qwen2_5_vl",)
    #: ``attn_implementation`` values lmms-eval's ``__init__`` of the family accepts as such.
    base_attn_implementations: Tuple[str, ...] = ("sdpa", "eager", "flash_attention_2")

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
        self._psa_length_check.remove()
        super().clean()  # type: ignore[misc]

    def _psa_setup(self, options: Dict[str, Any]) -> None:
        self.psa_records = []
        self._psa_timer = PrefillTimer(self.model).attach()
        self._psa_length_check = self.model.register_forward_pre_hook(_prompt_length_hook, with_kwargs=True)
        self.set_psa(**options)

    def set_psa(self, preset: Optional[str] = None, psa_config: Optional[str] = None, **options: Any) -> PSAConfig:
        """(Re)configure PSA in place: ``preset`` (default ``paper``) or a JSON config ``psa_config``, plus the
        ``--model_args`` overrides (see module docstring).

        ``preset="dense"`` (with no overrides) removes the patch: lmms-eval's unpatched model of the family.

        Returns:
            The active ``PSAConfig`` (the ``dense`` preset's for the unpatched control).
        """
        from ..patches import patch, unpatch

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
        control = preset == "dense" and psa_config is None  # the dense control runs unpatched
        if not control:
            text = self.model.config.get_text_config()
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            check_config_for_backend(config, backend, device=self.model.device, head_dim=head_dim)
        self.psa_preset = str(preset)
        self.psa_config = config
        self.psa_backend = backend
        if control:
            unpatch(self.model)
            logger.info("%s: preset dense -> unpatched dense attention (the control)", self.model_id)
        else:
            patch(self.model, config, layers=layers, backend=backend)
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
            with pyav_fallback():  # videos decord cannot read are read with PyAV (psa_vlm.video.decode)
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
                "%s %s: %s tokens, density %s, prefill %s s", self.model_id, self.psa_preset, m["input_tokens"],
                "n/a" if dens is None else f"{dens:.3f}",
                "n/a" if m["prefill_s"] is None or math.isnan(m["prefill_s"]) else f"{m['prefill_s']:.4f}",
            )
        return out


    def _base_load_kwargs(self, attn_implementation: str) -> Dict[str, Any]:
        """Keyword arguments that make lmms-eval's ``__init__`` load with ``attn_implementation`` (or with its
        default when it does not take that name; ``_init`` then sets it after loading)."""
        if attn_implementation in self.base_attn_implementations:
            return {"attn_implementation": attn_implementation}
        return {"attn_implementation": "sdpa"}

    @contextlib.contextmanager
    def _loading(self, pretrained: str) -> Iterator[None]:
        """Context around lmms-eval's ``__init__`` (a family hook; nothing by default)."""
        yield


_DTYPES = ("bfloat16", "float16", "float32")
#: What to lower when a prompt is longer than the model (lmms-eval ``--model_args`` names).
LENGTH_OPTIONS = "max_num_frames, fps or max_pixels in --model_args"


def _prompt_length_hook(module: Any, args: Any, kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook on the model: reject a prompt longer than ``max_position_embeddings`` before prefill."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is not None and getattr(ids, "dim", lambda: 0)() >= 2:
        check_prompt_length(module, int(ids.shape[1]), options=LENGTH_OPTIONS)


def _device_of(kwargs: Dict[str, Any]) -> Optional[str]:
    dev = kwargs.get("device")
    if dev is None:
        dev = kwargs.get("device_map")
    return dev if isinstance(dev, str) and dev not in ("auto", "") else None


def _check_family(self: Any, pretrained: str) -> None:
    """A local checkpoint of another family fails here, naming the lmms-eval model that serves it."""
    if not Path(pretrained).expanduser().is_dir():
        return  # a hub id: lmms-eval resolves it
    try:
        family = checkpoint_family(pretrained)
    except CheckpointError as exc:
        raise ValueError(f"{self.model_id}: {exc}") from None
    if family not in self.families:
        raise ValueError(f"{self.model_id} serves {'/'.join(self.families)} checkpoints; {pretrained!r} is "
                         f"{family!r}: use --model {LMMS_MODEL_FOR_FAMILY[family]}")


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
        config = psa_config_from_options(base=PSAConfig.load(json_path), **probe)
        control = False
    else:
        preset = str(probe.pop("preset", "paper"))
        config = psa_config_from_options(preset, **probe)
        control = preset == "dense"  # the dense control runs unpatched
    if not control:
        check_config_for_backend(config, str(psa_options.get("backend", "auto")), device=_device_of(kwargs))
    if attn_implementation is None:
        attn_implementation = "sdpa"
    if kwargs.pop("use_flash_attention_2", False) in (True, "True", "true"):  # lmms-eval qwen2_vl's own flag
        attn_implementation = "flash_attention_2"
    if not isinstance(attn_implementation, str) or not attn_implementation.strip() or \
            attn_implementation.startswith("psa"):
        raise ValueError(
            f"{self.model_id} loads the checkpoint with a transformers attention (sdpa, eager, flash_attention_2, "
            f"...) and then patches PSA in; got attn_implementation={attn_implementation!r}"
        )
    _check_family(self, pretrained)
    try:
        with self._loading(pretrained):
            base.__init__(self, pretrained=pretrained, **self._base_load_kwargs(attn_implementation), **kwargs)
        loaded = self._model.config.get_text_config()._attn_implementation
        if loaded != attn_implementation:  # a name lmms-eval's __init__ does not take
            self._model.set_attn_implementation(attn_implementation)
    except ImportError as exc:  # transformers: flash-attn / kernels package missing
        raise ValueError(f"{self.model_id}: attn_implementation={attn_implementation!r} is not usable here: "
                         f"{str(exc).strip().splitlines()[0]} (install it, or use attn_implementation=sdpa)") from None
    if dtype is not None and dtype != "bfloat16":  # lmms-eval loads bf16; float32 is much faster on CPUs
        import torch

        self._model.to(getattr(torch, dtype))
        logger.info("%s: weights cast to %s", self.model_id, dtype)
    self._psa_setup(psa_options)


class Qwen2_5_VL_PSA(_PSAMixin, _LmmsQwen25VLChat):
    """lmms-eval chat model ``qwen2_5_vl_psa`` (see the module docstring for the options).

    Args:
        pretrained: Local checkpoint directory (or hub id where the hub is reachable).
        attn_implementation: Attention the checkpoint is loaded with before patching (``sdpa``); PSA falls back
            to it for decode and short inputs.
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


class _Qwen2VLFamily(_PSAMixin):
    """Qwen2-VL: lmms-eval's ``qwen2_vl`` takes ``use_flash_attention_2`` instead of ``attn_implementation``."""

    model_id = "qwen2_vl_psa"
    families = ("qwen2_vl",)

    def _base_load_kwargs(self, attn_implementation: str) -> Dict[str, Any]:
        # without the flag lmms-eval's qwen2_vl loads transformers' default (sdpa); other names are set afterwards
        return {"use_flash_attention_2": attn_implementation == "flash_attention_2"}


class Qwen2_VL_PSASimple(_Qwen2VLFamily, _LmmsQwen2VLSimple):
    """lmms-eval simple model ``qwen2_vl_psa`` (lmms-eval has no chat ``qwen2_vl``, so this is its only class).

    Args:
        pretrained: Local Qwen2-VL checkpoint directory (or hub id where the hub is reachable).
        attn_implementation: Attention the checkpoint is loaded with before patching (``sdpa``).
        **kwargs: PSA options (``PSA_MODEL_ARGS``) and lmms-eval ``qwen2_vl`` arguments (``device``,
            ``device_map``, ``max_pixels``, ``min_pixels``, ``max_num_frames``, ``batch_size``, ...).
    """

    is_simple = True

    def __init__(self, pretrained: str = "Qwen/Qwen2-VL-7B-Instruct", attn_implementation: str = "sdpa",
                 **kwargs: Any) -> None:
        _init(self, _LmmsQwen2VLSimple, pretrained, attn_implementation, kwargs)


class _Qwen3VLFamily(_PSAMixin):
    """Qwen3-VL and Qwen3-VL-MoE: the model class follows the checkpoint's ``model_type``."""

    model_id = "qwen3_vl_psa"
    families = ("qwen3_vl", "qwen3_vl_moe")

    @contextlib.contextmanager
    def _loading(self, pretrained: str) -> Iterator[None]:
        """While lmms-eval's ``qwen3_vl`` loads a local checkpoint, its choice of class follows the checkpoint's
        ``model_type`` rather than an ``A<n>B`` in the path; everything is restored afterwards.

        lmms-eval >= 0.7.3 chooses through ``_resolve_model_class(pretrained, is_moe)``: ``is_moe`` is replaced.
        0.7.0 picks between the module's ``Qwen3VLForConditionalGeneration`` and
        ``Qwen3VLMoeForConditionalGeneration``: both names point at the right class meanwhile. A loaded model of
        another class (a future lmms-eval choosing otherwise) raises ``RuntimeError``.
        """
        if not Path(pretrained).expanduser().is_dir():
            yield  # a hub id: lmms-eval's own rule (hub names of MoE checkpoints carry A<n>B)
            return
        import transformers

        is_moe = checkpoint_family(pretrained) == "qwen3_vl_moe"
        module = _lmms_qwen3_vl_module
        names = ("_resolve_model_class",) if hasattr(module, "_resolve_model_class") else (
            "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
        saved = {n: getattr(module, n) for n in names if hasattr(module, n)}
        if "_resolve_model_class" in saved:
            original = saved["_resolve_model_class"]
            module._resolve_model_class = lambda path, _is_moe: original(path, is_moe)
        else:
            right = getattr(transformers, names[1] if is_moe else names[0])
            for n in saved:
                setattr(module, n, right)
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(module, n, v)
        expected = "Qwen3VLMoeForConditionalGeneration" if is_moe else "Qwen3VLForConditionalGeneration"
        if type(self.model).__name__ != expected:  # ``model``: unwrapped from accelerate
            raise RuntimeError(f"{self.model_id}: lmms-eval loaded {pretrained!r} as {type(self.model).__name__}, "
                               f"but its config.json says {expected}; this lmms-eval version chooses the class "
                               "another way: please report it")


class Qwen3_VL_PSA(_Qwen3VLFamily, _LmmsQwen3VLChat):
    """lmms-eval chat model ``qwen3_vl_psa``: Qwen3-VL and Qwen3-VL-MoE (see the module docstring).

    Args:
        pretrained: Local Qwen3-VL / Qwen3-VL-MoE checkpoint directory (or hub id where the hub is reachable).
        attn_implementation: Attention the checkpoint is loaded with before patching (``sdpa``).
        **kwargs: PSA options (``PSA_MODEL_ARGS``) and lmms-eval ``qwen3_vl`` arguments (``device``,
            ``device_map``, ``max_pixels``, ``min_pixels``, ``total_pixels``, ``max_num_frames``, ``fps``,
            ``system_prompt``, ``batch_size``, ...).
    """

    is_simple = False

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-8B-Instruct", attn_implementation: str = "sdpa",
                 **kwargs: Any) -> None:
        _init(self, _LmmsQwen3VLChat, pretrained, attn_implementation, kwargs)


class Qwen3_VL_PSASimple(_Qwen3VLFamily, _LmmsQwen3VLSimple):
    """lmms-eval simple model ``qwen3_vl_psa`` (``--force_simple``); same options as ``Qwen3_VL_PSA``."""

    is_simple = True

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-8B-Instruct", attn_implementation: str = "sdpa",
                 **kwargs: Any) -> None:
        _init(self, _LmmsQwen3VLSimple, pretrained, attn_implementation, kwargs)
