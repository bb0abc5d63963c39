"""PSA configuration: one frozen, validated dataclass holding every knob of PSA_SPEC, plus named presets.

Example:
    >>> from psa_vlm import PSAConfig
    >>> cfg = PSAConfig.preset("paper")
    >>> cfg.block_q, cfg.thresholds
    (128, (0.7, 0.8, 0.9, 0.9))
    >>> PSAConfig.preset("quota-0.2").target_density()
    0.2
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

__all__ = ["PSAConfig", "PRESETS", "ALL_FACTORS"]

#: Every pooling factor PSA knows, full resolution first.
ALL_FACTORS: Tuple[int, ...] = (1, 2, 4, 8)

_MODES = ("threshold", "quota")

#: Values of ``PSAConfig.estimate_heads``.
_ESTIMATE_HEADS = ("query", "kv")

#: Fields added after format 1 and their defaults: ``to_dict`` leaves a field out while it has its default, so the
#: JSON of a config that does not use it (and the run signatures of ``eval-fidelity`` / ``eval-sweep``, which embed
#: ``to_dict``) stays what earlier versions wrote and read.
_LATER_FIELDS: Dict[str, Any] = {"estimate_heads": "query"}

#: Integer fields; NumPy integers and 0-d integer tensors are accepted and stored as ``int``.
_INT_FIELDS = ("block_q", "block_k", "stride", "min_seq_len", "text_tail", "sink_blocks")


def _scalar(value: Any) -> Any:
    """``value`` as a Python scalar if it is a NumPy scalar or a 0-d tensor (checked without importing either)."""
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", None) == 0 and getattr(value, "shape", None) == ():
        return item()
    return value


def _as_int(value: Any, name: str) -> int:
    """An integer (Python, NumPy or 0-d tensor) as ``int``; ``bool`` and floats are refused with ``TypeError``."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(v)


def _as_float(value: Any, name: str) -> float:
    """A real number (Python, NumPy or 0-d tensor) as ``float``; ``bool`` and non-numbers raise ``TypeError``."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must hold numbers, got {value!r} ({type(value).__name__})")
    return float(v)


def _as_bool(value: Any, name: str) -> bool:
    """A boolean (Python, NumPy or 0-d bool tensor) as ``bool``; anything else raises ``TypeError``."""
    v = _scalar(value)
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return v


def _quota_pyramid(density: float) -> Tuple[float, float, float, float]:
    """Quotas for factors (1, 2, 4, 8) whose FLOP-equivalent density is ``density``.

    Fractions ``d * (1/2, 1/2, 1/2, 1)`` give ``d/2 + d/4 + d/8 + d/8 = d`` and cover ``2.5 * d`` of the
    visible blocks (0.25 / 0.5 / 0.75 for density 0.1 / 0.2 / 0.3): the same cost as binary
    block-sparse attention at density ``d``, spread over two and a half times as many blocks.
    """
    return (density / 2, density / 2, density / 2, density)


@dataclass(frozen=True)
class PSAConfig:
    """Every knob of Pyramid Sparse Attention (PSA_SPEC sections 2-5).

    Attributes:
        block_q: Query block size ``bq`` (tokens). Multiple of ``stride``.
        block_k: KV block size ``bk`` (tokens). Multiple of ``stride`` and of the largest pooling factor.
        pool_factors: Pooling factors allowed besides full resolution, a subset of ``(2, 4, 8)``.
            ``()`` gives binary keep/drop block-sparse attention.
        mode: ``"threshold"`` (cumulative-mass rule, PSA_SPEC step 4) or ``"quota"`` (fixed fractions by rank).
        thresholds: ``(tau_1, tau_2, tau_4, tau_8)`` for factors (1, 2, 4, 8), non-decreasing in (0, 1].
            Only the entries of enabled factors are used; the tuple always has four entries.
        quotas: Fractions of the causally visible KV blocks of a row at factors (1, 2, 4, 8) (quota mode),
            each in [0, 1], summing to at most 1. Forced full-resolution blocks count against the factor-1 quota.
        stride: Antidiagonal stride ``s`` of the importance estimator (PSA_SPEC step 3): each reduced row
            scores ``s`` queries against groups of ``s`` keys. Its cost falls with ``s``: for causal inputs the
            estimator does ``1/(2*s)`` of dense attention's FLOPs (1/16 at the default 8, 1/32 at 16, 1/64 at 32)
            and its score matrix has ``(Lq/s) * (Lk/s)`` entries. Supported: any ``s`` dividing ``block_q`` and
            ``block_k``, on every backend; 4, 8, 16 and 32 are tested on the default 128 x 128 blocks. ``16`` and
            ``32`` are the cheaper estimators of issue #12 (coarser estimates, the same per-head semantics); their
            fidelity against 8 is measured in ``eval/results/FIDELITY.md`` ("Cheaper estimator: stride 16",
            "Cheaper estimators at the 7B group size"). Set it with ``PSAConfig.preset(name, stride=32)``,
            ``"stride": 32`` in a JSON config (``--psa-config``) or ``stride=32`` in the lmms-eval
            ``--model_args``.
        estimate_heads: Which heads the importance estimator (PSA_SPEC step 3) and the level assignment
            (steps 4-6) run on. ``"query"`` (default, the spec): one estimate and one level map per query head.
            ``"kv"`` (GQA-shared, the cheaper estimator of issue #12; opt-in): one estimate per KV head, computed
            from the mean of its group's ``G = Hq / Hkv`` query heads (averaged over heads per token, float32
            accumulation, rounded to the queries' dtype), assigned once per KV head and shared by every query
            head of the group. The estimator and the assignment do ``1/G`` of the work (1/7 for Qwen2.5-VL-7B:
            28 query / 4 KV heads); the attend stage is unchanged. Identical to ``"query"`` when ``G = 1``. The
            group's heads then read the same blocks at the same factors, however different their attention
            patterns: on synthetic video-like inputs whose 7 query heads per group are independent random
            projections (unfavourable to sharing) its attention error against dense attention is 24x that of
            ``"query"``, while ``stride=32`` costs 1.3-1.5x as much as it with 1.3x the error of ``"query"``
            (``eval/results/FIDELITY.md``, "Cheaper estimators at the 7B group size"). Set it with
            ``PSAConfig.preset(name, estimate_heads="kv")``, ``"estimate_heads": "kv"`` in a JSON config or
            ``estimate_heads=kv`` in the lmms-eval ``--model_args``.
        sim_thresholds: Similarity-cap thresholds for factors (2, 4, 8), or ``None`` to disable the cap.
        min_seq_len: Prefills with fewer query tokens than this run dense attention.
        text_tail: Without token types, the last ``text_tail`` tokens count as text.
        sink_blocks: Number of leading KV blocks always kept at full resolution (attention sink).
        dense: If true every causally visible block is full resolution (the ``"dense"`` preset): exact
            causal attention with no estimation.
        dense_guard: On the GPU backends, run dense attention instead of the sparse stage when the level map's
            predicted cost (``psa_vlm.cost``) is not below the fastest dense attention's (one host read of the
            level histogram per call; recorded in the plan and in ``psa_stats``). Where FlashAttention-4's dense
            forward is available, threshold-mode calls (e.g. ``paper``) shorter than
            ``psa_vlm.cost.THRESHOLD_MODE_MIN_TOKENS`` (24,576 tokens of ``psa_vlm.api.causal_equivalent_len``)
            run it before any planning (measured break-even on an H200). Not applied with a given level map, a key padding mask, or ``Lq < Lk`` on the
            Triton backend without FlashAttention-4.
        layer_overrides: Per-layer changes, ``{layer_idx: {field: value}}`` (any field but this one), or
            ``None``. Layer ``i`` runs ``for_layer(i)``: this config with layer ``i``'s changes applied; layers
            not named run this config as is. Stored normalised as a sorted tuple of
            ``(layer_idx, ((field, value), ...))`` so that the config stays hashable; ``save``/``load`` write
            and read it as a JSON object keyed by layer index. Example: ``{0: {"dense": True}}`` keeps the
            first decoder layer exact (the patch runs it through the dense path: every visible block at full
            resolution).

    Numbers are accepted as numbers: Python, NumPy scalars and 0-d tensors, stored as ``int`` / ``float``.
    ``bool`` is not a number here (``PSAConfig(block_q=True)`` raises ``TypeError``).

    Raises:
        TypeError: A field of the wrong type (a float or bool where an int is expected, a non-number in a
            tuple, a non-bool ``dense``); the message names the field.
        ValueError: A value out of range or inconsistent with another field; the message names the field.
    """

    block_q: int = 128
    block_k: int = 128
    pool_factors: Tuple[int, ...] = (2, 4, 8)
    mode: str = "threshold"
    thresholds: Tuple[float, float, float, float] = (0.70, 0.80, 0.90, 0.90)
    quotas: Optional[Tuple[float, float, float, float]] = None
    stride: int = 8
    estimate_heads: str = "query"
    sim_thresholds: Optional[Tuple[float, float, float]] = (0.75, 0.70, 0.70)
    min_seq_len: int = 4096
    text_tail: int = 512
    sink_blocks: int = 1
    dense: bool = False
    dense_guard: bool = True
    layer_overrides: Optional[Tuple[Tuple[int, Tuple[Tuple[str, Any], ...]], ...]] = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self._normalize_layer_overrides()
        # Normalise numbers and sequences first, so that configs built from lists (CLI, YAML), NumPy scalars or
        # 0-d tensors hash, compare and reach the kernels as plain Python ints and floats.
        for name in _INT_FIELDS:
            object.__setattr__(self, name, _as_int(getattr(self, name), f"PSAConfig.{name}"))
        for name in ("pool_factors", "thresholds", "quotas", "sim_thresholds"):
            val = getattr(self, name)
            if val is None:
                continue
            if isinstance(val, (str, bytes)) or not hasattr(val, "__iter__"):
                raise TypeError(f"PSAConfig.{name} must be a sequence of numbers, got {val!r}")
            items = list(val)
            if name == "pool_factors":
                items = [_as_int(x, f"PSAConfig.{name}") for x in items]
            else:
                items = [_as_float(x, f"PSAConfig.{name}") for x in items]
            object.__setattr__(self, name, tuple(items))
        object.__setattr__(self, "dense", _as_bool(self.dense, "PSAConfig.dense"))
        object.__setattr__(self, "dense_guard", _as_bool(self.dense_guard, "PSAConfig.dense_guard"))
        self._validate()
        self._validate_layer_overrides()

    def _validate(self) -> None:
        def check_int(name: str, minimum: int) -> None:
            val = getattr(self, name)
            if val < minimum:
                what = "a positive int" if minimum > 0 else "an int >= 0"
                raise ValueError(f"PSAConfig.{name} must be {what}, got {val!r}")

        for name in ("block_q", "block_k", "stride"):
            check_int(name, 1)
        for name in ("sink_blocks", "min_seq_len", "text_tail"):
            check_int(name, 0)
        if self.block_q % self.stride or self.block_k % self.stride:
            common = [s for s in (4, 8, 16, 32) if self.block_q % s == 0 and self.block_k % s == 0]
            raise ValueError(
                f"PSAConfig.stride={self.stride} must divide block_q={self.block_q} and block_k={self.block_k}"
                + (f" (e.g. {', '.join(map(str, common))})" if common else "")
            )
        if any(f not in (2, 4, 8) for f in self.pool_factors) or len(set(self.pool_factors)) != len(
            self.pool_factors
        ):
            raise ValueError(f"PSAConfig.pool_factors must be distinct values from (2, 4, 8), got {self.pool_factors!r}")
        if tuple(sorted(self.pool_factors)) != self.pool_factors:
            object.__setattr__(self, "pool_factors", tuple(sorted(self.pool_factors)))
        if self.pool_factors and self.block_k % max(self.pool_factors):
            raise ValueError(
                f"PSAConfig.block_k={self.block_k} must be a multiple of the largest pool factor {max(self.pool_factors)}"
            )
        if self.estimate_heads not in _ESTIMATE_HEADS:
            raise ValueError(
                f"PSAConfig.estimate_heads must be one of {_ESTIMATE_HEADS} ('query': one importance estimate per "
                f"query head, the default; 'kv': one per KV head from its query group's mean), got "
                f"{self.estimate_heads!r}"
            )
        if self.mode not in _MODES:
            raise ValueError(f"PSAConfig.mode must be one of {_MODES}, got {self.mode!r}")
        if len(self.thresholds) != 4:
            raise ValueError(
                f"PSAConfig.thresholds must be 4 numbers for factors (1, 2, 4, 8), got {self.thresholds!r}"
            )
        if any(not (0.0 < t <= 1.0) or math.isnan(t) for t in self.thresholds):
            raise ValueError(f"PSAConfig.thresholds must lie in (0, 1], got {self.thresholds!r}")
        if any(a > b for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"PSAConfig.thresholds must be non-decreasing, got {self.thresholds!r}")
        if self.mode == "quota":
            if self.quotas is None:
                raise ValueError("PSAConfig.quotas must be set (4 fractions for factors 1, 2, 4, 8) in quota mode")
        if self.quotas is not None:
            if len(self.quotas) != 4:
                raise ValueError(f"PSAConfig.quotas must be 4 numbers for factors (1, 2, 4, 8), got {self.quotas!r}")
            if any(not (0.0 <= t <= 1.0) or math.isnan(t) for t in self.quotas) or sum(self.quotas) > 1.0 + 1e-9:
                raise ValueError(f"PSAConfig.quotas must lie in [0, 1] and sum to at most 1, got {self.quotas!r}")
            for f, qv in zip(ALL_FACTORS[1:], self.quotas[1:]):
                if qv > 0 and f not in self.pool_factors:
                    raise ValueError(
                        f"PSAConfig.quotas gives factor {f} a share {qv} but {f} is not in pool_factors={self.pool_factors}"
                    )
        if self.sim_thresholds is not None:
            if len(self.sim_thresholds) != 3:
                raise ValueError(
                    f"PSAConfig.sim_thresholds must be 3 numbers for factors (2, 4, 8) or None, got {self.sim_thresholds!r}"
                )
            if any(not (-1.0 <= t <= 1.0) or math.isnan(t) for t in self.sim_thresholds):
                raise ValueError(f"PSAConfig.sim_thresholds must lie in [-1, 1], got {self.sim_thresholds!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def factors(self) -> Tuple[int, ...]:
        """All factors a block can get, full resolution included: ``(1,) + pool_factors``."""
        return (1,) + tuple(self.pool_factors)

    def replace(self, **changes) -> "PSAConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ per-layer configuration
    def _normalize_layer_overrides(self) -> None:
        """``{layer: {field: value}}`` (or its tuple form) -> sorted ``((layer, ((field, value), ...)), ...)``."""
        raw = self.layer_overrides
        if raw is None:
            return
        if isinstance(raw, Mapping):
            items = list(raw.items())
        else:
            try:
                items = [tuple(x) for x in raw]
            except TypeError:
                raise ValueError(
                    f"PSAConfig.layer_overrides must map layer indices to {{field: value}} dicts, got {raw!r}"
                ) from None
        out: Dict[int, Tuple[Tuple[str, Any], ...]] = {}
        for item in items:
            if len(item) != 2:
                raise ValueError(f"PSAConfig.layer_overrides entries must be (layer, overrides), got {item!r}")
            key, changes = item
            layer = key
            if isinstance(key, str) and key.strip().isdigit():  # JSON object keys are strings
                layer = int(key)
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"PSAConfig.layer_overrides keys must be layer indices >= 0, got {key!r}")
            if layer in out:
                raise ValueError(f"PSAConfig.layer_overrides names layer {layer} twice")
            pairs = list(changes.items()) if isinstance(changes, Mapping) else [tuple(x) for x in changes]
            fields = {}
            for name, value in pairs:
                if name == "layer_overrides" or name not in _FIELD_NAMES:
                    raise ValueError(
                        f"PSAConfig.layer_overrides[{layer}] has unknown field {name!r}; per-layer fields are "
                        f"{', '.join(n for n in _FIELD_NAMES if n != 'layer_overrides')}"
                    )
                if isinstance(value, list):  # JSON arrays -> tuples (hashable, as the fields store them)
                    value = tuple(value)
                fields[name] = value
            out[layer] = tuple(sorted(fields.items()))
        object.__setattr__(self, "layer_overrides", tuple(sorted(out.items())) or None)

    def _validate_layer_overrides(self) -> None:
        for layer, _ in self.layer_overrides or ():
            try:
                self.for_layer(layer)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"PSAConfig.layer_overrides[{layer}]: {exc}") from None

    def overridden_layers(self) -> Tuple[int, ...]:
        """Layer indices that ``layer_overrides`` names, ascending."""
        return tuple(layer for layer, _ in self.layer_overrides or ())

    def for_layer(self, layer_idx: Optional[int]) -> "PSAConfig":
        """The config decoder layer ``layer_idx`` runs: this one with that layer's overrides, no overrides left.

        Args:
            layer_idx: Decoder layer index (``None``: a layer without an index, which gets no overrides).

        Returns:
            A ``PSAConfig`` with ``layer_overrides=None`` (``self`` when there is nothing to strip).

        Raises:
            ValueError: The overrides make an invalid config (the message names the field).
        """
        if not self.layer_overrides:
            return self
        changes = dict(self.layer_overrides).get(layer_idx, ())
        return dataclasses.replace(self, layer_overrides=None, **dict(changes))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of every field (tuples as lists, ``layer_overrides`` keyed by layer index).

        A field added after format 1 (``estimate_heads``) appears only when it differs from its default, so that
        configs that do not use it keep the JSON earlier versions of psa_vlm read; ``from_dict`` fills it in.
        """
        out: Dict[str, Any] = {}
        for name in _FIELD_NAMES:
            val = getattr(self, name)
            if name in _LATER_FIELDS and val == _LATER_FIELDS[name]:
                continue
            if name == "layer_overrides":
                val = None if val is None else {
                    str(layer): {k: list(v) if isinstance(v, tuple) else v for k, v in changes}
                    for layer, changes in val
                }
            elif isinstance(val, tuple):
                val = list(val)
            out[name] = val
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PSAConfig":
        """Inverse of ``to_dict``. Missing fields keep their defaults, or those of ``data["preset"]`` if given.

        Args:
            data: ``{field: value}``, optionally ``"preset": name`` (the base whose fields the others override)
                and ``"format"`` (ignored). JSON lists become tuples.

        Raises:
            ValueError: Unknown keys, an unknown preset or invalid values (the message names them).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a PSAConfig dict must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        data.pop("format", None)
        preset = data.pop("preset", None)
        unknown = sorted(set(data) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown PSAConfig field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_FIELD_NAMES)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if preset is not None:
            return cls.preset(str(preset), **fields)
        return cls(**fields)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the config as JSON (``to_dict`` plus ``"format": 1``); ``PSAConfig.load`` reads it back."""
        text = json.dumps({"format": CONFIG_FORMAT, **self.to_dict()}, indent=1)
        # number lists on one line: [0.7, 0.8, 0.9, 0.9]
        text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
        with open(path, "w") as fh:
            fh.write(text + "\n")

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "PSAConfig":
        """Read a JSON config written by ``save`` (or by hand: any subset of fields, optionally ``"preset"``).

        Raises:
            FileNotFoundError: No such file.
            ValueError: Not JSON, or not a valid config (the message names the file and the problem).
        """
        with open(path) as fh:
            text = fh.read()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a JSON PSA config: {exc}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)!r}: {exc}") from None

    def target_density(self) -> Optional[float]:
        """FLOP-equivalent density the quotas aim at (quota mode), ``1.0`` for dense, else ``None``."""
        if self.dense:
            return 1.0
        if self.mode != "quota" or self.quotas is None:
            return None
        return round(sum(q / f for q, f in zip(self.quotas, ALL_FACTORS)), 10)

    @staticmethod
    def preset_names() -> Tuple[str, ...]:
        return tuple(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PSAConfig":
        """A named preset, optionally with fields overridden.

        Presets: ``paper`` (PSA_SPEC section 5), ``dense`` (every visible block full: exact causal attention),
        ``binary`` (keep/drop, same estimator and threshold rule, ``tau = 0.9``: keeps the blocks PSA keeps,
        all at full resolution), ``quota-0.1/0.2/0.3`` (pyramid levels at FLOP-equivalent density 0.1/0.2/0.3)
        and ``binary-0.1/0.2/0.3`` (keep/drop at the same densities).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown PSA preset {name!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[name]
        return base.replace(**overrides) if overrides else base


#: Field names of ``PSAConfig`` in declaration order.
_FIELD_NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PSAConfig))

#: Version of the JSON layout written by ``PSAConfig.save``.
CONFIG_FORMAT = 1


def _build_presets() -> dict:
    presets = {
        "paper": PSAConfig(),
        "dense": PSAConfig(dense=True, sim_thresholds=None),
        "binary": PSAConfig(pool_factors=(), thresholds=(0.90, 0.90, 0.90, 0.90), sim_thresholds=None),
    }
    for d in (0.1, 0.2, 0.3):
        # Quota presets exist to compare methods at a fixed cost: the similarity cap (which only raises
        # density) is off so that the measured density stays at the target.
        presets[f"quota-{d}"] = PSAConfig(mode="quota", quotas=_quota_pyramid(d), sim_thresholds=None)
        presets[f"binary-{d}"] = PSAConfig(
            mode="quota", pool_factors=(), quotas=(d, 0.0, 0.0, 0.0), sim_thresholds=None
        )
    return presets


#: Named presets (``PSAConfig.preset(name)``).
PRESETS = _build_presets()
