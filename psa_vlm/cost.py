"""Cost model of the sparse attention stage against the fastest dense attention, for the dense guard.

After level assignment PSA knows how many (head, query block, KV block) pairs it will read at each factor. The
attention stage then costs, relative to the fastest dense causal attention available for the same call,

    ratio = overhead + sum_p c_p * f_p / p

where ``f_p`` is the fraction of causally visible pairs at factor ``p`` (``LevelMap.histogram_tensor``) and
``c_p`` the measured time per unit of FLOP density at that factor (1.0 would be the ideal ``density x dense``).
When ``ratio >= 1`` the sparse stage would be slower than dense attention, so ``psa_attention`` runs dense
attention instead (``PSAConfig.dense_guard``) and says so in its plan and in ``psa_stats``.

The constants are calibrated from ``psa-vlm bench-attention`` on an NVIDIA H200 (bf16, Hq 28 / Hkv 4,
D 128, 64k-128k tokens; ``eval/results/attention.md``): per-level block-sparse launches for the ``fa4``
backend against FlashAttention-4's dense forward, the Triton kernel's pyramid lists against cuDNN SDPA.
They are conservative where the measurements spread (the guard only has to be right near ratio 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

__all__ = [
    "AttendCost", "ATTEND_COSTS", "AUTO_FA4_MIN_TOKENS", "THRESHOLD_MODE_MIN_TOKENS", "attend_cost_ratio",
    "quota_cost_ratio", "dense_guard_reason", "short_prompt_reason", "EngineTime", "ENGINE_TIMES",
    "predict_attend_ms", "faster_attend_backend", "config_histogram",
]

#: ``backend="auto"`` runs the attend stage on FlashAttention-4 only from this many tokens
#: (``api.causal_equivalent_len``); shorter calls keep the Triton kernel. FlashAttention-4's form pays a fixed
#: cost per call (four level launches from Python, the list split and the merge of four partials). H200,
#: bench-attention, video inputs, whole call (fa4 / Triton attend stage, same planning; commit 2023a36): 16k
#: quota-0.2 2.96 / 2.10 ms, paper 4.64 / 2.94; 32k quota-0.2 5.70 / 5.91, paper 5.08 / 4.26; 64k quota-0.2
#: 19.36 / 20.43, paper 10.56 / 8.93 (docs/PERFORMANCE.md). A length-only compromise: Triton wins clearly at 16k
#: and for low-density plans at every measured length, fa4 by 4-5% for quota-0.2 from 32k; nothing was measured
#: between 32k and 64k. Used only where the plan's level mix is not known on the host (a threshold-mode call
#: without the dense guard or under ``plan_only``, a caller's level map); otherwise ``faster_attend_backend``
#: decides by the mix.
AUTO_FA4_MIN_TOKENS = 49152

#: With FlashAttention-4's dense forward available (the fastest dense attention on Hopper), threshold-mode
#: configs (``paper``: the density depends on the input, known only after planning and one host read) run
#: dense attention below this many tokens (``api.causal_equivalent_len``) when ``PSAConfig.dense_guard`` is on,
#: before any planning: the planning stages and the host read cost more than the sparse stage saves there.
#: H200 (commit 2023a36), paper
#: against FlashAttention-4 dense: bench-attention 16k 0.61x (fa4 attend) / 0.96x (Triton attend), 20k 1.36x,
#: 24k 1.33x; bench-prefill (28 layers, density 0.50-0.56) 16k 0.96x, 24k 1.02x, 32k 1.03x.
THRESHOLD_MODE_MIN_TOKENS = 24576


@dataclass(frozen=True)
class AttendCost:
    """Time of the sparse attention stage relative to the fastest dense attention (module docstring).

    Attributes:
        overhead: Fixed share (list splitting, merge of the level partials, launch latency).
        per_factor: ``c_p`` for factors 1, 2, 4, 8: time per unit of FLOP density at that factor.
        dense: What "fastest dense" means for this backend (for messages).
    """

    overhead: float
    per_factor: Tuple[float, float, float, float]
    dense: str


#: Per backend. ``fa4``: level launches on FlashAttention-4 against its dense forward; ``triton``: the Triton
#: kernel against cuDNN SDPA (H200 measurements, module docstring).
ATTEND_COSTS: Dict[str, AttendCost] = {
    # H200, 64k / 128k, quota-0.2 and binary-0.2 level launches vs FlashAttention-4 dense (42.3 / 170.9 ms):
    # factor 1: 1.12-1.29, factor 2: 1.22-1.29, factor 4: 1.68-1.84, factor 8: 2.59-2.78; split + merge
    # 1.6-2.6% (benchmarks/devcheck_fa4.py, 2026-11-29)
    "fa4": AttendCost(overhead=0.025, per_factor=(1.25, 1.3, 1.85, 2.8), dense="FlashAttention-4 dense"),
    # H200, 64k / 128k: binary lists 1.28-1.39, pyramid lists 1.36-1.56 of density x cuDNN dense
    "triton": AttendCost(overhead=0.0, per_factor=(1.4, 1.6, 1.6, 1.6), dense="cuDNN SDPA"),
}


def _counts(histogram: Sequence[float]) -> list:
    """``histogram`` as 5 floats (factors 1, 2, 4, 8, skip); ``ValueError`` naming it when malformed."""
    h = [float(x) for x in histogram]
    if len(h) != 5 or any(x < 0 for x in h):
        raise ValueError(f"histogram must hold 5 non-negative counts (factors 1, 2, 4, 8, skip), got {histogram!r}")
    return h


def attend_cost_ratio(backend: str, histogram: Sequence[float]) -> Optional[float]:
    """Predicted ``sparse attention time / fastest dense time``, or ``None`` without a model for ``backend``.

    Args:
        backend: ``"fa4"`` or ``"triton"`` (others have no model).
        histogram: Counts (or fractions) of visible pairs at factors 1, 2, 4, 8 and skipped, as
            ``LevelMap.histogram_tensor`` returns them.

    Returns:
        The ratio (``< 1``: the sparse stage is predicted faster than dense).
    """
    model = ATTEND_COSTS.get(backend)
    if model is None:
        return None
    h = _counts(histogram)
    total = sum(h)
    if total <= 0:
        return 0.0
    work = sum(c * x / p for c, x, p in zip(model.per_factor, h[:4], (1, 2, 4, 8)))
    return model.overhead + work / total


def dense_guard_reason(backend: str, histogram: Sequence[float], against: Optional[str] = None) -> Optional[str]:
    """Why dense attention is the faster choice for this level histogram, or ``None`` if PSA's is.

    Args:
        backend: The attention backend that would run the sparse stage.
        histogram: As in ``attend_cost_ratio``.
        against: Name of the dense attention that runs instead, for the message (default: the one ``backend``'s
            cost model is relative to).
    """
    ratio = attend_cost_ratio(backend, histogram)
    if ratio is None or ratio < 1.0:
        return None
    h = _counts(histogram)
    density = sum(x / p for x, p in zip(h[:4], (1, 2, 4, 8))) / max(sum(h), 1.0)
    return (
        f"density {density:.3f}: the {backend} sparse stage is predicted at {ratio:.2f}x the time of "
        f"{ATTEND_COSTS[backend].dense}, so dense attention ({against or ATTEND_COSTS[backend].dense}) ran"
    )


def quota_cost_ratio(backend: str, config) -> float:
    """``attend_cost_ratio`` of a quota-mode config's own level mix (its quotas as the histogram), or ``inf``.

    ``inf`` for threshold mode (its mix depends on the input) and for backends without a model. Forced blocks
    (sink, diagonal, text) only move a quota mix towards full resolution, by a few percent of the visible blocks
    at long lengths; callers compare against a margin below 1.
    """
    mix = config_histogram(config)
    ratio = None if mix is None else attend_cost_ratio(backend, mix)
    return float("inf") if ratio is None else ratio


def short_prompt_reason(backend: str, mode: str, seq_len: int) -> Optional[str]:
    """Why a call runs dense attention before any planning, or ``None`` (``THRESHOLD_MODE_MIN_TOKENS``).

    Args:
        backend: The resolved backend (``"fa4"``: FlashAttention-4's dense forward is the dense path; the caller
            checks that it supports the call). Other backends never take this shortcut.
        mode: ``PSAConfig.mode``; quota mode (a fixed level mix, no host read) keeps the sparse path.
        seq_len: Tokens of the call, as a square causal call (``api.causal_equivalent_len``).
    """
    if backend != "fa4" or mode != "threshold" or seq_len >= THRESHOLD_MODE_MIN_TOKENS:
        return None
    return (
        f"prompt of {seq_len} tokens: threshold-mode PSA does not beat FlashAttention-4 dense below "
        f"{THRESHOLD_MODE_MIN_TOKENS} tokens (psa_vlm.cost.THRESHOLD_MODE_MIN_TOKENS), so dense attention ran"
    )


# ---------------------------------------------------------------------------------------------- engine choice
@dataclass(frozen=True)
class EngineTime:
    """Absolute time model of one attend-stage engine (``predict_attend_ms``).

    Attributes:
        per_factor: ms per ms of cuDNN dense attention, per unit of FLOP density at factors 1, 2, 4, 8.
        fixed_ms: Per-call cost independent of the size (launches from Python, tail effects).
        ms_per_gelem: Per-call cost per 10^9 output elements ``B * Lq * Hq * D`` (fa4: the level partials
            written and read back by the merge, the list split).
    """

    per_factor: Tuple[float, float, float, float]
    fixed_ms: float
    ms_per_gelem: float


#: cuDNN SDPA's causal forward rate on an H200, bf16, D 128 (47.5 ms at 64k, Hq 28: 649 TFLOP/s); the unit of
#: ``EngineTime.per_factor``. Only the ratio of the two engines' predictions matters for the choice.
DENSE_TFLOPS = 650.0

#: H200, bf16, Hq 28 / Hkv 4, D 128, video inputs (NOTES_fa4.md v1-v4, eval/results/attention.csv, commits
#: 7a7944f-2023a36). ``triton``: the single-launch kernel, 1.4x (full-resolution tiles) and 1.6x (packed pooled
#: tiles) of cuDNN per unit density, +0.1 ms. ``fa4``: level-1 and level-2 launches at 1.25 / 1.31x of
#: FlashAttention-4 dense (0.905x cuDNN at 64k), factors 4 and 8 in one Triton launch at 1.91x; split + merge
#: 0.64 ms at 64k (0.235 G elements), ~0.6 ms of launches. Predictions against the measured attend stages
#: (fa4 / Triton, ms): 64k quota-0.2 14.2 / 15.1 (13.6 / 15.0), paper 2.9 / 2.2 (3.8 / 2.7), quota-0.1 8.1 / 8.2
#: (8.2-8.4 / 8.3); 32k quota-0.2 4.3 / 4.1 (4.1 / 4.2), paper 2.5 / 2.0 (2.5 / 2.1); 16k quota-0.2 1.7 / 1.2
#: (1.4 / 1.2); 128k quota-0.2 52.3 / 58.6 (49.7 / 57.4). A quota config is judged on its own quotas (no host read),
#: which put less work at full resolution than its plans (forced sink, diagonal and text blocks): quota-0.1 at 64k
#: is 7.4 / 7.2 on its quotas (Triton) but 8.1 / 8.2 on its measured mix (fa4); the two engines measured within 1%
#: there (8.4 / 8.4 ms), so the flip costs nothing. Factors 4 and 8 of ``fa4`` at 1.55 since the pooled launch
#: runs the Gluon kernel on Hopper (``fa4.pooled_launch``; quota-0.2, Gluon against Triton in the same runs: 3.86-3.93
#: against 4.34-4.39 ms at 64k, 13.75-14.01 against 15.55-15.72 at 128k, ratio 0.885-0.895; the final tree's run
#: 0.895: 1.73 x 0.895 = 1.55; NOTES_fa4.md v6), then 1.33 with its warpgroups in ping-pong (the Gluon launch
#: against its previous form in one run: 3.27 against 3.85 ms at 64k, 12.10 against 14.51 at 128k, ratio
#: 0.83-0.85: 1.55 x 0.86 = 1.33; NOTES_fa4.md v10); where that launch is the Triton kernel's, 1.73
#: (``FA4_TRITON_POOLED_PER_FACTOR``). Calibrated on one card and input family: on another GPU the H200's constants
#: decide (a wrong pick costs speed, never correctness).
ENGINE_TIMES: Dict[str, EngineTime] = {
    "triton": EngineTime(per_factor=(1.4, 1.6, 1.6, 1.6), fixed_ms=0.1, ms_per_gelem=0.0),
    "fa4": EngineTime(per_factor=(1.13, 1.19, 1.33, 1.33), fixed_ms=0.6, ms_per_gelem=2.72),
}

#: ``fa4``'s per-factor costs where its pooled launch is the Triton kernel's (no Gluon kernel: Triton < 3.6, or it
#: failed to compile in this process; ``_fa4_pooled_on_gluon``).
FA4_TRITON_POOLED_PER_FACTOR = (1.13, 1.19, 1.73, 1.73)


def _fa4_pooled_on_gluon() -> bool:
    """Whether ``fa4``'s pooled launch can use its Gluon kernel in this process (Triton version and compile state;
    the device is the caller's: this model is H200-calibrated)."""
    from .kernels.attention import fa4

    return fa4._pooled_gluon_import_error() is None and fa4._POOLED_GLUON_FAILURE is None


def predict_attend_ms(engine: str, histogram: Sequence[float], batch: int, heads: int, head_dim: int, lq: int,
                      lk: int) -> float:
    """Predicted attend-stage time (ms, H200-calibrated) of ``engine`` for a call with this level mix.

    Args:
        engine: ``"fa4"`` or ``"triton"`` (``ENGINE_TIMES``).
        histogram: Counts or fractions of the visible pairs at factors 1, 2, 4, 8 and skipped
            (``LevelMap.histogram_tensor`` or ``config_histogram``).
        batch, heads, head_dim: ``B``, ``Hq``, ``D``.
        lq, lk: Query and key lengths (bottom-right-aligned causal).

    Raises:
        KeyError: ``engine`` without a model. ValueError: a malformed histogram.
    """
    model = ENGINE_TIMES[engine]
    per_factor = model.per_factor
    if engine == "fa4" and not _fa4_pooled_on_gluon():
        per_factor = FA4_TRITON_POOLED_PER_FACTOR
    h = _counts(histogram)
    total = sum(h)
    pairs = max(0, lq * (2 * lk - lq)) / 2  # visible (query, key) pairs of one head
    dense_ms = 4.0 * batch * heads * head_dim * pairs / (DENSE_TFLOPS * 1e9)
    work = 0.0 if total <= 0 else sum(c * x / p for c, x, p in zip(per_factor, h[:4], (1, 2, 4, 8))) / total
    return model.fixed_ms + model.ms_per_gelem * batch * lq * heads * head_dim / 1e9 + work * dense_ms


def faster_attend_backend(histogram: Sequence[float], batch: int, heads: int, head_dim: int, lq: int,
                          lk: int) -> str:
    """``"fa4"`` or ``"triton"``: the attend-stage engine ``predict_attend_ms`` puts first for this level mix.

    ``backend="auto"`` uses it once the mix is known on the host (a quota config's own mix, or the histogram
    the dense guard reads), so low-density plans keep the Triton kernel's single launch at any length and dense
    ones take FlashAttention-4's level launches.
    """
    args = (histogram, batch, heads, head_dim, lq, lk)
    return "fa4" if predict_attend_ms("fa4", *args) < predict_attend_ms("triton", *args) else "triton"


def config_histogram(config) -> Optional[Tuple[float, float, float, float, float]]:
    """A quota-mode config's level mix as a histogram (its quotas, the rest skipped), else ``None``.

    Forced blocks (sink, diagonal, text) move a real plan's mix towards full resolution by a few percent of the
    visible blocks at long lengths; where that flips the choice the two engines are within a few percent of each
    other (``ENGINE_TIMES``).
    """
    if getattr(config, "mode", None) != "quota" or config.quotas is None or config.dense:
        return None
    q = [float(x) for x in config.quotas]
    return (q[0], q[1], q[2], q[3], max(0.0, 1.0 - sum(q)))
