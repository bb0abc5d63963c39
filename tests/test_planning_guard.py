"""The dense guard before planning for quota-mode calls (``api._quota_dense_reason``,
``cost.planning_dense_reason``), on the CPU.

A quota config fixes its level mix, so ``run_psa`` can tell before any planning whether the planning plus the
sparse stage could beat dense attention. The decision needs a CUDA call with a time model; here it is forced, so
what is tested is the wiring (dense attention, no planning stage, ``out=`` written, the all-full plan with its
reason), the gating, and the decision rule itself.
"""

import pytest
import torch

import psa_vlm.api as api
from psa_vlm import PSAConfig, cost
from psa_vlm.api import run_psa
from psa_vlm.kernels.estimate import kernel as est_kernel

CFG = PSAConfig.preset("quota-0.2", block_q=16, block_k=16, stride=4)
SHAPES = (1, 28, 128, 65536, 65536)  # B, Hq, D, Lq, Lk: Qwen2.5-VL-7B attention at 64k tokens


def causal_ref(q, k, v):
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = (q.float() @ kk.transpose(-1, -2)) * D ** -0.5
    qi = torch.arange(Lq)[:, None] + (k.shape[2] - Lq)
    s = s.masked_fill(torch.arange(k.shape[2])[None, :] > qi, float("-inf"))
    return (s.softmax(-1) @ vv).to(q.dtype)


def qkv(L=96, Hq=4, Hkv=2, D=16):
    torch.manual_seed(L)
    return torch.randn(1, Hq, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)


def test_forced_decision_runs_dense_before_planning(monkeypatch, spy):
    monkeypatch.setattr(api, "_quota_dense_reason", lambda backend, be, config, q, k: ("forced (test)", "cudnn"))
    estimates = spy(est_kernel, "block_importance")
    q, k, v = qkv()
    out = torch.full_like(q, float("nan"))
    got, plan = run_psa(q, k, v, CFG, backend="triton", out=out)
    assert got.data_ptr() == out.data_ptr() and not estimates
    assert torch.allclose(got, causal_ref(q, k, v), atol=2e-5)
    assert plan.dense_reason == "forced (test)" and float(plan.level_map.density()) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs,cfg", [
    (dict(plan_only=True), CFG), ({}, CFG.replace(dense_guard=False)), ({}, PSAConfig.preset("dense")),
])
def test_forced_decision_stays_out(monkeypatch, spy, kwargs, cfg):
    asked = []
    monkeypatch.setattr(api, "_quota_dense_reason", lambda *a: asked.append(a) or ("forced (test)", "cudnn"))
    q, k, v = qkv()
    _, plan = run_psa(q, k, v, cfg, backend="triton", **kwargs)
    assert not asked and plan.dense_reason is None


def test_gating():
    q, k, _ = qkv()
    assert api._quota_dense_reason("auto", "triton", CFG, q, k) is None  # CPU tensors: no time model
    assert api._quota_dense_reason("auto", "triton", PSAConfig.preset("paper"), q, k) is None  # mix unknown


def test_rule_compares_planning_plus_sparse_stage_with_dense():
    both = ("fa4", "triton")
    quota = cost.config_histogram(PSAConfig.preset("quota-0.2"))
    planning = cost.predict_estimate_ms(8, *SHAPES)
    assert cost.planning_dense_reason(both, quota, planning, "fa4", *SHAPES) is None
    dense_mix = (0.9, 0.0, 0.0, 0.0, 0.1)
    reason = cost.planning_dense_reason(both, dense_mix, planning, "fa4", *SHAPES)
    assert reason is not None and "quota density 0.900" in reason and "FlashAttention-4 dense" in reason
    # a mix below break-even on its own is pushed over by the planning ahead of it
    mix = (0.75, 0.0, 0.0, 0.0, 0.25)
    attend = min(cost.predict_attend_ms(e, mix, *SHAPES) for e in both)
    dense = cost.predict_dense_ms("fa4", *SHAPES)
    assert attend < dense
    assert cost.planning_dense_reason(both, mix, 0.0, "fa4", *SHAPES) is None
    assert cost.planning_dense_reason(both, mix, dense - attend + 0.01, "fa4", *SHAPES) is not None
    with pytest.raises(ValueError, match="at least one engine"):
        cost.planning_dense_reason((), quota, 0.0, "fa4", *SHAPES)
    with pytest.raises(KeyError):
        cost.planning_dense_reason(both, quota, 0.0, "fa2", *SHAPES)


def test_shipped_quota_presets_stay_sparse_from_16k():
    """No shipped quota preset is sent to dense attention by its own mix at 16k-128k (both engines, FlashAttention-4
    dense as the competitor, Qwen2.5-VL-7B heads); a short explicit-fa4 call is (its launches are host-bound)."""
    for name in ("quota-0.1", "quota-0.2", "quota-0.3", "binary-0.1", "binary-0.2", "binary-0.3"):
        mix = cost.config_histogram(PSAConfig.preset(name))
        for L in (16384, 32768, 65536, 131072):
            shapes = (1, 28, 128, L, L)
            planning = cost.predict_estimate_ms(8, *shapes)
            assert cost.planning_dense_reason(("fa4", "triton"), mix, planning, "fa4", *shapes) is None, (name, L)
    shapes = (1, 28, 128, 6000, 6000)
    mix = cost.config_histogram(PSAConfig.preset("quota-0.2"))
    assert cost.planning_dense_reason(("fa4",), mix, cost.predict_estimate_ms(8, *shapes), "fa4", *shapes)


def test_estimate_model_scales_with_stride_and_heads():
    s8 = cost.predict_estimate_ms(8, *SHAPES)
    assert s8 == pytest.approx(cost.ESTIMATE_PER_DENSE_WORK * cost.predict_dense_ms("cudnn", *SHAPES)
                               / cost.DENSE_TIMES["cudnn"])
    assert cost.predict_estimate_ms(32, *SHAPES) < cost.predict_estimate_ms(16, *SHAPES) < s8
    assert cost.predict_estimate_ms(8, 1, 4, 128, 65536, 65536) == pytest.approx(s8 * 4 / 28)
    with pytest.raises(ValueError, match="stride"):
        cost.predict_estimate_ms(0, *SHAPES)


@pytest.mark.gpu
def test_dense_quota_config_runs_dense_before_planning_gpu(spy):
    """64k tokens, bf16, Qwen2.5-VL-7B heads: a quota config keeping 90% of the blocks at full resolution runs dense
    attention without estimating (its quotas plus the estimator are predicted slower than dense); quota-0.2 plans as
    before. (Written in session 13 after the device budget was spent: not yet run on a GPU.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from psa_vlm.bench.synthetic import video_like_qkv

    q, k, v = video_like_qkv(1, 28, 4, 65536, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    estimates = spy(est_kernel, "block_importance")
    dense_cfg = PSAConfig.preset("binary-0.2").replace(quotas=(0.9, 0.0, 0.0, 0.0))
    o, plan = run_psa(q, k, v, dense_cfg)
    assert not estimates and plan.dense_reason is not None and "before any planning" in plan.dense_reason
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert float((o.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    o, plan = run_psa(q, k, v, PSAConfig.preset("quota-0.2"))
    assert estimates and plan.dense_reason is None and float(plan.level_map.density()) < 0.3
