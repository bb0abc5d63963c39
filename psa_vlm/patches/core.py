"""Shared machinery of the model patches: PSA inside the text attention of transformers models.

One family module per model family (``qwen2_vl.py``, ``qwen2_5_vl.py``, ``qwen3_vl.py``) declares a ``Family``
(its classes and special-token ids); everything else lives here, once:

* **Attention function.** ``patch`` switches the text config's attention implementation from the model's own
  (``original``: ``sdpa``, ``eager``, ``flash_attention_2/3/4``, a ``kernels`` hub name, ...) to a PSA name
  registered in transformers' ``AttentionInterface`` (``"psa"`` for sdpa, ``"psa_eager"`` for eager,
  ``"psa_" + original`` otherwise). The name keeps ``"flash"`` when the original has it, so transformers
  prepares exactly the masks and kwargs it prepares for the original (``is_flash_attention_requested`` tests
  ``"flash" in name``), and ``AttentionMaskInterface`` gets the original's mask function under the PSA name.
  The vision tower keeps its own implementation. No forward is rebound.
* **Per call** of a text attention layer: prefill with at least ``config.min_seq_len`` (and at least 2) query
  tokens on an enabled layer, whose mask is causal + key padding: PSA (``run_psa``) on the layer's Q/K/V
  (RoPE applied, K/V un-repeated ``[B, Hkv, Lk, D]``, ``Lq <= Lk`` on a cache). Anything else (decode steps,
  short inputs, disabled layers, masks PSA cannot express, ``output_attentions``, static caches, sliding
  windows, dropout, softcapping, sinks) calls the ORIGINAL function with the identical arguments. Functions
  whose name contains ``"flash"`` read ``module.config._attn_implementation`` to choose their kernel
  (``transformers.integrations.flash_attention``), so the original runs with the text config's name set back to
  the original for that call. The KV cache is filled by the model as usual (PSA never writes it).
* **Per forward**, forward pre-hooks (``_PreHook``, picklable callables) read the inputs once (no per-layer
  host synchronisation): on the base model the token types from ``input_ids`` (``token_types_from_ids``); on
  the text model the key padding mask (the 2-D ``attention_mask``) and whether the mask transformers will build
  from the same inputs is exactly causal + key padding. It is not for a custom 4-D or per-layer mask, ``cu_seq_lens_*`` / ``max_length_*`` kwargs
  (padding-free packing) or explicit position ids that restart inside a row (packed sequences: transformers
  then builds a block-diagonal mask, or the flash path splits the row): those forwards run the original
  attention (logged once per reason) instead of a guess.
* **State** (``_PatchState``) lives on the text model and on each patched attention module (the same object);
  the hook holds it too. ``copy.deepcopy`` therefore copies it with the model (the copy's hook writes the
  copy's state) and ``pickle`` / ``torch.save`` work (no closures).

Hook points for other parts of psa_vlm: ``_PatchState.config_for(layer_idx)`` is the one place a layer's config
is read; ``observe(model, fn)`` calls ``fn(layer_idx, psa_out, dense_out, plan)`` after every PSA layer.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..api import BACKENDS, PSAPlan, check_config_for_backend, run_psa
from ..config import PRESETS, PSAConfig

__all__ = [
    "Family",
    "PSA_ATTENTION_NAME",
    "MIN_TRANSFORMERS",
    "psa_name",
    "register_attention",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "psa_stats",
    "observe",
    "token_types_from_ids",
]

logger = logging.getLogger(__name__)

#: Name under which PSA with an ``sdpa`` fallback is registered in transformers' interfaces.
PSA_ATTENTION_NAME = "psa"

#: Lowest transformers version the patches support (see ``check_transformers``).
MIN_TRANSFORMERS = "5.0.0"

_BACKENDS = BACKENDS
# kwargs of padding-free (packed) batches: transformers' flash path attends per segment, PSA cannot
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ---------------------------------------------------------------------------------------------- names
def psa_name(original: str) -> str:
    """The registered PSA name for an original text attention (``sdpa`` -> ``psa``, ``eager`` -> ``psa_eager``,
    anything else ``x`` -> ``psa_x``, so that flash names keep ``"flash"``)."""
    if original == "sdpa":
        return PSA_ATTENTION_NAME
    return f"{PSA_ATTENTION_NAME}_{original}"


def _original_of(name: Optional[str]) -> Optional[str]:
    """The original implementation behind a registered PSA name, or ``None`` if ``name`` is not PSA's."""
    if not isinstance(name, str):
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)
    return fn.original if isinstance(fn, PSAAttentionFunction) else None


# ---------------------------------------------------------------------------------------------- transformers
def check_transformers() -> None:
    """Raise ``RuntimeError`` if the installed transformers lacks what the patches rely on."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise RuntimeError(f"psa_vlm.patches needs transformers; pip install 'transformers>={MIN_TRANSFORMERS}'") from exc
    from packaging.version import Version

    version = transformers.__version__
    problems: List[str] = []
    if Version(version).release < Version(MIN_TRANSFORMERS).release:
        problems.append(f"version {version} < {MIN_TRANSFORMERS}")
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError as exc:
        problems.append(f"missing {exc.name or exc}")
    if problems:
        raise RuntimeError(
            f"psa_vlm's model patches need transformers>={MIN_TRANSFORMERS} (text attention through "
            f"AttentionInterface, masks through AttentionMaskInterface); found transformers {version}: "
            f"{'; '.join(problems)}. Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


def register_attention(originals: Union[str, Sequence[str]] = ("sdpa", "eager")) -> str:
    """Register PSA in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` (idempotent).

    For each original implementation ``x`` the name ``psa_name(x)`` gets a ``PSAAttentionFunction`` with ``x``
    as its dense fallback, and the original's mask function (none if the original has none), so the original
    receives exactly the masks it would get unpatched. ``import psa_vlm.patches`` registers ``"psa"`` (sdpa)
    and ``"psa_eager"``; ``patch`` registers the name it needs. After this,
    ``from_pretrained(..., attn_implementation={"text_config": "psa", "vision_config": "sdpa"})`` loads a model
    whose text attention is PSA's; it runs its original attention until ``psa_vlm.patch`` gives it a config.

    Args:
        originals: Original implementation name(s).

    Returns:
        The PSA name of the first original (``"psa"`` by default).

    Raises:
        RuntimeError: The installed transformers is too old (see ``MIN_TRANSFORMERS``).
        ValueError: An original that transformers does not know (and is not ``eager``).
    """
    check_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if isinstance(originals, str):
        originals = (originals,)
    names = []
    for original in originals:
        if _original_of(original) is not None:
            raise ValueError(f"{original!r} is already a PSA attention name")
        if original != "eager" and original not in ALL_ATTENTION_FUNCTIONS._global_mapping:
            raise ValueError(
                f"unknown attention implementation {original!r}: transformers has "
                f"{sorted(ALL_ATTENTION_FUNCTIONS._global_mapping)}"
            )
        name = psa_name(original)
        current = ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)
        if not (isinstance(current, PSAAttentionFunction) and current.original == original):
            AttentionInterface.register(name, PSAAttentionFunction(original))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original)
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
        names.append(name)
    return names[0]


def _original_function(module: torch.nn.Module, original: str) -> Callable:
    """The function the unpatched layer calls for ``original`` (``eager``: its modeling file's own)."""
    if original == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:  # pragma: no cover - every Qwen VL modeling file defines it
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward as fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


def call_original(module: torch.nn.Module, original: str, query, key, value, attention_mask, *args, **kwargs):
    """Run the layer's original attention with the identical arguments (under its own name, see module doc)."""
    fn = _original_function(module, original)
    config = getattr(module, "config", None)
    if original in ("sdpa", "eager") or config is None or not hasattr(config, "_attn_implementation_internal"):
        return fn(module, query, key, value, attention_mask, *args, **kwargs)
    # flash_attention_forward passes module.config._attn_implementation to its kernel loader; other registered
    # functions may read it as well: they see their own name, as unpatched
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = original
    try:
        return fn(module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        config._attn_implementation_internal = previous


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """A model family the patch knows: its transformers classes, by name (imported on first use).

    Attributes:
        name: Display name (``"Qwen2.5-VL"``).
        modeling: The transformers modeling module (``transformers.models.qwen2_5_vl.modeling_qwen2_5_vl``).
        conditional: Conditional-generation class name (``model.model`` is the base model).
        base: Base model class name (``.language_model`` is the text model, ``.visual`` the vision tower).
        text: Text model class name.
        attention: Text attention class name (the modules PSA serves).
    """

    name: str
    modeling: str
    conditional: str
    base: str
    text: str
    attention: str

    def classes(self) -> Optional[Tuple[type, type, type, type]]:
        """``(conditional, base, text, attention)`` classes, or ``None`` if this transformers lacks the family."""
        try:
            mod = importlib.import_module(self.modeling)
        except ImportError:
            return None
        try:
            return tuple(getattr(mod, n) for n in (self.conditional, self.base, self.text, self.attention))
        except AttributeError:
            return None

    def class_names(self) -> str:
        return f"{self.conditional}, {self.base}, {self.text}"


@dataclass
class _Resolved:
    family: Family
    text_model: torch.nn.Module
    hook_target: torch.nn.Module
    visual: Optional[torch.nn.Module]
    ids: "VisionIds"


@dataclass(frozen=True)
class VisionIds:
    """Special token ids that delimit the visual spans of a prompt (``None``: unknown)."""

    placeholders: Tuple[int, ...] = ()  # image / video pad ids
    span_start: Optional[int] = None  # <|vision_start|>
    span_end: Optional[int] = None  # <|vision_end|>

    @classmethod
    def from_config(cls, config: Any) -> "VisionIds":
        def get(name: str) -> Optional[int]:
            v = getattr(config, name, None)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        placeholders = tuple(i for i in (get("video_token_id"), get("image_token_id")) if i is not None)
        start, end = get("vision_start_token_id"), get("vision_end_token_id")
        if start is None or end is None:
            start = end = None
        return cls(placeholders, start, end)

    @property
    def known(self) -> bool:
        return bool(self.placeholders) or self.span_start is not None


def resolve(model: Any, families: Sequence[Family], caller: str) -> _Resolved:
    """Find ``model``'s family and its text model, hook target, vision tower and visual-span ids.

    Raises:
        TypeError: ``model`` is none of the families' conditional-generation, base or text model classes.
    """
    for fam in families:
        cls = fam.classes()
        if cls is None:
            continue
        cg_cls, base_cls, text_cls, _ = cls
        if isinstance(model, cg_cls):
            base = model.model
        elif isinstance(model, base_cls):
            base = model
        elif isinstance(model, text_cls):
            return _Resolved(fam, model, model, None, VisionIds.from_config(model.config))
        else:
            continue
        return _Resolved(fam, base.language_model, base, getattr(base, "visual", None), VisionIds.from_config(base.config))
    supported = "; ".join(f"{f.name}: {f.class_names()}" for f in families)
    raise TypeError(f"{caller} supports {supported}; got {type(model).__module__}.{type(model).__name__}")


def attention_modules(res: _Resolved) -> List[torch.nn.Module]:
    attn_cls = res.family.classes()[3]
    mods = [m for m in res.text_model.modules() if isinstance(m, attn_cls)]
    if not mods:
        raise TypeError(f"{type(res.text_model).__name__} has no {res.family.attention} layers to patch")
    return mods


# ---------------------------------------------------------------------------------------------- token types
def token_types_from_ids(
    input_ids: torch.Tensor, ids: VisionIds, open_spans: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token types of a prompt from its ids: 1 inside an image / video span, 0 for text.

    A token is visual when it is a placeholder (``<|image_pad|>``, ``<|video_pad|>``) or lies inside a
    ``<|vision_start|>`` ... ``<|vision_end|>`` span, both markers included, spans nested or not. This covers the
    structural tokens a processor inserts per frame: Qwen3-VL writes ``<t seconds><|vision_start|>`` +
    pads + ``<|vision_end|>`` for every temporal patch inside the chat template's own
    ``<|vision_start|>...<|vision_end|>`` (``Qwen3VLProcessor.replace_video_token``), so its timestamps are visual.
    Text is everything outside the spans: what the user and the chat template wrote. Comparisons with Python
    ints only (no host-device copy, no synchronisation).

    Args:
        input_ids: int ``[B, L]``.
        ids: The family's ``VisionIds``.
        open_spans: int64 ``[B]``: spans still open before this chunk (a prefill onto a cache), or ``None``.

    Returns:
        ``(types int8 [B, L], open spans after the chunk int64 [B] or None without span ids)``.
    """
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in ids.placeholders:
        visual |= input_ids == token_id
    if ids.span_start is None:
        return visual.to(torch.int8), None
    start = input_ids == ids.span_start
    end = input_ids == ids.span_end
    depth = (start.to(torch.int64) - end.to(torch.int64)).cumsum(-1)
    if open_spans is not None:
        depth = depth + open_spans[:, None]
    visual |= (depth > 0) | end
    return visual.to(torch.int8), depth[:, -1].clamp(min=0)


# ---------------------------------------------------------------------------------------------- state
@dataclass
class _LayerRecord:
    """Statistics of one layer's last PSA prefill, kept as device tensors until ``psa_stats`` reads them."""

    density: torch.Tensor  # 0-d float32: of the level map (the plan)
    histogram: torch.Tensor  # int64 [5]: factors 1, 2, 4, 8, skipped
    batch: int
    lq: int
    lk: int
    dense_reason: Optional[str] = None  # the dense guard ran dense attention instead of the plan
    attend_backend: Optional[str] = None  # PSAPlan.attend_backend


@dataclass
class _PatchState:
    """Per-model PSA state, on the text model as ``_psa_state`` and on each patched attention module.

    Everything a forward needs is here, so a deep copy of the model copies it and the copy stays independent.
    """

    config: PSAConfig
    backend: str
    layers: Optional[frozenset]  # None: all layers
    original: str  # text attention implementation before patching
    name: str  # registered PSA name in use
    family: str
    ids: VisionIds
    modules: List[torch.nn.Module] = field(default_factory=list, repr=False)
    # runtime, rewritten by the pre-hook on every forward
    token_types: Optional[torch.Tensor] = field(default=None, repr=False)  # int8 [B, L]: 0 text, 1 visual
    open_spans: Optional[torch.Tensor] = field(default=None, repr=False)  # int64 [B]
    key_padding: Optional[torch.Tensor] = field(default=None, repr=False)  # bool [B, Lk]: True = real token
    on_device: Dict[Tuple[str, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)
    dense_reason: Optional[str] = None  # set when this forward cannot use PSA
    types_fresh: bool = False  # token types written by this forward's ``types`` hook
    warned: set = field(default_factory=set, repr=False)
    observers: List[Callable] = field(default_factory=list, repr=False)
    layer_configs: Dict[Any, PSAConfig] = field(default_factory=dict, repr=False)  # (config, layer) -> for_layer

    def config_for(self, layer_idx: Optional[int]) -> PSAConfig:
        """The ``PSAConfig`` of one layer (the one place a layer's config is read): ``config.for_layer(i)``,
        i.e. the config with that layer's ``layer_overrides`` applied."""
        if not self.config.layer_overrides:
            return self.config
        key = (self.config, layer_idx)
        cfg = self.layer_configs.get(key)
        if cfg is None:
            if len(self.layer_configs) > 256:  # the config was replaced many times: start over
                self.layer_configs.clear()
            cfg = self.layer_configs[key] = self.config.for_layer(layer_idx)
        return cfg

    def enabled(self, layer_idx: Optional[int]) -> bool:
        return self.layers is None or layer_idx in self.layers

    def _on(self, key: str, t: Optional[torch.Tensor], device: torch.device, shape: Tuple[int, ...]):
        if t is None or tuple(t.shape) != shape:
            return None
        cached = self.on_device.get((key, device))
        if cached is None:
            cached = t.to(device, non_blocking=True)
            self.on_device[(key, device)] = cached
        return cached

    def token_types_on(self, device: torch.device, batch: int, lk: int) -> Optional[torch.Tensor]:
        return self._on("types", self.token_types, device, (batch, lk))

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(msg, *args)

    def __getstate__(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["observers"] = []  # observers belong to a running ``observe`` block, not to a saved model
        d["on_device"] = {}
        return d

    def __setstate__(self, d: Dict[str, Any]) -> None:
        self.__dict__.update(d)
        try:  # a model loaded in a fresh process needs its PSA name registered again
            register_attention(self.original)
        except (RuntimeError, ValueError) as exc:  # pragma: no cover - the model then fails with transformers' error
            logger.warning("PSA: could not register %r after unpickling: %s", self.name, exc)


def describe(config: PSAConfig) -> str:
    """Short description: the closest preset plus the fields that differ (``preset=paper+block_q=16,...``)."""
    best_name, best_diff = None, None
    for name, preset in PRESETS.items():
        diff = [f for f in config.__dataclass_fields__ if getattr(config, f) != getattr(preset, f)]
        if best_diff is None or len(diff) < len(best_diff):
            best_name, best_diff = name, diff
    assert best_diff is not None
    if not best_diff:
        return f"preset={best_name}"
    return f"preset={best_name}+" + ",".join(f"{f}={getattr(config, f)}" for f in best_diff)


class _PSARepr:
    """``extra_repr`` of a patched attention module (a picklable callable: ``print(model)`` shows PSA)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self) -> str:
        state: Optional[_PatchState] = getattr(self.module, "_psa_state", None)
        if state is None:
            return ""
        idx = getattr(self.module, "layer_idx", None)
        if not state.enabled(idx):
            return f"psa=off (dense {state.original})"
        cfg = state.config_for(idx)
        return (
            f"psa=on ({describe(cfg)}; prefill >= {max(cfg.min_seq_len, 2)} tokens; "
            f"backend={state.backend}; dense fallback={state.original})"
        )


# ---------------------------------------------------------------------------------------------- attention
_UNPATCHED_WARNED: List[bool] = []  # one warning per process for models loaded with a PSA name, never patched


class PSAAttentionFunction:
    """The function registered in ``AttentionInterface`` under ``psa_name(original)``.

    Called by the text attention layers as ``fn(module, query, key, value, attention_mask, **kwargs)``:
    ``query`` ``[B, Hq, Lq, D]`` after RoPE, ``key`` / ``value`` ``[B, Hkv, Lk, D]`` (the whole cache on a
    cache), ``attention_mask`` built by the original's mask function. Returns ``(out [B, Lq, Hq, D]
    contiguous, None)`` from PSA, as the sdpa / flash wrappers return, or the original's return value.
    """

    def __init__(self, original: str) -> None:
        self.original = original
        self.__name__ = self.__qualname__ = f"psa_attention_forward[{original}]"

    def __repr__(self) -> str:
        return f"PSAAttentionFunction(original={self.original!r})"

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        state: Optional[_PatchState] = getattr(module, "_psa_state", None)
        if state is None:  # loaded with a PSA name but never patched (or the vision tower): no config, no types
            if getattr(module, "is_causal", False) and query.shape[2] > 1 and not _UNPATCHED_WARNED:
                _UNPATCHED_WARNED.append(True)
                logger.warning("PSA: %s runs its original %s attention until psa_vlm.patch(model, config) is called",
                               type(module).__name__, self.original)
            return call_original(module, self.original, query, key, value, attention_mask, *args, **kwargs)
        layer_idx = getattr(module, "layer_idx", None)
        config = state.config_for(layer_idx)
        lq = query.shape[2]
        if lq < max(config.min_seq_len, 2) or not state.enabled(layer_idx):
            return call_original(module, self.original, query, key, value, attention_mask, *args, **kwargs)
        reason = self._reason(module, state, query, key, args, kwargs)
        kpm = None
        if reason is None:
            B, lk = query.shape[0], key.shape[2]
            kpm = state.key_padding
            if kpm is not None:
                if tuple(kpm.shape) != (B, lk):
                    reason = f"attention mask of shape {tuple(kpm.shape)} for {B} x {lk} keys"
                else:
                    kpm = state._on("kpm", kpm, query.device, (B, lk))
        if reason is not None:
            state.warn_once(reason, "PSA: original %s attention instead (logged once): %s", self.original, reason)
            return call_original(module, self.original, query, key, value, attention_mask, *args, **kwargs)

        B, Hq, _, D = query.shape
        lk = key.shape[2]
        out = query.new_empty(B, lq, Hq, D)
        o, plan = run_psa(
            query,
            key,
            value,
            config,
            scale=kwargs.get("scaling"),
            key_padding_mask=kpm,
            token_types=state.token_types_on(query.device, B, lk),
            backend=state.backend,
            out=out.transpose(1, 2),
        )
        if o is not None and o.data_ptr() != out.data_ptr():  # a backend that ignored ``out``
            out.copy_(o.transpose(1, 2))
        lm = plan.level_map
        module._psa_last = _LayerRecord(lm.density_tensor(), lm.histogram_tensor(), B, lq, lk, plan.dense_reason,
                                       plan.attend_backend)
        for fn in list(state.observers):
            fn(layer_idx, out, _DenseOut(module, self.original, query, key, value, attention_mask, args, kwargs), plan)
        return out, None

    @staticmethod
    def _reason(module, state: _PatchState, query, key, args, kwargs) -> Optional[str]:
        """Why this call must run the original attention (``None``: PSA can run it exactly)."""
        if state.dense_reason is not None:
            return state.dense_reason
        if args:
            return f"{len(args)} unexpected positional argument(s) to the attention function"
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if not is_causal:
            return "non-causal attention"
        if kwargs.get("output_attentions"):
            return "attention weights requested (output_attentions=True)"
        if any(kwargs.get(k) is not None for k in _PACKED_KWARGS):
            return "packed sequences (cu_seq_lens_* / max_length_* kwargs)"
        if kwargs.get("sliding_window") is not None:
            return "sliding-window layers are not supported by PSA"
        if module.training and kwargs.get("dropout", 0.0):
            return "attention dropout (training) is not supported by PSA"
        if kwargs.get("softcap") is not None:
            return "logit softcapping is not supported by PSA"
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            return "attention sinks are not supported by PSA"
        if query.shape[2] > key.shape[2]:
            return f"more queries ({query.shape[2]}) than keys ({key.shape[2]})"
        return None


class _DenseOut:
    """Lazy original attention on one PSA call's inputs: ``dense_out()`` -> ``[B, Lq, Hq, D]``."""

    def __init__(self, module, original, query, key, value, attention_mask, args, kwargs) -> None:
        self._call = (module, original, query, key, value, attention_mask, args, kwargs)
        self._out: Optional[torch.Tensor] = None

    def __call__(self) -> torch.Tensor:
        if self._out is None:
            module, original, q, k, v, mask, args, kwargs = self._call
            out = call_original(module, original, q, k, v, mask, *args, **kwargs)[0]
            self._out = out.reshape(q.shape[0], q.shape[2], q.shape[1], -1)
        return self._out


@contextlib.contextmanager
def observe(model: Any, fn: Callable[[int, torch.Tensor, Callable[[], torch.Tensor], PSAPlan], None]) -> Iterator[None]:
    """Call ``fn`` after every PSA layer of a patched model while the block runs.

    ``fn(layer_idx, psa_out, dense_out, plan)``: ``psa_out`` is the layer's PSA output ``[B, Lq, Hq, D]``,
    ``dense_out()`` computes the ORIGINAL attention on the same inputs (same mask and kwargs; lazily, once) as
    ``[B, Lq, Hq, D]``, ``plan`` is the ``psa_vlm.api.PSAPlan`` (level map, block lists). Layers that ran the
    original attention are not reported.

    Raises:
        ValueError: ``model`` is not patched.
    """
    state = _state_of(model)
    if state is None:
        raise ValueError("observe() needs a patched model: call psa_vlm.patch(model, config) first")
    state.observers.append(fn)
    try:
        yield
    finally:
        state.observers.remove(fn)


# ---------------------------------------------------------------------------------------------- pre-hook
def _past_length(cache: Any) -> Tuple[Optional[int], Optional[str]]:
    """``(number of cached tokens or None if unknown without a host sync, reason PSA must stay off)``."""
    if cache is None:
        return 0, None
    if getattr(cache, "is_compileable", False):
        return None, f"{type(cache).__name__} (PSA aligns queries to the end of the keys; use a DynamicCache)"
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        return None, None
    try:
        n = get()
    except Exception:  # noqa: BLE001  # pragma: no cover - exotic caches: treat the length as unknown
        return None, None
    return (n, None) if isinstance(n, int) else (None, None)


def _mask_reason(kwargs: Dict[str, Any], hooked: torch.nn.Module, n_new: int) -> Optional[str]:
    """Why the mask transformers builds for this forward is not exactly causal + key padding (``None``: it is)."""
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        return f"custom attention mask ({shape}); PSA expresses causal + key padding only"
    if any(kwargs.get(k) is not None for k in _PACKED_KWARGS):
        return "packed sequences (cu_seq_lens_* / max_length_* kwargs)"
    if kwargs.get("output_attentions") or getattr(hooked.config, "output_attentions", False):
        return "attention weights requested (output_attentions=True)"
    pos = kwargs.get("position_ids")
    if mask is None and n_new > 1 and isinstance(pos, torch.Tensor):
        # transformers builds a block-diagonal mask (and the flash path splits the row) when the text positions
        # restart: text positions are row 0 of [4, B, L] position ids, or the [B, L] ids themselves
        text = pos[0] if pos.dim() == 3 and pos.shape[0] == 4 else pos if pos.dim() == 2 else None
        if text is not None and text.shape[-1] > 1 and bool((text.diff(dim=-1) != 1).any()):  # one sync per forward
            return "packed sequences (position ids restart inside a row)"
    return None


class _PreHook:
    """Forward pre-hook, once per forward: token types (``types``) and the mask check (``mask``).

    Patching a conditional-generation or base model puts a ``types`` hook on the base model (it sees
    ``input_ids``) and a ``mask`` hook on the text model (it sees exactly the ``attention_mask``, position ids,
    cache and kwargs transformers builds the text mask from, also when the text model is called directly);
    patching a text model puts one hook doing both on it. Token types not refreshed for this forward (text model
    called on its own) are dropped: the ``text_tail`` rule applies.
    """

    def __init__(self, state: _PatchState, types: bool = True, mask: bool = True) -> None:
        self.state, self.types, self.mask = state, types, mask

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None and input_ids.dim() == 2:
            n_new = input_ids.shape[1]
        elif embeds is not None and embeds.dim() == 3:
            n_new, input_ids = embeds.shape[1], None
        else:
            n_new = input_ids = None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past, cache_reason = _past_length(cache)
        if self.types:
            self._token_types(input_ids, past)
        if not self.mask:
            return
        if not (self.types or state.types_fresh):
            state.token_types = state.open_spans = None
        state.types_fresh = False
        state.on_device = {}
        if n_new is None:  # unknown inputs: nothing to check the mask against
            state.dense_reason, state.key_padding = "inputs without input_ids or inputs_embeds", None
            return
        if n_new > 1:  # a prefill: the statistics describe the last prefill only
            for m in state.modules:
                m._psa_last = None
        state.dense_reason = cache_reason or _mask_reason(kwargs, module, n_new)
        mask = kwargs.get("attention_mask")
        state.key_padding = None
        if state.dense_reason is None and n_new > 1 and isinstance(mask, torch.Tensor):
            # transformers' sdpa mask makes the same check (one sync per prefill): no padding, no mask for PSA
            kpm = mask.bool()
            state.key_padding = None if bool(kpm.all()) else kpm

    def _token_types(self, input_ids: Optional[torch.Tensor], past: Optional[int]) -> None:
        state = self.state
        state.types_fresh = True
        if input_ids is None or not state.ids.known or past is None:
            state.token_types = state.open_spans = None  # unknown from here on: the text_tail rule applies
        elif past == 0:
            state.token_types, state.open_spans = token_types_from_ids(input_ids, state.ids)
        elif state.token_types is not None and tuple(state.token_types.shape) == (input_ids.shape[0], past):
            new, state.open_spans = token_types_from_ids(input_ids, state.ids, state.open_spans)
            state.token_types = torch.cat([state.token_types, new], dim=1)
        else:
            state.token_types = state.open_spans = None


def _remove_hooks(target: torch.nn.Module) -> None:
    for key, hook in list(target._forward_pre_hooks.items()):
        if isinstance(hook, _PreHook):
            del target._forward_pre_hooks[key]
            getattr(target, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)


# ---------------------------------------------------------------------------------------------- patch
def coerce_config(config: Union[PSAConfig, str, "os.PathLike[str]", None]) -> PSAConfig:
    if config is None:
        return PSAConfig()
    if isinstance(config, os.PathLike) or (isinstance(config, str) and config.endswith(".json")):
        return PSAConfig.load(config)  # a saved (possibly per-layer) config
    if isinstance(config, str):
        return PSAConfig.preset(config)
    if not isinstance(config, PSAConfig):
        raise TypeError(
            f"config must be a PSAConfig, a preset name, a JSON config path or None, got {type(config).__name__}"
        )
    return config


def _coerce_layers(layers: Optional[Iterable[int]], n_layers: int) -> Optional[frozenset]:
    if layers is None:
        return None
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < n_layers):
            raise ValueError(f"layers must hold decoder layer indices in [0, {n_layers}), got {i!r}")
        out.append(i)
    return frozenset(out)


def _layers_text(layers: Optional[frozenset], n: int) -> str:
    return f"all {n} layers" if layers is None else f"layers {sorted(layers)} of {n}"


def _set_text_attention(text_model: torch.nn.Module, name: str, modules: List[torch.nn.Module]) -> None:
    """Select ``name`` for the language model only (its config; the layers share it), then check every layer.

    Written on the config directly, as ``PreTrainedModel.set_attn_implementation`` does after its checks: those
    checks would try to load a kernel for a name containing ``"flash"``.
    """
    text_model.config._attn_implementation_internal = name
    seen = {m.config._attn_implementation for m in modules}
    if seen != {name}:
        raise RuntimeError(
            f"could not switch the text attention to {name!r} (layers report {sorted(map(str, seen))}); "
            "this transformers version is not supported by psa_vlm"
        )


def _head_dim(modules: List[torch.nn.Module]) -> Optional[int]:
    hd = getattr(modules[0], "head_dim", None)
    return hd if isinstance(hd, int) else None


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def patch_model(
    model: Any,
    config: Union[PSAConfig, str, None],
    layers: Optional[Iterable[int]],
    backend: str,
    families: Sequence[Family],
    caller: str,
) -> Any:
    """The body of ``psa_vlm.patch`` and the per-family ``patch_*`` functions (see ``psa_vlm.patches.patch``)."""
    check_transformers()
    res = resolve(model, families, caller)
    cfg = coerce_config(config)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    modules = attention_modules(res)
    layer_set = _coerce_layers(layers, len(modules))
    beyond = [i for i in cfg.overridden_layers() if i >= len(modules)]
    if beyond:
        raise ValueError(
            f"config.layer_overrides names layer(s) {beyond} but the model has {len(modules)} decoder layers "
            f"(indices 0..{len(modules) - 1})"
        )
    for layer_cfg in [cfg] + [cfg.for_layer(i) for i in cfg.overridden_layers()]:
        check_config_for_backend(layer_cfg, backend, device=_device_of(res.text_model), head_dim=_head_dim(modules))
    text_model = res.text_model

    state: Optional[_PatchState] = getattr(text_model, "_psa_state", None)
    if state is not None:
        if (state.config, state.layers, state.backend) == (cfg, layer_set, backend):
            logger.debug("PSA: %s already patched with these settings; nothing changed", type(model).__name__)
            return model
        state.config, state.layers, state.backend = cfg, layer_set, backend
        logger.info("PSA settings of %s updated: %s, %s, backend=%s", type(model).__name__, describe(cfg),
                    _layers_text(layer_set, len(modules)), backend)
        return model

    current = text_model.config._attn_implementation or "sdpa"
    original = _original_of(current)
    if original is None:  # not loaded with a PSA name
        original = current
    name = register_attention(original)
    vision_impl = res.visual.config._attn_implementation if res.visual is not None else None

    state = _PatchState(config=cfg, backend=backend, layers=layer_set, original=original, name=name,
                        family=res.family.name, ids=res.ids, modules=modules)
    if current != name:
        _set_text_attention(text_model, name, modules)
    if res.visual is not None and res.visual.config._attn_implementation != vision_impl:  # internal invariant
        raise RuntimeError(f"vision attention changed to {res.visual.config._attn_implementation!r}; please report")
    for m in modules:
        m._psa_state = state
        m._psa_last = None
        m.extra_repr = _PSARepr(m)
    if res.hook_target is text_model:
        text_model.register_forward_pre_hook(_PreHook(state), with_kwargs=True)
    else:
        res.hook_target.register_forward_pre_hook(_PreHook(state, mask=False), with_kwargs=True)
        text_model.register_forward_pre_hook(_PreHook(state, types=False), with_kwargs=True)
    text_model._psa_state = state
    ids = res.ids
    types = (
        f"input_ids (visual spans {ids.span_start}..{ids.span_end}, placeholders {list(ids.placeholders)})"
        if ids.known else f"the text_tail rule ({cfg.text_tail})"
    )
    logger.info(
        "PSA on %s (%s): text attention %r -> %r (PSA for prefills of >= %d tokens on %s, original %s otherwise; "
        "%s, backend=%s); vision attention stays %r; token types from %s",
        type(model).__name__, res.family.name, current, name, max(cfg.min_seq_len, 2),
        _layers_text(layer_set, len(modules)), original, describe(cfg), backend, vision_impl, types,
    )
    return model


def unpatch_model(model: Any, families: Sequence[Family], caller: str) -> Any:
    """The body of ``psa_vlm.unpatch`` and the per-family ``unpatch_*`` functions."""
    check_transformers()
    res = resolve(model, families, caller)
    text_model = res.text_model
    state: Optional[_PatchState] = getattr(text_model, "_psa_state", None)
    modules = attention_modules(res)
    current = text_model.config._attn_implementation
    loaded_original = _original_of(current)
    if state is None and loaded_original is None:
        logger.debug("PSA: %s is not patched; nothing to undo", type(model).__name__)
        return model
    original = state.original if state is not None else loaded_original
    if current != original:
        _set_text_attention(text_model, original, modules)
    _remove_hooks(res.hook_target)
    _remove_hooks(text_model)
    for m in modules:
        for attr in ("_psa_state", "_psa_last", "extra_repr"):
            m.__dict__.pop(attr, None)
    text_model.__dict__.pop("_psa_state", None)
    logger.info("PSA removed from %s: text attention %r -> %r", type(model).__name__, current, original)
    return model


def _state_of(model: Any) -> Optional[_PatchState]:
    from . import FAMILIES

    try:
        res = resolve(model, FAMILIES, "psa_vlm")
    except TypeError:
        return None
    return getattr(res.text_model, "_psa_state", None)


def is_patched(model: Any, families: Optional[Sequence[Family]] = None) -> bool:
    """Whether the model's language model uses PSA (patched, or loaded with a PSA attention name)."""
    from . import FAMILIES

    try:
        res = resolve(model, families or FAMILIES, "psa_vlm")
    except TypeError:
        return False
    return hasattr(res.text_model, "_psa_state") or _original_of(res.text_model.config._attn_implementation) is not None


_LEVELS = ("full", "pool2", "pool4", "pool8", "skip")


def psa_stats(model: Any) -> Dict[str, Any]:
    """Density and level histogram of the last prefill, per layer and overall.

    The attention layers keep their statistics as device tensors (no host sync during the forward); this
    function converts them. Layers that ran the original attention in the last prefill (short input, excluded
    layer, fallback) are not listed.

    Args:
        model: A patched model of any supported family.

    Returns:
        ``{"layers": {layer_idx: {"density", "sparsity", "histogram", "batch", "lq", "lk", "dense_guard",
        "planned_density", "attend_backend"}}, "density": mean over the listed layers or None, "histogram": level
        fractions over all listed layers or None, "dense_guard_layers": how many layers the dense guard ran dense,
        "attend_backends": {engine: number of layers}}``; ``attend_backend`` is the engine of the layer's attend
        stage (``PSAPlan.attend_backend``: ``"fa4"``, ``"triton"`` or ``"reference"``; under ``backend="auto"``
        chosen per layer from its level mix), ``None`` where dense attention ran instead of an attend stage (the
        dense guard's shortcut before planning, the dense preset on FlashAttention-4's dense forward); histograms are
        fractions of the causally valid (head, query block, KV block) pairs at
        ``full``/``pool2``/``pool4``/``pool8``/``skip`` of the level map. Where the dense guard
        (``PSAConfig.dense_guard``) ran dense attention, ``dense_guard`` holds its reason and ``density`` is 1.0
        (the work done); ``planned_density`` is always the level map's.
    """
    from . import FAMILIES

    res = resolve(model, FAMILIES, "psa_stats")
    layers: Dict[int, Dict[str, Any]] = {}
    total = [0] * len(_LEVELS)
    for i, m in enumerate(attention_modules(res)):
        rec: Optional[_LayerRecord] = getattr(m, "_psa_last", None)
        if rec is None:
            continue
        counts = [int(c) for c in rec.histogram.tolist()]
        n = max(sum(counts), 1)
        planned = float(rec.density)
        density = 1.0 if rec.dense_reason else planned
        idx = getattr(m, "layer_idx", None)
        layers[i if idx is None else idx] = {
            "density": density,
            "sparsity": 1.0 - density,
            "histogram": {k: c / n for k, c in zip(_LEVELS, counts)},
            "batch": rec.batch,
            "lq": rec.lq,
            "lk": rec.lk,
            "dense_guard": rec.dense_reason,
            "planned_density": planned,
            "attend_backend": rec.attend_backend,
        }
        total = [t + c for t, c in zip(total, counts)]
    if not layers:
        return {"layers": {}, "density": None, "histogram": None, "dense_guard_layers": 0, "attend_backends": {}}
    n = max(sum(total), 1)
    engines = dict(Counter(v["attend_backend"] for v in layers.values() if v["attend_backend"] is not None))
    return {
        "layers": layers,
        "density": sum(v["density"] for v in layers.values()) / len(layers),
        "histogram": {k: c / n for k, c in zip(_LEVELS, total)},
        "dense_guard_layers": sum(1 for v in layers.values() if v["dense_guard"]),
        "attend_backends": engines,
    }
