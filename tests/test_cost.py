"""The dense guard's decision logic (``psa_vlm.cost``): sparse stage vs the fastest dense attention."""

import pytest

from psa_vlm.config import PSAConfig
from psa_vlm.api import attend_backend
from psa_vlm.cost import (
    ATTEND_COSTS,
    AUTO_FA4_MIN_TOKENS,
    THRESHOLD_MODE_MIN_TOKENS,
    attend_cost_ratio,
    dense_guard_reason,
    quota_cost_ratio,
    short_prompt_reason,
)


def test_ratio_is_the_weighted_level_work():
    m = ATTEND_COSTS["fa4"]
    hist = [10, 20, 30, 40, 100]  # factors 1, 2, 4, 8, skipped
    want = m.overhead + (m.per_factor[0] * 10 + m.per_factor[1] * 20 / 2 + m.per_factor[2] * 30 / 4
                         + m.per_factor[3] * 40 / 8) / 200
    assert attend_cost_ratio("fa4", hist) == pytest.approx(want)


@pytest.mark.parametrize("backend", ["fa4", "triton"])
def test_low_density_runs_sparse_and_all_full_runs_dense(backend):
    assert dense_guard_reason(backend, [100, 0, 0, 0, 900]) is None  # density 0.1
    reason = dense_guard_reason(backend, [1000, 0, 0, 0, 0])  # density 1: never cheaper than dense
    assert reason is not None and "density 1.000" in reason and backend in reason


def test_threshold_sits_where_the_ratio_crosses_one():
    m = ATTEND_COSTS["triton"]
    # all full resolution: ratio = overhead + c_1 * density; the guard trips exactly at ratio 1
    d_star = (1.0 - m.overhead) / m.per_factor[0]
    below = [int(1000 * (d_star - 0.01)), 0, 0, 0, 1000 - int(1000 * (d_star - 0.01))]
    above = [int(1000 * (d_star + 0.01)), 0, 0, 0, 1000 - int(1000 * (d_star + 0.01))]
    assert dense_guard_reason("triton", below) is None
    assert dense_guard_reason("triton", above) is not None


def test_no_model_means_no_guard_and_bad_histograms_are_named():
    assert attend_cost_ratio("reference", [1, 0, 0, 0, 0]) is None
    assert dense_guard_reason("reference", [1, 0, 0, 0, 0]) is None
    assert attend_cost_ratio("fa4", [0, 0, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="5 non-negative counts"):
        attend_cost_ratio("fa4", [1, 2, 3])


def test_quota_mix_ratio_skips_the_host_read_only_far_from_break_even():
    assert quota_cost_ratio("fa4", PSAConfig.preset("quota-0.2")) < 0.8
    assert quota_cost_ratio("fa4", PSAConfig.preset("paper")) == float("inf")  # threshold mode: input-dependent
    assert quota_cost_ratio("fa4", PSAConfig.preset("binary-0.2").replace(quotas=(0.9, 0, 0, 0))) > 0.8
    assert quota_cost_ratio("reference", PSAConfig.preset("quota-0.2")) == float("inf")


def test_auto_keeps_the_triton_attend_stage_on_short_prompts():
    n = AUTO_FA4_MIN_TOKENS
    assert attend_backend("auto", "fa4", n - 1) == "triton"
    assert attend_backend("auto", "fa4", n) == "fa4"
    assert attend_backend("fa4", "fa4", 1024) == "fa4"  # an explicit choice is honoured
    assert attend_backend("auto", "triton", 10**6) == "triton"  # FlashAttention-4 not installed
    assert attend_backend("triton", "triton", 1024) == "triton"
    assert attend_backend("auto", "reference", 1024) == "reference"


def test_short_threshold_mode_prompts_run_dense_where_fa4_dense_runs():
    n = THRESHOLD_MODE_MIN_TOKENS
    reason = short_prompt_reason("fa4", PSAConfig.preset("paper").mode, n - 1)
    assert reason is not None and f"prompt of {n - 1} tokens" in reason and str(n) in reason
    assert short_prompt_reason("fa4", "threshold", n) is None
    assert short_prompt_reason("fa4", PSAConfig.preset("quota-0.2").mode, 1024) is None  # fixed mix: sparse
    assert short_prompt_reason("triton", "threshold", 1024) is None  # SDPA is the dense path there: sparse wins
    assert short_prompt_reason("reference", "threshold", 1024) is None
