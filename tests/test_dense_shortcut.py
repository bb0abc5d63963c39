"""The dense guard's pre-planning shortcut in ``run_psa`` (``api._short_prompt_reason``) and the length measure of
the ``auto`` rules (``api.causal_equivalent_len``), on the CPU.

The shortcut's decision needs FlashAttention-4 on a GPU (``tests/kernels/test_fa4.py`` tests it there); here the
decision is forced and FlashAttention-4's dense forward is replaced by causal SDPA, so what is tested is the
wiring: no planning stage runs, ``out=`` is written, the plan is the all-full map with its reason, and the
shortcut stays out of ``plan_only``, a given level map, a key padding mask, the dense preset and
``dense_guard=False``.
"""

import pytest
import torch

import psa_vlm.api as api
from psa_vlm import PSAConfig
from psa_vlm.api import causal_equivalent_len, run_psa
from psa_vlm.kernels.attention import fa4
from psa_vlm.kernels.estimate import kernel as est_kernel

REASON = "forced short prompt (test)"


def causal_ref(q, k, v, scale=None):
    """Bottom-right-aligned causal attention in float32 (GQA by index)."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = (q.float() @ kk.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
    qi = torch.arange(Lq)[:, None] + (k.shape[2] - Lq)
    s = s.masked_fill(torch.arange(k.shape[2])[None, :] > qi, float("-inf"))
    return (s.softmax(-1) @ vv).to(q.dtype)


@pytest.fixture
def forced(monkeypatch, spy):
    """Shortcut decision forced on; FlashAttention-4 dense replaced by the reference; both it and the estimator
    counted."""

    def dense(q, k, v, *, scale=None, out=None):
        o = causal_ref(q, k, v, scale)
        if out is None:
            return o
        out.copy_(o)
        return out

    monkeypatch.setattr(api, "_short_prompt_reason", lambda be, config, q, k: REASON)
    monkeypatch.setattr(fa4, "dense_attention", dense)

    class Calls:
        dense = spy(fa4, "dense_attention")
        estimate = spy(est_kernel, "block_importance")

    return Calls


def qkv(Lq=96, Lk=96, Hq=4, Hkv=2, D=16):
    torch.manual_seed(Lq + Lk)
    return (torch.randn(1, Hq, Lq, D), torch.randn(1, Hkv, Lk, D), torch.randn(1, Hkv, Lk, D))


CFG = PSAConfig.preset("paper", block_q=16, block_k=16, stride=4)


@pytest.mark.parametrize("Lq,Lk", [(96, 96), (40, 100)])
def test_shortcut_runs_dense_before_planning(forced, Lq, Lk):
    q, k, v = qkv(Lq, Lk)
    out = torch.full_like(q, float("nan"))
    got, plan = run_psa(q, k, v, CFG, backend="triton", out=out)
    assert len(forced.dense) == 1 and len(forced.estimate) == 0
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    torch.testing.assert_close(got, causal_ref(q, k, v), atol=1e-5, rtol=1e-5)
    assert plan.dense_reason == REASON
    assert float(plan.level_map.density()) == pytest.approx(1.0)  # every visible block at full resolution
    assert plan.pool_factors == () and plan.k_pooled.shape[2] == 0


@pytest.mark.parametrize(
    "kwargs,cfg",
    [
        (dict(plan_only=True), CFG),
        (dict(key_padding_mask=torch.ones(1, 96, dtype=torch.bool)), CFG),
        (dict(level_map=torch.ones(1, 4, 6, 6, dtype=torch.int8)), CFG),
        ({}, PSAConfig.preset("dense", block_q=16, block_k=16, stride=4)),
        ({}, CFG.replace(dense_guard=False)),
    ],
    ids=["plan_only", "key_padding_mask", "level_map", "dense_preset", "guard_off"],
)
def test_shortcut_stays_out(forced, kwargs, cfg):
    q, k, v = qkv()
    _, plan = run_psa(q, k, v, cfg, backend="triton", **kwargs)
    assert len(forced.dense) == 0 and plan.dense_reason is None


def test_causal_equivalent_len():
    assert causal_equivalent_len(65536, 65536) == 65536
    assert causal_equivalent_len(1, 1) == 1
    # a 16k chunk over a 128k cache does the work of a ~63k square causal call
    assert causal_equivalent_len(16384, 131072) == int((16384 * (2 * 131072 - 16384)) ** 0.5)
    assert 63000 < causal_equivalent_len(16384, 131072) < 64000
    assert causal_equivalent_len(0, 100) == 0
