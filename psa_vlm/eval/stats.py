"""Confidence intervals and paired tests for the evaluation tables (thin wrappers over SciPy).

- ``wilson_interval``: the Wilson score interval of a binomial proportion (Wilson 1927; the interval
  ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` computes);
- ``bootstrap_ci``: a percentile bootstrap interval of a statistic (``scipy.stats.bootstrap``; Efron &
  Tibshirani 1993, ch. 13), also used for paired differences (resample the per-item differences);
- ``mcnemar_exact``: McNemar's test for paired binary outcomes in its exact form, a two-sided binomial test of
  the discordant pairs against 1/2 (``scipy.stats.binomtest``; McNemar 1947, Edwards 1948).

SciPy is imported on first use; importing this module imports NumPy only.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

__all__ = ["wilson_interval", "bootstrap_ci", "paired_bootstrap_ci", "mcnemar_exact"]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``.

    Args:
        k: Successes, ``0 <= k <= n``.
        n: Trials, ``n >= 1``.
        confidence: Confidence level in (0, 1).

    Returns:
        ``(low, high)`` within [0, 1].

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``[0, n]`` or a confidence outside (0, 1).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(k, bool) or int(k) != k or not (0 <= k <= n):
        raise ValueError(f"k must be an integer in [0, n={n}], got {k!r}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(max(0.0, ci.low)), float(min(1.0, ci.high))


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: Optional[int] = 0,
) -> Tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)`` (resampling items with replacement).

    A single value or identical values give the degenerate interval ``(s, s)``.

    Args:
        values: Per-item values (finite), at least one.
        statistic: Reduction of a 1-D array (default the mean).
        confidence: Confidence level in (0, 1).
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling (fixed by default so that tables are reproducible).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: No values, or a non-finite value.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci got a non-finite value")
    if x.size == 1 or np.all(x == x[0]):
        s = float(statistic(x))
        return s, s
    from scipy.stats import bootstrap

    vectorized = statistic is np.mean
    res = bootstrap(
        (x,), (lambda a, axis=-1: np.mean(a, axis=axis)) if vectorized else statistic,
        confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        rng=np.random.default_rng(seed), vectorized=vectorized,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 2000, seed: Optional[int] = 0
) -> Tuple[float, float, float]:
    """Mean paired difference ``mean(a - b)`` and its percentile bootstrap interval (items resampled as pairs).

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.size == 0:
        raise ValueError(f"paired values must be two non-empty sequences of one length, got {xa.size} and {xb.size}")
    d = xa - xb
    lo, hi = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return float(d.mean()), lo, hi


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> Tuple[int, int, float]:
    """Exact McNemar test of paired binary outcomes (e.g. per-question correctness of two methods).

    Args:
        a, b: Outcomes of the two methods on the same items, in the same order.

    Returns:
        ``(n_a_only, n_b_only, p)``: items where only ``a`` / only ``b`` succeeded, and the two-sided p-value of
        the binomial test of ``n_a_only`` out of the ``n_a_only + n_b_only`` discordant items against 1/2
        (1.0 when there are none).

    Raises:
        ValueError: Lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have one length, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if bool(x) and not bool(y))
    only_b = sum(1 for x, y in zip(a, b) if bool(y) and not bool(x))
    if only_a + only_b == 0:
        return 0, 0, 1.0
    from scipy.stats import binomtest

    p = float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)
    return only_a, only_b, min(1.0, p) if math.isfinite(p) else 1.0
