"""The early dense guard of threshold-mode calls (``api._early_guard``, ``cost.early_dense_reason``), on the CPU.

``run_psa`` estimates and assigns the last query blocks of a threshold-mode call first; when their level mix says
the sparse stage plus the rest of the planning would not beat dense attention, it runs dense attention and skips
the rest. On the GPU the split is chosen by ``api._early_guard_split`` (CUDA, estimator >= 1 ms); here it is
forced, so what is tested is (1) that the two halves' estimates equal one estimate of all rows, bit for bit, so a
call that stays sparse gets the plan and output it got before, (2) the wiring of the dense exit, and (3) the
decision rule.
"""

import pytest
import torch

import psa_vlm.api as api
from psa_vlm import PSAConfig, cost
from psa_vlm.api import run_psa
from psa_vlm.kernels.estimate import kernel as est_kernel
from psa_vlm.kernels.estimate import naive as est_naive

CFG = PSAConfig.preset("paper", block_q=16, block_k=16, stride=4)


def qkv(Lq, Lk, Hq=4, Hkv=2, D=16, seed=0):
    torch.manual_seed(seed + Lq + Lk)
    return torch.randn(1, Hq, Lq, D), torch.randn(1, Hkv, Lk, D), torch.randn(1, Hkv, Lk, D)


def causal_ref(q, k, v):
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = (q.float() @ kk.transpose(-1, -2)) * D ** -0.5
    qi = torch.arange(Lq)[:, None] + (k.shape[2] - Lq)
    s = s.masked_fill(torch.arange(k.shape[2])[None, :] > qi, float("-inf"))
    return (s.softmax(-1) @ vv).to(q.dtype)


def split_of(Lq):
    nq = -(-Lq // CFG.block_q)
    return (nq - max(1, nq // 32)) * CFG.block_q


@pytest.mark.parametrize("impl", [est_kernel.block_importance, est_naive.block_importance], ids=["triton", "ref"])
@pytest.mark.parametrize("Lq,Lk,split", [(160, 160, None), (198, 198, None), (100, 180, None), (160, 160, 48)])
def test_split_estimate_equals_one_estimate(impl, Lq, Lk, split):
    """The rows before the split over their own keys and the rows after it over all keys, concatenated, are the
    estimate of all rows: each reduced row is soft-maxed on its own and no key group is cut
    (``(Lk - Lq) % stride == 0``). Irregular lengths (a ragged last reduced row), ``Lq < Lk``, GQA."""
    q, k, _ = qkv(Lq, Lk)
    split = split_of(Lq) if split is None else split
    kw = dict(block_q=CFG.block_q, block_k=CFG.block_k, stride=CFG.stride)
    full = impl(q, k, **kw)
    head = impl(q[:, :, :split], k[:, :, : Lk - Lq + split], **kw)
    tail = impl(q[:, :, split:], k, **kw)
    got = torch.cat([torch.nn.functional.pad(head, (0, tail.shape[-1] - head.shape[-1])), tail], dim=2)
    assert got.shape == full.shape
    if impl is est_kernel.block_importance:  # what the GPU backends run: the same arithmetic, bit for bit
        assert torch.equal(got, full)
    else:  # the PyTorch reference (not used by the early guard) batches its matmuls by shape
        assert torch.allclose(got, full, rtol=1e-5, atol=1e-7)


@pytest.fixture
def forced_split(monkeypatch, spy):
    """The early guard's split forced on (the GPU-only conditions bypassed); the estimator counted."""
    monkeypatch.setattr(api, "_early_guard_split", lambda be, config, qe, k: split_of(qe.shape[2]))
    return spy(est_kernel, "block_importance")


@pytest.mark.parametrize("Lq,Lk", [(160, 160), (198, 198)])
def test_early_exit_runs_dense_and_skips_the_rest(forced_split, monkeypatch, Lq, Lk):
    monkeypatch.setattr(cost, "early_dense_reason", lambda *a, **kw: "forced early exit (test)")
    q, k, v = qkv(Lq, Lk)
    out = torch.full_like(q, float("nan"))
    got, plan = run_psa(q, k, v, CFG, backend="triton", out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.allclose(got, causal_ref(q, k, v), atol=2e-5)
    assert plan.dense_reason == "forced early exit (test)"
    assert float(plan.level_map.density()) == pytest.approx(1.0)
    assert len(forced_split) == 1  # the tail only: the rows before the split were never estimated


@pytest.mark.parametrize("Lq,Lk", [(160, 160), (198, 198), (100, 180)])
def test_staying_sparse_gives_the_plan_and_output_of_one_estimate(forced_split, monkeypatch, Lq, Lk):
    calls = []
    monkeypatch.setattr(cost, "early_dense_reason", lambda *a, **kw: calls.append(a) or None)
    q, k, v = qkv(Lq, Lk, seed=1)
    cfg = CFG.replace(dense_guard=True)
    got, plan = run_psa(q, k, v, cfg, backend="triton")
    # Lq < Lk without FlashAttention-4: no dense path can replace the call (SDPA's causal mask is top-left), so
    # the estimate is not split and nothing is decided early
    assert len(forced_split) == (2 if Lq == Lk else 1) and len(calls) == int(Lq == Lk)
    monkeypatch.setattr(api, "_early_guard_split", lambda *a: None)
    want, plan_one = run_psa(q, k, v, cfg, backend="triton")
    assert torch.equal(plan.level_map.factors, plan_one.level_map.factors)
    assert torch.equal(plan.kv_idx, plan_one.kv_idx) and torch.equal(got, want)
    assert plan.dense_reason == plan_one.dense_reason


def test_the_split_is_taken_only_where_it_can_pay():
    q, k, _ = qkv(160, 160)
    # CPU tensors, quota mode (its mix is known without planning), a cut key group: no split
    assert api._early_guard_split("triton", CFG, q, k) is None
    assert api._early_guard_split("triton", PSAConfig.preset("quota-0.2"), q, k) is None


SHAPES = (1, 28, 128, 65536, 65536)


def test_early_rule_compares_sparse_plus_rest_of_planning_with_dense():
    dense = cost.predict_dense_ms("fa4", *SHAPES)
    sparse_mix, full_mix = [3, 0.1, 0.2, 0, 96.7], [90, 0, 0, 0, 10]
    assert cost.early_dense_reason(("fa4", "triton"), sparse_mix, 3.4, "fa4", *SHAPES, sample_blocks=16) is None
    reason = cost.early_dense_reason(("fa4", "triton"), full_mix, 3.4, "fa4", *SHAPES, sample_blocks=16)
    assert reason is not None and "last 16 query blocks" in reason and "FlashAttention-4 dense" in reason
    # a mix just below break-even on its own is pushed over by the planning still ahead
    attend = min(cost.predict_attend_ms(e, [70, 0, 0, 0, 30], *SHAPES) for e in ("fa4", "triton"))
    assert attend < dense
    assert cost.early_dense_reason(("fa4",), [70, 0, 0, 0, 30], 0.0, "fa4", *SHAPES, sample_blocks=1) is None
    assert cost.early_dense_reason(("fa4",), [70, 0, 0, 0, 30], dense - attend + 0.01, "fa4", *SHAPES,
                                   sample_blocks=1) is not None
    with pytest.raises(ValueError, match="at least one engine"):
        cost.early_dense_reason((), sparse_mix, 0.0, "fa4", *SHAPES, sample_blocks=1)
    with pytest.raises(KeyError):
        cost.early_dense_reason(("fa4",), sparse_mix, 0.0, "fa2", *SHAPES, sample_blocks=1)


def test_estimate_model_scales_with_stride_and_heads():
    s8 = cost.predict_estimate_ms(8, *SHAPES)
    assert s8 == pytest.approx(cost.ESTIMATE_PER_DENSE_WORK * cost.predict_dense_ms("cudnn", *SHAPES)
                               / cost.DENSE_TIMES["cudnn"])
    assert cost.predict_estimate_ms(32, *SHAPES) < cost.predict_estimate_ms(16, *SHAPES) < s8
    assert cost.predict_estimate_ms(8, 1, 4, 128, 65536, 65536) == pytest.approx(s8 * 4 / 28)
    with pytest.raises(ValueError, match="stride"):
        cost.predict_estimate_ms(0, *SHAPES)


# ---------------------------------------------------------------------------------------------- GPU tier
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("L", [8192, 8192 + 200])
def test_split_estimate_equals_one_estimate_gpu(L):
    """The GPU estimator (the Gluon kernel on Hopper, else the Triton GEMM form), bf16, Qwen2.5-VL-7B heads."""
    _need_cuda()
    from psa_vlm.bench.synthetic import video_like_qkv

    q, k, _ = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
    nq = -(-L // 128)
    split = (nq - max(1, nq // 32)) * 128
    kw = dict(block_q=128, block_k=128, stride=8)
    full = est_kernel.block_importance(q, k, **kw)
    head = est_kernel.block_importance(q[:, :, :split], k[:, :, :split], **kw)
    tail = est_kernel.block_importance(q[:, :, split:], k, **kw)
    got = torch.cat([torch.nn.functional.pad(head, (0, tail.shape[-1] - head.shape[-1])), tail], dim=2)
    assert torch.equal(got, full)


@pytest.mark.gpu
def test_early_guard_on_diffuse_and_concentrated_inputs_gpu(monkeypatch):
    """64k tokens, ``paper``: on random Q/K/V (attention spread over every block) the early guard runs dense
    attention after planning only the last query blocks; on video-like inputs (concentrated) the call stays sparse
    with the plan it had without the split."""
    _need_cuda()
    from psa_vlm.bench.synthetic import video_like_qkv

    L = 65536
    cfg = PSAConfig.preset("paper")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, L, 128, device="cuda", dtype=torch.bfloat16) for h in (28, 4, 4))
    o, plan = run_psa(q, k, v, cfg)
    assert plan.dense_reason is not None and "last 16 query blocks" in plan.dense_reason, plan.dense_reason
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert float((o.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
    o, plan = run_psa(q, k, v, cfg)
    assert plan.dense_reason is None and float(plan.level_map.density()) < 0.2
    monkeypatch.setattr(api, "_early_guard_split", lambda *a: None)
    o_one, plan_one = run_psa(q, k, v, cfg)
    assert torch.equal(plan.level_map.factors, plan_one.level_map.factors) and torch.equal(o, o_one)
