"""Pyramid Sparse Attention for the language model of Qwen2.5-VL, through transformers' attention interface.

``patch_qwen25vl(model)`` switches the *text* attention of a Qwen2.5-VL model to an attention function that
transformers registers under ``"psa"`` (``AttentionInterface`` and ``AttentionMaskInterface``); the vision
tower keeps its own implementation. No forward is rebound: the text config's ``_attn_implementation`` is
changed with ``set_attn_implementation`` on the language model, and a forward pre-hook on the model records
the prompt's token types. ``unpatch_qwen25vl(model)`` restores the original implementation.

Per call of a text attention layer:

* prefill with at least ``config.min_seq_len`` (and at least 2) query tokens, on an enabled layer: PSA
  (``psa_vlm.api.run_psa``) on the Q/K/V the layer computed (mRoPE applied, K/V un-repeated
  ``[B, Hkv, Lk, D]``, ``Lq <= Lk`` for a prefill onto a cache). Text tokens (everything but the
  config's video/image placeholder ids) are kept at full resolution; the padding in the 4-D mask becomes
  ``key_padding_mask``. Output ``[B, Lq, Hq, D]`` contiguous, weights ``None``, as sdpa's wrapper returns;
* anything else (decode steps, short inputs, disabled layers, static caches, sliding window, dropout in
  training): the model's original function (``sdpa`` or ``eager``) with the identical arguments, so the
  numerics are unchanged. The KV cache is filled by the model as usual (PSA never writes it).

Two names are registered: ``"psa"`` (dense fallback ``sdpa``, sdpa masks) and ``"psa_eager"`` (fallback
``eager``, additive masks); the patch picks the one matching the model's text attention. Loading with
``attn_implementation={"text_config": "psa", "vision_config": "sdpa"}`` works after ``register_attention()``
(importing ``psa_vlm.patches`` calls it); such a model runs PSA with the default config and the
``text_tail`` rule (no token types) until ``patch_qwen25vl`` is called on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from ..api import run_psa
from ..config import PRESETS, PSAConfig

__all__ = [
    "PSA_ATTENTION_NAME",
    "MIN_TRANSFORMERS",
    "register_attention",
    "patch_qwen25vl",
    "unpatch_qwen25vl",
    "is_patched",
    "psa_stats",
    "observe",
]

logger = logging.getLogger(__name__)

#: Name under which PSA (with an ``sdpa`` dense fallback) is registered in transformers' interfaces.
PSA_ATTENTION_NAME = "psa"

#: Lowest transformers version this patch supports (see ``_check_transformers``).
MIN_TRANSFORMERS = "5.0.0"

# registered name -> original (fallback) implementation, and back
_FALLBACK_OF: Dict[str, str] = {PSA_ATTENTION_NAME: "sdpa", f"{PSA_ATTENTION_NAME}_eager": "eager"}
_NAME_FOR: Dict[str, str] = {v: k for k, v in _FALLBACK_OF.items()}
_BACKENDS = ("auto", "triton", "reference")
_DEFAULT_CONFIG = PSAConfig()


# ---------------------------------------------------------------------------------------------- transformers
def _check_transformers() -> None:
    """Raise ``RuntimeError`` if the installed transformers lacks what the patch relies on."""
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
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
    except ImportError as exc:
        problems.append(f"missing {exc.name or exc}")
    else:
        if not hasattr(mq, "ALL_ATTENTION_FUNCTIONS") or not hasattr(mq, "Qwen2_5_VLTextModel"):
            problems.append("Qwen2.5-VL text attention does not go through ALL_ATTENTION_FUNCTIONS")
    if problems:
        raise RuntimeError(
            f"psa_vlm's Qwen2.5-VL patch needs transformers>={MIN_TRANSFORMERS} (Qwen2.5-VL text attention through "
            f"AttentionInterface, masks through AttentionMaskInterface); found transformers {version}: "
            f"{'; '.join(problems)}. Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


def _mask_fn_for(original: str) -> Callable:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[original]


def register_attention() -> str:
    """Register PSA in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Registers ``"psa"`` (dense fallback ``sdpa``) and ``"psa_eager"`` (dense fallback ``eager``); each name gets
    the mask function of its fallback, so the fallback receives exactly the masks it would get unpatched.
    After this, ``from_pretrained(..., attn_implementation={"text_config": "psa", "vision_config": "sdpa"})``
    works.

    Returns:
        The main name, ``"psa"``.

    Raises:
        RuntimeError: The installed transformers is too old (see ``MIN_TRANSFORMERS``).
    """
    _check_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, original in _FALLBACK_OF.items():
        AttentionInterface.register(name, _make_attention_forward(original))
        AttentionMaskInterface.register(name, _mask_fn_for(original))
    return PSA_ATTENTION_NAME


def _is_registered() -> bool:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return all(n in ALL_ATTENTION_FUNCTIONS and n in ALL_MASK_ATTENTION_FUNCTIONS for n in _FALLBACK_OF)


def _fallback_function(module: torch.nn.Module, original: str) -> Callable:
    """The function the unpatched layer would call for ``original`` (``eager``: its modeling file's own)."""
    if original == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:  # pragma: no cover - every Qwen2.5-VL modeling file defines it
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward as fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


# ---------------------------------------------------------------------------------------------- state
@dataclass
class _LayerRecord:
    """Statistics of one layer's last PSA prefill, kept as device tensors until ``psa_stats`` reads them."""

    density: torch.Tensor  # 0-d float32
    histogram: torch.Tensor  # int64 [5]: factors 1, 2, 4, 8, skipped
    batch: int
    lq: int
    lk: int


@dataclass
class _PatchState:
    """Per-model PSA state (kept on the language model as ``_psa_state``; patched layers point to it)."""

    config: PSAConfig
    backend: str
    layers: Optional[frozenset]  # None: all layers
    original: str  # text attention implementation before patching
    name: str  # registered PSA name in use
    visual_ids: Optional[Tuple[int, ...]]  # placeholder token ids; None: unknown (text_tail rule)
    modules: List[torch.nn.Module] = field(default_factory=list, repr=False)
    hook: Any = field(default=None, repr=False)
    hook_owner: Optional[str] = None
    # runtime, rewritten on every forward of the hooked model
    token_types: Optional[torch.Tensor] = field(default=None, repr=False)  # int8 [B, L]: 0 text, 1 visual
    types_by_device: Dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)
    dense_reason: Optional[str] = None  # set when this forward cannot use PSA (e.g. a static cache)
    warned: set = field(default_factory=set, repr=False)
    layer_configs: Dict[Any, PSAConfig] = field(default_factory=dict, repr=False)
    observers: List[Callable] = field(default_factory=list, repr=False)  # see ``observe``

    def enabled(self, layer_idx: Optional[int]) -> bool:
        return self.layers is None or layer_idx in self.layers

    def config_for(self, layer_idx: Optional[int]) -> PSAConfig:
        """The config layer ``layer_idx`` runs: ``config.for_layer(layer_idx)`` (its per-layer overrides)."""
        if not self.config.layer_overrides:
            return self.config
        key = (self.config, layer_idx)
        cfg = self.layer_configs.get(key)
        if cfg is None:
            if len(self.layer_configs) > 256:  # configs replaced many times: start over
                self.layer_configs.clear()
            cfg = self.layer_configs[key] = self.config.for_layer(layer_idx)
        return cfg

    def token_types_on(self, device: torch.device, batch: int, lk: int) -> Optional[torch.Tensor]:
        tt = self.token_types
        if tt is None or tuple(tt.shape) != (batch, lk):
            return None
        cached = self.types_by_device.get(device)
        if cached is None:
            cached = tt.to(device, non_blocking=True)
            self.types_by_device[device] = cached
        return cached

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(msg, *args)


def _describe(config: PSAConfig) -> str:
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


def _psa_extra_repr(self: torch.nn.Module) -> str:
    state: Optional[_PatchState] = getattr(self, "_psa_state", None)
    if state is None:
        return ""
    if not state.enabled(getattr(self, "layer_idx", None)):
        return f"psa=off (dense {state.original})"
    return (
        f"psa=on ({_describe(state.config)}; prefill >= {max(state.config.min_seq_len, 2)} tokens; "
        f"backend={state.backend}; dense fallback={state.original})"
    )


# ---------------------------------------------------------------------------------------------- attention
def _key_padding_mask(mask: Any, batch: int, lk: int, device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """``(key_padding_mask [B, Lk] bool or None, reason-not-supported or None)`` from the interface's mask.

    transformers' causal masks combine causality and key padding; the last query row sees every key that is not
    padding, so that row is the key padding mask (bool masks: ``True`` = attend; additive masks: ``0`` = attend).
    """
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        return None, f"attention mask of type {type(mask).__name__}"
    if mask.dim() == 4:
        row = mask[:, 0, -1, :]
    elif mask.dim() == 2:
        row = mask
    else:
        return None, f"attention mask of shape {tuple(mask.shape)}"
    if row.shape[-1] != lk or row.shape[0] not in (1, batch):
        return None, f"attention mask of shape {tuple(mask.shape)} for {lk} keys"
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2 if row.dtype.is_floating_point else row != 0
    if row.shape[0] != batch:
        row = row.expand(batch, lk)
    return row.to(device, non_blocking=True), None


def _make_attention_forward(original: str) -> Callable:
    """The function registered in ``AttentionInterface``: PSA for long prefills, ``original`` otherwise."""

    def psa_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        *args: Any,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """PSA attention with the interface's signature.

        Args:
            module: The calling ``Qwen2_5_VLAttention``.
            query: ``[B, Hq, Lq, D]`` after mRoPE.
            key, value: ``[B, Hkv, Lk, D]`` (the whole cache for a prefill onto a cache).
            attention_mask: The mask built by the fallback's mask function (or ``None``).
            *args, **kwargs: Passed to the fallback unchanged (``scaling``, ``dropout``, ...).

        Returns:
            ``(out [B, Lq, Hq, D] contiguous, None)``; the fallback's own return value otherwise.
        """
        state: Optional[_PatchState] = getattr(module, "_psa_state", None)
        layer_idx = getattr(module, "layer_idx", None)
        config = state.config_for(layer_idx) if state is not None else _DEFAULT_CONFIG
        lq = query.shape[2]
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if (
            lq < max(config.min_seq_len, 2)
            or args
            or not is_causal  # PSA is causal only: e.g. the vision tower's attention always runs the original
            or (state is not None and (not state.enabled(layer_idx) or state.dense_reason is not None))
        ):
            if state is not None and state.dense_reason is not None and lq >= max(config.min_seq_len, 2):
                state.warn_once(state.dense_reason, "PSA: dense %s attention for this prefill: %s", original,
                                state.dense_reason)
            return _fallback_function(module, original)(module, query, key, value, attention_mask, *args, **kwargs)

        B, Hq, _, D = query.shape
        lk = key.shape[2]
        reason = None
        if kwargs.get("sliding_window") is not None:
            reason = "sliding-window layers are not supported by PSA"
        elif module.training and kwargs.get("dropout", 0.0):
            reason = "attention dropout (training) is not supported by PSA"
        elif kwargs.get("softcap") is not None:
            reason = "logit softcapping is not supported by PSA"
        elif lq > lk:
            reason = f"more queries ({lq}) than keys ({lk})"
        kpm = None
        if reason is None:
            kpm, reason = _key_padding_mask(attention_mask, B, lk, query.device)
        if reason is not None:
            if state is not None:
                state.warn_once(reason, "PSA: dense %s attention instead: %s", original, reason)
            else:
                logger.warning("PSA: dense %s attention instead: %s", original, reason)
            return _fallback_function(module, original)(module, query, key, value, attention_mask, *args, **kwargs)

        token_types = state.token_types_on(query.device, B, lk) if state is not None else None
        backend = state.backend if state is not None else "auto"
        out = query.new_empty(B, lq, Hq, D)
        o, plan = run_psa(
            query,
            key,
            value,
            config,
            scale=kwargs.get("scaling"),
            key_padding_mask=kpm,
            token_types=token_types,
            backend=backend,
            out=out.transpose(1, 2),
        )
        if o is not None and o.data_ptr() != out.data_ptr():  # a backend that ignored ``out``
            out.copy_(o.transpose(1, 2))
        lm = plan.level_map
        module._psa_last = _LayerRecord(lm.density_tensor(), lm.histogram_tensor(), B, lq, lk)
        if state is not None and state.observers:
            dense_cache: List[torch.Tensor] = []

            def dense_out() -> torch.Tensor:
                if not dense_cache:
                    o_dense, _ = _fallback_function(module, original)(
                        module, query, key, value, attention_mask, *args, **kwargs
                    )
                    dense_cache.append(o_dense)
                return dense_cache[0]

            for fn in list(state.observers):
                fn(layer_idx, out, dense_out, plan)
        return out, None

    psa_attention_forward.__qualname__ = f"psa_attention_forward[{original}]"
    psa_attention_forward.psa_fallback = original  # type: ignore[attr-defined]
    return psa_attention_forward


# ---------------------------------------------------------------------------------------------- token types
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


def _make_pre_hook(state: _PatchState) -> Callable:
    def psa_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past, state.dense_reason = _past_length(cache)
        state.types_by_device = {}
        if input_ids is not None and input_ids.dim() == 2:
            n_new = input_ids.shape[1]
        elif embeds is not None:
            n_new = embeds.shape[1]
            input_ids = None
        else:
            return
        if n_new > 1:  # a prefill: the statistics describe the last prefill only
            for m in state.modules:
                m._psa_last = None
        if input_ids is None or state.visual_ids is None or past is None:
            state.token_types = None  # unknown from here on: the text_tail rule applies
            return
        # comparisons with Python ints: no host-to-device copy (that would synchronise on CUDA)
        visual = input_ids == state.visual_ids[0]
        for token_id in state.visual_ids[1:]:
            visual = visual | (input_ids == token_id)
        new = visual.to(torch.int8)
        if past == 0:
            state.token_types = new
        elif state.token_types is not None and tuple(state.token_types.shape) == (new.shape[0], past):
            state.token_types = torch.cat([state.token_types, new], dim=1)
        else:
            state.token_types = None

    return psa_pre_hook


# ---------------------------------------------------------------------------------------------- patch
def _qwen_classes():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    return mq.Qwen2_5_VLForConditionalGeneration, mq.Qwen2_5_VLModel, mq.Qwen2_5_VLTextModel, mq.Qwen2_5_VLAttention


def _resolve(model: Any) -> Tuple[torch.nn.Module, torch.nn.Module, Optional[Tuple[int, ...]]]:
    """``(language model, module to hook, visual placeholder ids)`` for a supported model, else ``TypeError``."""
    cg_cls, vl_cls, text_cls, _ = _qwen_classes()
    if isinstance(model, cg_cls):
        vl = model.model
    elif isinstance(model, vl_cls):
        vl = model
    elif isinstance(model, text_cls):
        ids = tuple(
            i for i in (getattr(model.config, "video_token_id", None), getattr(model.config, "image_token_id", None))
            if isinstance(i, int)
        )
        return model, model, ids or None
    else:
        raise TypeError(
            "patch_qwen25vl supports Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel and Qwen2_5_VLTextModel; "
            f"got {type(model).__module__}.{type(model).__name__}"
        )
    ids = tuple(i for i in (vl.config.video_token_id, vl.config.image_token_id) if isinstance(i, int))
    return vl.language_model, vl, ids or None


def _attention_modules(text_model: torch.nn.Module) -> List[torch.nn.Module]:
    attn_cls = _qwen_classes()[3]
    mods = [m for m in text_model.modules() if isinstance(m, attn_cls)]
    if not mods:
        raise TypeError(f"{type(text_model).__name__} has no Qwen2_5_VLAttention layers to patch")
    return mods


def _set_text_attention(text_model: torch.nn.Module, name: str, modules: List[torch.nn.Module]) -> None:
    """Select ``name`` for the language model only (its config), then check every layer sees it."""
    text_model.set_attn_implementation(name)
    seen = {m.config._attn_implementation for m in modules}
    if seen != {name}:
        raise RuntimeError(
            f"could not switch the Qwen2.5-VL text attention to {name!r} (layers report {sorted(map(str, seen))}); "
            "this transformers version is not supported by psa_vlm"
        )


def _coerce_config(config: Union[PSAConfig, str, "os.PathLike[str]", None]) -> PSAConfig:
    if config is None:
        return PSAConfig()
    if isinstance(config, os.PathLike) or (isinstance(config, str) and config.endswith(".json")):
        return PSAConfig.load(config)
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
    if layers is None:
        return f"all {n} layers"
    return f"layers {sorted(layers)} of {n}"


def patch_qwen25vl(
    model: Any,
    config: Union[PSAConfig, str, None] = None,
    *,
    layers: Optional[Iterable[int]] = None,
    backend: str = "auto",
) -> Any:
    """Make a Qwen2.5-VL model use Pyramid Sparse Attention for long prefills of its language model.

    The text config's attention implementation becomes ``"psa"`` (``"psa_eager"`` for an eager model): prefills
    with at least ``config.min_seq_len`` query tokens run PSA, everything else runs the original function with
    the same arguments. The vision tower is untouched. Patching again with the same arguments changes nothing;
    with other arguments the settings are updated in place.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2_5_VLModel`` or ``Qwen2_5_VLTextModel``.
        config: ``PSAConfig``, preset name, or path of a JSON config (``PSAConfig.load``; default: the
            ``"paper"`` preset). Its ``layer_overrides`` apply per decoder layer (``config.for_layer(i)``).
        layers: Decoder layer indices that use PSA (default: all); the others stay dense.
        backend: ``"auto"`` (Triton on CUDA, the PyTorch reference on the CPU), ``"triton"`` or ``"reference"``.

    Returns:
        The same ``model``, patched in place.

    Raises:
        TypeError: ``model`` is not a Qwen2.5-VL model, or ``config`` has the wrong type.
        ValueError: Bad ``layers`` / ``backend``, or ``layer_overrides`` naming a layer the model lacks.
        NotImplementedError: The text attention is neither ``sdpa`` nor ``eager`` (e.g. flash_attention_2).
        RuntimeError: Unsupported transformers version.

    Example:
        >>> model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
        >>> psa_vlm.patch_qwen25vl(model, "paper")  # doctest: +SKIP
    """
    _check_transformers()
    text_model, hook_target, visual_ids = _resolve(model)
    cfg = _coerce_config(config)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    modules = _attention_modules(text_model)
    layer_set = _coerce_layers(layers, len(modules))
    beyond = [i for i in cfg.overridden_layers() if i >= len(modules)]
    if beyond:
        raise ValueError(
            f"config.layer_overrides names layer(s) {beyond} but the model has {len(modules)} decoder layers "
            f"(indices 0..{len(modules) - 1})"
        )
    if not _is_registered():
        register_attention()

    state: Optional[_PatchState] = getattr(text_model, "_psa_state", None)
    if state is not None:
        if (state.config, state.layers, state.backend) == (cfg, layer_set, backend):
            logger.debug("PSA: %s already patched with these settings; nothing changed", type(model).__name__)
            return model
        state.config, state.layers, state.backend = cfg, layer_set, backend
        logger.info(
            "PSA settings of %s updated: %s, %s, backend=%s",
            type(model).__name__, _describe(cfg), _layers_text(layer_set, len(modules)), backend,
        )
        return model

    current = text_model.config._attn_implementation
    if current in _FALLBACK_OF:  # loaded with attn_implementation="psa": keep it, add state and hook
        original, name = _FALLBACK_OF[current], current
    elif current in _NAME_FOR:
        original, name = current, _NAME_FOR[current]
    else:
        raise NotImplementedError(
            f"PSA's dense fallback supports Qwen2.5-VL text attention 'sdpa' or 'eager', but this model uses "
            f"{current!r}; load it with attn_implementation={{'text_config': 'sdpa', 'vision_config': ...}}"
        )
    vision_impl = None
    visual = getattr(hook_target, "visual", None)
    if visual is not None:
        vision_impl = visual.config._attn_implementation

    state = _PatchState(config=cfg, backend=backend, layers=layer_set, original=original, name=name,
                        visual_ids=visual_ids, modules=modules)
    if current != name:
        _set_text_attention(text_model, name, modules)
    if visual is not None and visual.config._attn_implementation != vision_impl:  # internal invariant
        raise RuntimeError(f"vision attention changed to {visual.config._attn_implementation!r}; please report")
    for m in modules:
        m._psa_state = state
        m._psa_last = None
        m.extra_repr = types.MethodType(_psa_extra_repr, m)
    state.hook = hook_target.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True)
    state.hook_owner = type(hook_target).__name__
    text_model._psa_state = state
    logger.info(
        "PSA on %s: text attention %r -> %r (PSA for prefills of >= %d tokens on %s, dense %s otherwise; %s, "
        "backend=%s); vision attention stays %r; token types from %s",
        type(model).__name__, current, name, max(cfg.min_seq_len, 2), _layers_text(layer_set, len(modules)),
        original, _describe(cfg), backend, vision_impl,
        f"input_ids (placeholder ids {list(visual_ids)})" if visual_ids else f"the text_tail rule ({cfg.text_tail})",
    )
    return model


def unpatch_qwen25vl(model: Any) -> Any:
    """Undo ``patch_qwen25vl``: the original text attention, no hook, no PSA attributes (no-op if unpatched).

    Args:
        model: A model ``patch_qwen25vl`` accepts.

    Returns:
        The same ``model``.
    """
    _check_transformers()
    text_model, _, _ = _resolve(model)
    state: Optional[_PatchState] = getattr(text_model, "_psa_state", None)
    modules = _attention_modules(text_model)
    current = text_model.config._attn_implementation
    if state is None and current not in _FALLBACK_OF:
        logger.debug("PSA: %s is not patched; nothing to undo", type(model).__name__)
        return model
    original = state.original if state is not None else _FALLBACK_OF[current]
    if current != original:
        _set_text_attention(text_model, original, modules)
    if state is not None:
        if state.hook is not None:
            state.hook.remove()
        state.token_types = None
        state.types_by_device = {}
    for m in modules:
        for attr in ("_psa_state", "_psa_last", "extra_repr"):
            m.__dict__.pop(attr, None)
    text_model.__dict__.pop("_psa_state", None)
    logger.info("PSA removed from %s: text attention %r -> %r", type(model).__name__, current, original)
    return model


@contextlib.contextmanager
def observe(model: Any, fn: Callable) -> Iterator[None]:
    """Call ``fn`` after every PSA layer run of ``model`` inside the ``with`` block (no effect on outputs).

    ``fn(layer_idx, psa_out, dense_out, plan)`` gets the decoder layer index, PSA's output ``[B, Lq, Hq, D]``
    (as the layer returns it), ``dense_out()`` which computes the original attention function (``sdpa`` or
    ``eager``) on the same query/key/value/mask and returns ``[B, Lq, Hq, D]`` (computed once, on first call),
    and the layer's ``PSAPlan``. Layers that run dense (short inputs, decode steps, fallbacks) are not
    reported. Used to measure PSA's per-layer error on a model's own activations without a second model.

    Raises:
        ValueError: ``model`` is not patched (``patch_qwen25vl`` first).
    """
    text_model, _, _ = _resolve(model)
    state: Optional[_PatchState] = getattr(text_model, "_psa_state", None)
    if state is None:
        raise ValueError("observe needs a model patched with patch_qwen25vl; patch it first")
    state.observers.append(fn)
    try:
        yield
    finally:
        state.observers.remove(fn)


def is_patched(model: Any) -> bool:
    """Whether the model's language model uses PSA (patched, or loaded with a PSA attention name)."""
    try:
        text_model, _, _ = _resolve(model)
    except TypeError:
        return False
    return hasattr(text_model, "_psa_state") or text_model.config._attn_implementation in _FALLBACK_OF


_LEVELS = ("full", "pool2", "pool4", "pool8", "skip")


def psa_stats(model: Any) -> Dict[str, Any]:
    """Density and level histogram of the last prefill, per layer and overall.

    The attention layers keep their statistics as device tensors (no host sync during the forward); this
    function converts them. Layers that ran dense attention in the last prefill (short input, excluded layer,
    fallback) are not listed.

    Args:
        model: A patched model (or one loaded with a PSA attention name).

    Returns:
        ``{"layers": {layer_idx: {"density", "sparsity", "histogram", "batch", "lq", "lk"}}, "density": mean
        over the listed layers or None, "histogram": level fractions over all listed layers or None}``;
        histograms are fractions of the causally valid (head, query block, KV block) pairs at
        ``full``/``pool2``/``pool4``/``pool8``/``skip``.
    """
    text_model, _, _ = _resolve(model)
    layers: Dict[int, Dict[str, Any]] = {}
    total = [0] * len(_LEVELS)
    for i, m in enumerate(_attention_modules(text_model)):
        rec: Optional[_LayerRecord] = getattr(m, "_psa_last", None)
        if rec is None:
            continue
        counts = [int(c) for c in rec.histogram.tolist()]
        n = max(sum(counts), 1)
        density = float(rec.density)
        idx = getattr(m, "layer_idx", None)
        layers[i if idx is None else idx] = {
            "density": density,
            "sparsity": 1.0 - density,
            "histogram": {k: c / n for k, c in zip(_LEVELS, counts)},
            "batch": rec.batch,
            "lq": rec.lq,
            "lk": rec.lk,
        }
        total = [t + c for t, c in zip(total, counts)]
    if not layers:
        return {"layers": {}, "density": None, "histogram": None}
    n = max(sum(total), 1)
    return {
        "layers": layers,
        "density": sum(v["density"] for v in layers.values()) / len(layers),
        "histogram": {k: c / n for k, c in zip(_LEVELS, total)},
    }
