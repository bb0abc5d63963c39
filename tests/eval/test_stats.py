"""Interval and test code of ``psa_vlm.eval.stats`` against published and hand-computed values."""

import math

import numpy as np
import pytest

from psa_vlm.eval.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_ci, wilson_interval


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_table(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


@pytest.mark.parametrize("k, n", [(0, 1), (3, 7), (16, 16), (200, 256)])
def test_wilson_matches_closed_form(k, n):
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-12)


@pytest.mark.parametrize("k, n", [(-1, 4), (5, 4), (1, 0), (True, 4)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_mcnemar_exact_is_the_binomial_test_of_discordant_pairs():
    # 1 vs 9 discordant pairs: two-sided p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11 / 1024
    a = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 3
    b = [False] * 1 + [True] * 9 + [True] * 5 + [False] * 3
    assert mcnemar_exact(a, b) == (1, 9, pytest.approx(22 / 1024, rel=1e-12))
    assert mcnemar_exact(b, a) == (9, 1, pytest.approx(22 / 1024, rel=1e-12))
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)
    # balanced discordance: p = 1
    assert mcnemar_exact([True, False], [False, True])[2] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng()
    small = rng.exponential(size=40)
    large = rng.exponential(size=4000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s)
    # the percentile interval of the mean of 4000 draws is close to the normal one
    se = large.std(ddof=1) / math.sqrt(large.size)
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci([0.0, 0.0, 0.0]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])


def test_paired_bootstrap_uses_the_pairs():
    rng = np.random.default_rng()
    base = rng.normal(size=60) * 10  # large between-item spread, small constant paired shift
    d, lo, hi = paired_bootstrap_ci(base + 0.5 + 0.01 * rng.normal(size=60), base)
    assert d == pytest.approx(0.5, abs=0.01) and lo > 0.45 and hi < 0.55


def test_sweep_accuracy_interval_from_scores_and_from_old_rows():
    from psa_vlm.eval.sweep import accuracy_interval

    scores = [1.0] * 50 + [0.0] * 14
    row = {"accuracy": 50 / 64, "samples": 64, "per_sample": [{"score": s} for s in scores]}
    assert accuracy_interval(row) == pytest.approx(wilson_interval(50, 64))
    old = {"accuracy": 50 / 64, "samples": 64, "per_sample": [{"target": "A"}] * 64}  # saved before scores
    assert accuracy_interval(old) == pytest.approx(wilson_interval(50, 64))
    graded = {"accuracy": 0.55, "samples": 4, "per_sample": [{"score": s} for s in (0.2, 0.5, 0.7, 0.8)]}
    lo, hi = accuracy_interval(graded)
    assert 0.2 <= lo < 0.55 < hi <= 0.8
    assert accuracy_interval({"accuracy": 0.3333, "samples": 64}) == (None, None)  # not k / 64
    assert accuracy_interval({"accuracy": None, "samples": 0}) == (None, None)
