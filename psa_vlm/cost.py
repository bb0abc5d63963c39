"""Time model of the attend stage and of dense attention: the dense guard and the attend-stage engine choice.

After level assignment PSA knows how many (head, query block, KV block) pairs it will read at each factor. The
attend stage of an engine (``"fa4"``: FlashAttention-4 level launches with psa_vlm's pooled launch and merge;
``"triton"``: psa_vlm's single Triton launch) is predicted as

    t = max(fixed_ms + ms_per_gelem * G + [pyramid_fixed_ms + pyramid_ms_per_gelem * G]
            + dense_ms * sum_p c_p f_p / p,  host floor)

(``predict_attend_ms``): ``G = B * Lq * Hq * D / 1e9`` output elements (per-program and per-row costs: query loads,
output stores, the level partials and their merge), the bracket only when the mix has pooled blocks, the host floor
the least time of a stage bound by the host issuing its launches (``EngineTime``), ``f_p`` the
fraction of causally visible pairs at factor ``p`` (``LevelMap.histogram_tensor``), ``dense_ms`` the causal
FLOPs at ``DENSE_TFLOPS`` and ``c_p`` the measured time per unit of FLOP density at factor ``p``. Dense attention
is predicted from the same FLOPs (``predict_dense_ms``). Two decisions use it:

- the dense guard (``dense_guard_reason``): when the attend stage is predicted no faster than the fastest dense
  attention available for the call, ``psa_attention`` runs dense attention instead (``PSAConfig.dense_guard``) and
  says so in its plan and in ``psa_stats``;
- ``backend="auto"`` (``faster_attend_backend``): the engine predicted faster for the plan's level mix.

The constants are fitted to one ``psa-vlm bench-attention`` run per engine on an NVIDIA H200 (bf16, Hq 28 / Hkv 4,
D 128, video inputs, 16k-128k tokens; ``ENGINE_TIMES``); on other GPUs the H200's constants decide (a wrong pick
costs speed, never correctness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

__all__ = [
    "AUTO_FA4_MIN_TOKENS", "THRESHOLD_MODE_MIN_TOKENS", "attend_cost_ratio", "quota_cost_ratio",
    "dense_guard_reason", "short_prompt_reason", "EngineTime", "ENGINE_TIMES", "DENSE_TIMES", "DENSE_NAMES",
    "predict_attend_ms", "predict_dense_ms", "faster_attend_backend", "config_histogram",
    "ESTIMATE_PER_DENSE_WORK", "predict_estimate_ms", "planning_dense_reason",
]

#: ``backend="auto"`` runs the attend stage on FlashAttention-4 only from this many tokens
#: (``api.causal_equivalent_len``); shorter calls keep the Triton kernel. FlashAttention-4's form pays a fixed
#: cost per call (four level launches from Python, the list split and the merge of four partials). H200,
#: bench-attention, video inputs, whole call (fa4 / Triton attend stage, same planning; commit 2023a36): 16k
#: quota-0.2 2.96 / 2.10 ms, paper 4.64 / 2.94; 32k quota-0.2 5.70 / 5.91, paper 5.08 / 4.26; 64k quota-0.2
#: 19.36 / 20.43, paper 10.56 / 8.93 (docs/PERFORMANCE.md). A length-only compromise: Triton wins clearly at 16k
#: and on low-density plans at most lengths, fa4 for quota-0.2 from 32k. The calibration run of ``ENGINE_TIMES``
#: (attend stage only, fa4 / Triton): paper 2.23 / 2.15 ms at 32k, 4.34 / 4.47 at 48k, 3.37 / 2.66 at 64k, 7.04 /
#: 5.75 at 128k; binary@paper 1.85 / 2.08, 3.66 / 4.32, 2.61 / 2.53, 5.45 / 5.42. Used only where the plan's level
#: mix is not known on the host (a threshold-mode call
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


def _counts(histogram: Sequence[float]) -> list:
    """``histogram`` as 5 floats (factors 1, 2, 4, 8, skip); ``ValueError`` naming it when malformed."""
    h = [float(x) for x in histogram]
    if len(h) != 5 or any(x < 0 for x in h):
        raise ValueError(f"histogram must hold 5 non-negative counts (factors 1, 2, 4, 8, skip), got {histogram!r}")
    return h


def _density(histogram: Sequence[float]) -> float:
    """FLOP density of a level histogram (``sum_p f_p / p``), for messages."""
    h = _counts(histogram)
    return sum(x / p for x, p in zip(h[:4], (1, 2, 4, 8))) / max(sum(h), 1.0)


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


# ---------------------------------------------------------------------------------------------- time model
@dataclass(frozen=True)
class EngineTime:
    """Time model of one attend-stage engine (``predict_attend_ms``; module docstring).

    Attributes (times in ms):
        per_factor: ``c_p``: ms per ms of ``DENSE_TFLOPS`` dense attention, per unit of FLOP density at factors
            1, 2, 4, 8.
        fixed_ms: Per-call cost independent of the size.
        ms_per_gelem: Per-call cost per 10^9 output elements ``B * Lq * Hq * D`` (per-program costs: a query tile's
            load, its output store, the list reads).
        pyramid_fixed_ms, pyramid_ms_per_gelem: The same, added when the mix has pooled blocks (``fa4``: the
            pooled launches, whose programs run even for rows without pooled blocks, the partials and their merge).
        host_floor_ms, pyramid_host_floor_ms: The least time the stage takes, without / with pooled blocks: below
            it a call is bound by the host issuing the stage's launches (``fa4``: FlashAttention-4's Python
            interface per level launch, the split and the merge), not by the GPU.
    """

    per_factor: Tuple[float, float, float, float]
    fixed_ms: float
    ms_per_gelem: float
    pyramid_fixed_ms: float = 0.0
    pyramid_ms_per_gelem: float = 0.0
    host_floor_ms: float = 0.0
    pyramid_host_floor_ms: float = 0.0


#: The unit of ``EngineTime.per_factor`` and ``DENSE_TIMES``: a causal forward at this rate (TFLOP/s, about cuDNN
#: SDPA's on an H200, bf16, D 128).
DENSE_TFLOPS = 650.0

#: Fitted (weighted least squares on relative error) to the attend stages of one bench-attention run per engine
#: (``--backend fa4`` / ``--backend triton``; H200, torch 2.11, Triton 3.6, FlashAttention-4 4.0.0b36, commit
#: c5ff4be; 16k, 24k, 32k, 48k, 64k and 128k tokens x quota-0.1/0.2/0.3, binary-0.1/0.2/0.3, paper, binary@paper:
#: 48 rows per engine, ``eval/results/calibration/``). ``c_2`` of ``fa4`` is not separable from ``c_4`` / ``c_8``
#: on these mixes (quota mixes hold factors 2 / 4 / 8 in fixed proportions) and is set at 0.895 of them, their
#: ratio in the per-level timings of ``NOTES_fa4.md`` v10. Error of the fit (measured / predicted - 1, absolute):
#: median 0.8%, at most 3.5% (``triton``); median 1.7%, at most 11% from 32k (``fa4``: `paper` at 128k; at 16k,
#: where FlashAttention-4's launches from Python dominate, up to 38%). Against the measured order of the two engines' attend stages the fit
#: without its host floors errs on 3 of 48 rows (16k binary-0.1, 24k quota-0.2, 32k quota-0.1; the previous
#: constants on 18, up to 32% slower picks), FlashAttention-4's binary launch and its quota launches from 24k being
#: faster than the previous model said. ``NOTES_fa4.md`` v12 has the fit and the per-program measurement behind
#: ``ms_per_gelem`` (FlashAttention-4: ~3.9 us per program on one multiprocessor). The host floors of ``fa4``
#: come from the same runs' whole calls, which the attend-stage timings (launches queued back to back) do not
#: show: at 16k tokens every fa4 whole call took 2.7-4.0 ms whatever its density (Triton engine 1.2-2.1 ms), at
#: 24k-32k the pyramid presets' whole calls sat ~0.7 ms above their GPU stages (quota-0.1: 3.53 against 2.8 ms at
#: 24k); with the floors the model picks the faster whole call on all but two of the 42 non-threshold rows, on the
#: plans' own mixes: 24k quota-0.2 (4% slower) and 16k binary-0.3 (fa4 at 2.81 ms against 1.97, though fa4 ran
#: that call in 1.96 ms in another run: at 16k the fa4 engine's whole calls vary with the host; a single floor
#: cannot also keep 24k binary-0.1 on fa4, 1.99 against 2.22 ms). Under ``backend="auto"`` quota configs are judged
#: on their own quotas, which pick Triton for binary-0.3 at 16k. The floors depend on the host CPU.
ENGINE_TIMES: Dict[str, EngineTime] = {
    "triton": EngineTime(per_factor=(1.40, 1.51, 1.51, 1.51), fixed_ms=0.01, ms_per_gelem=1.78,
                         pyramid_fixed_ms=0.01, pyramid_ms_per_gelem=0.69),
    "fa4": EngineTime(per_factor=(0.954, 1.048, 1.171, 1.171), fixed_ms=0.01, ms_per_gelem=4.90,
                      pyramid_fixed_ms=0.41, pyramid_ms_per_gelem=1.12, host_floor_ms=1.4, pyramid_host_floor_ms=2.9),
}

#: ``fa4``'s per-factor costs where its pooled launch is the Triton kernel's (no Gluon kernel: Triton < 3.6, or it
#: failed to compile in this process; ``_fa4_pooled_on_gluon``): factors 4 and 8 at 1.30x the Gluon kernel's, their
#: ratio on the H200 (``NOTES_fa4.md`` v6, v10).
FA4_TRITON_POOLED_PER_FACTOR = (0.954, 1.048, 1.52, 1.52)

#: Dense causal attention per ms of ``DENSE_TFLOPS`` work, for the dense guard: the lower envelope of the same
#: runs less 3% (the sparse model's error), so the guard errs towards dense. Measured (16k-128k): cuDNN SDPA
#: 0.97-1.12 (it slows at 128k), FlashAttention-4 dense 0.91-1.02 (0.907 at 64k and 128k).
DENSE_TIMES: Dict[str, float] = {"cudnn": 0.94, "fa4": 0.88}

#: Names of the dense paths in messages.
DENSE_NAMES: Dict[str, str] = {"cudnn": "SDPA (cuDNN)", "fa4": "FlashAttention-4 dense"}


def _fa4_pooled_on_gluon() -> bool:
    """Whether ``fa4``'s pooled launch can use its Gluon kernel in this process (Triton version and compile state;
    the device is the caller's: this model is H200-calibrated)."""
    from .kernels.attention import fa4

    return fa4._pooled_gluon_import_error() is None and fa4._POOLED_GLUON_FAILURE is None


def _dense_work_ms(batch: int, heads: int, head_dim: int, lq: int, lk: int) -> float:
    """Causal (bottom-right aligned) attention FLOPs at ``DENSE_TFLOPS``, in ms; ``ValueError`` unless
    ``0 <= lq <= lk`` (the calls PSA plans: a prefill or a chunk of new queries over the cache)."""
    if not 0 <= lq <= lk:
        raise ValueError(f"the cost model needs 0 <= lq <= lk (queries over keys, causal), got lq={lq}, lk={lk}")
    pairs = lq * (2 * lk - lq) / 2  # visible (query, key) pairs of one head
    return 4.0 * batch * heads * head_dim * pairs / (DENSE_TFLOPS * 1e9)


def predict_attend_ms(engine: str, histogram: Sequence[float], batch: int, heads: int, head_dim: int, lq: int,
                      lk: int) -> float:
    """Predicted attend-stage time (ms, H200-calibrated) of ``engine`` for a call with this level mix.

    Args:
        engine: ``"fa4"`` or ``"triton"`` (``ENGINE_TIMES``).
        histogram: Counts or fractions of the visible pairs at factors 1, 2, 4, 8 and skipped
            (``LevelMap.histogram_tensor`` or ``config_histogram``).
        batch, heads, head_dim: ``B``, ``Hq``, ``D``.
        lq, lk: Query and key lengths (bottom-right-aligned causal), ``0 <= lq <= lk``.

    Raises:
        KeyError: ``engine`` without a model. ValueError: a malformed histogram, or ``lq`` outside ``[0, lk]``.
    """
    model = ENGINE_TIMES[engine]
    per_factor = model.per_factor
    if engine == "fa4" and not _fa4_pooled_on_gluon():
        per_factor = FA4_TRITON_POOLED_PER_FACTOR
    h = _counts(histogram)
    total = sum(h)
    gelem = batch * lq * heads * head_dim / 1e9
    work = 0.0 if total <= 0 else sum(c * x / p for c, x, p in zip(per_factor, h[:4], (1, 2, 4, 8))) / total
    t = model.fixed_ms + model.ms_per_gelem * gelem + work * _dense_work_ms(batch, heads, head_dim, lq, lk)
    if any(x > 0 for x in h[1:4]):
        return max(t + model.pyramid_fixed_ms + model.pyramid_ms_per_gelem * gelem, model.pyramid_host_floor_ms)
    return max(t, model.host_floor_ms)


def predict_dense_ms(dense: str, batch: int, heads: int, head_dim: int, lq: int, lk: int) -> float:
    """Predicted time (ms) of dense causal attention ``dense`` (``DENSE_TIMES``).

    Args:
        dense: ``"fa4"`` (FlashAttention-4's dense forward) or ``"cudnn"`` (SDPA).
        batch, heads, head_dim: ``B``, ``Hq``, ``D``.
        lq, lk: Query and key lengths (bottom-right-aligned causal), ``0 <= lq <= lk``.

    Raises:
        KeyError: an unknown dense path. ValueError: ``lq`` outside ``[0, lk]``.
    """
    return DENSE_TIMES[dense] * _dense_work_ms(batch, heads, head_dim, lq, lk)


def _default_dense(backend: str) -> str:
    return "fa4" if backend == "fa4" else "cudnn"


def attend_cost_ratio(backend: str, histogram: Sequence[float], batch: int, heads: int, head_dim: int, lq: int,
                      lk: int, dense: Optional[str] = None) -> Optional[float]:
    """Predicted ``attend stage / dense attention`` time, or ``None`` without a model for ``backend``.

    Args:
        backend: ``"fa4"`` or ``"triton"`` (others have no model).
        histogram: As in ``predict_attend_ms``.
        batch, heads, head_dim, lq, lk: The call's shapes.
        dense: The dense path it is compared with (``DENSE_TIMES``); default FlashAttention-4 dense for ``fa4``,
            SDPA (cuDNN) for ``triton``.

    Returns:
        The ratio (``< 1``: the attend stage is predicted faster than dense attention); 0 for an empty call.

    Raises:
        ValueError: a malformed histogram, or ``lq`` outside ``[0, lk]``. KeyError: an unknown ``dense``.
    """
    if backend not in ENGINE_TIMES:
        return None
    dense_ms = predict_dense_ms(dense or _default_dense(backend), batch, heads, head_dim, lq, lk)
    t = predict_attend_ms(backend, histogram, batch, heads, head_dim, lq, lk)
    return 0.0 if dense_ms <= 0 else t / dense_ms


def dense_guard_reason(backend: str, histogram: Sequence[float], batch: int, heads: int, head_dim: int, lq: int,
                       lk: int, dense: Optional[str] = None) -> Optional[str]:
    """Why dense attention is the faster choice for this level histogram, or ``None`` if PSA's attend stage is.

    Args: as ``attend_cost_ratio``; ``dense`` is the dense path that runs instead (named in the message).

    Raises: as ``attend_cost_ratio``.
    """
    ratio = attend_cost_ratio(backend, histogram, batch, heads, head_dim, lq, lk, dense)
    if ratio is None or ratio < 1.0:
        return None
    density = _density(histogram)
    name = DENSE_NAMES[dense or _default_dense(backend)]
    return (
        f"density {density:.3f}: the {backend} sparse stage is predicted at {ratio:.2f}x the time of {name} "
        f"at {lq} x {lk} tokens, so dense attention ({name}) ran"
    )


def quota_cost_ratio(backend: str, config, batch: int, heads: int, head_dim: int, lq: int, lk: int,
                     dense: Optional[str] = None) -> float:
    """``attend_cost_ratio`` of a quota-mode config's own level mix (its quotas as the histogram), or ``inf``.

    ``inf`` for threshold mode (its mix depends on the input) and for backends without a model. Forced blocks
    (sink, diagonal, text) only move a quota mix towards full resolution, by a few percent of the visible blocks
    at long lengths; callers compare against a margin below 1.

    Args:
        backend: As ``attend_cost_ratio``. config: A ``PSAConfig``.
        batch, heads, head_dim, lq, lk, dense: As ``attend_cost_ratio`` (same errors).
    """
    mix = config_histogram(config)
    ratio = None if mix is None else attend_cost_ratio(backend, mix, batch, heads, head_dim, lq, lk, dense)
    return float("inf") if ratio is None else ratio


#: The importance estimator (``block_importance``) per ms of ``DENSE_TFLOPS`` dense work over the same heads, at
#: stride 8; other strides scale as ``(8 / s) ** 0.8``. H200, bench-attention (sessions 9 and 13): stride 8 0.077 /
#: 0.074 at 64k / 128k (28 heads), stride 16 0.045 / 0.043, stride 32 0.025 / 0.022.
ESTIMATE_PER_DENSE_WORK = 0.075


def predict_estimate_ms(stride: int, batch: int, heads: int, head_dim: int, lq: int, lk: int) -> float:
    """Predicted time (ms, H200) of the importance estimator on ``heads`` query heads (``Hkv`` for
    ``estimate_heads="kv"``) at ``stride``.

    Args:
        stride: The estimator stride ``s`` (positive).
        batch, heads, head_dim: ``B``, the estimator's heads, ``D``.
        lq, lk: Query and key lengths, ``0 <= lq <= lk``.

    Raises:
        ValueError: a non-positive stride, or ``lq`` outside ``[0, lk]``.
    """
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    return ESTIMATE_PER_DENSE_WORK * (8.0 / stride) ** 0.8 * _dense_work_ms(batch, heads, head_dim, lq, lk)


def planning_dense_reason(engines: Sequence[str], histogram: Sequence[float], planning_ms: float, dense: str,
                          batch: int, heads: int, head_dim: int, lq: int, lk: int) -> Optional[str]:
    """Why a quota-mode call should run dense attention before any planning, or ``None``.

    A quota config fixes its level mix (``config_histogram``), so before planning ``run_psa`` can compare the
    planning still ahead (``planning_ms``, chiefly the estimator: ``predict_estimate_ms``) plus the attend stage at
    that mix on the fastest of ``engines`` with dense attention ``dense``; when the sparse path is predicted no
    faster, it runs dense attention and plans nothing. Forced blocks (sink, diagonal, text) make a real plan's mix
    denser than the quotas, so this errs towards the sparse path, after which the usual guard
    (``dense_guard_reason``) still compares the plan's own mix.

    Args:
        engines: Attend-stage engines that could run the call (``ENGINE_TIMES`` keys).
        histogram: The config's mix (as ``predict_attend_ms``).
        planning_ms: Predicted planning time (ms).
        dense: The dense path that would run (``DENSE_TIMES``).
        batch, heads, head_dim, lq, lk: The call's shapes, ``0 <= lq <= lk``.

    Raises:
        ValueError: a malformed histogram, ``lq`` outside ``[0, lk]`` or no engine. KeyError: an unknown engine or
            dense path.
    """
    if not engines:
        raise ValueError("planning_dense_reason needs at least one engine")
    dense_ms = predict_dense_ms(dense, batch, heads, head_dim, lq, lk)
    attend_ms = min(predict_attend_ms(e, histogram, batch, heads, head_dim, lq, lk) for e in engines)
    if dense_ms <= 0 or attend_ms + planning_ms < dense_ms:
        return None
    density = _density(histogram)
    name = DENSE_NAMES[dense]
    return (
        f"quota density {density:.3f}: the planning ({planning_ms:.2f} ms) and the sparse stage ({attend_ms:.2f} ms) "
        f"are predicted no faster than {name} ({dense_ms:.2f} ms) at {lq} x {lk} tokens, so dense attention "
        f"({name}) ran before any planning"
    )


def faster_attend_backend(histogram: Sequence[float], batch: int, heads: int, head_dim: int, lq: int,
                          lk: int) -> str:
    """``"fa4"`` or ``"triton"``: the attend-stage engine ``predict_attend_ms`` puts first for this level mix.

    ``backend="auto"`` uses it once the mix is known on the host (a quota config's own mix, or the histogram
    the dense guard reads), so low-density plans keep the Triton kernel's single launch at any length and dense
    ones take FlashAttention-4's level launches.

    Args: as ``predict_attend_ms`` (same errors); ties go to ``"triton"``.
    """
    args = (histogram, batch, heads, head_dim, lq, lk)
    return "fa4" if predict_attend_ms("fa4", *args) < predict_attend_ms("triton", *args) else "triton"


def config_histogram(config) -> Optional[Tuple[float, float, float, float, float]]:
    """A quota-mode config's level mix as a histogram (its quotas, the rest skipped), else ``None``.

    Forced blocks (sink, diagonal, text) move a real plan's mix towards full resolution by a few percent of the
    visible blocks at long lengths; where that flips the choice the two engines are within a few percent of each
    other (``ENGINE_TIMES``).

    Args:
        config: A ``PSAConfig`` (anything without ``mode == "quota"`` gives ``None``, as does the dense preset).
    """
    if getattr(config, "mode", None) != "quota" or config.quotas is None or config.dense:
        return None
    q = [float(x) for x in config.quotas]
    return (q[0], q[1], q[2], q[3], max(0.0, 1.0 - sum(q)))
