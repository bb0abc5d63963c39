"""FlashAttention-4 backend (``kernels/attention/fa4.py``): the level decomposition and the LSE merge.

CPU tier: the decomposition (one block-sparse launch per factor, emulated in plain PyTorch from the same block
lists, then the merge with ``+ ln p`` on each level's log-sum-exp) equals the reference ``sparse_attention`` on
random maps with every level, GQA, ``Lq < Lk``, irregular lengths; the Triton merge kernel (interpreter) equals
the PyTorch merge, including unused levels, empty rows and NaN propagation.
GPU tier (``pytest -m gpu``, needs flash-attn-4 on a Hopper GPU): the fa4 backend against the reference on random
and video-like inputs, outputs NaN-poisoned first; the dense preset against SDPA.
"""

import functools
import math

import pytest
import torch

from psa_vlm.kernels.attention import fa4
from psa_vlm.kernels.attention.naive import sparse_attention as sparse_attention_ref
from psa_vlm.kernels.geometry import cdiv
from psa_vlm.kernels.pool.naive import pyramid_pool

from test_attention import causal_sdpa, random_lists, rand_qkv

ALL_POOL = (2, 4, 8)


def _decomposed(q, k, v, kv_idx, counts, bq, bk, factors, merge, hybrid=()):
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=factors)
    B, Hq, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D)
    out = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype).transpose(1, 2)
    pooled = functools.partial(fa4.triton_pooled_launch, block_q=bq, block_k=bk, factors=factors, scale=scale)
    got = fa4.attend_by_levels(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=factors,
                               scale=scale, out=out, launch=fa4.emulate_level, merge=merge,
                               pooled_launch=pooled if hybrid else None, pooled_factors=hybrid)
    ref = sparse_attention_ref(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=factors)
    return got, ref


@pytest.mark.parametrize(
    "B,Hq,Hkv,Lq,Lk,D,bq,bk,factors,probs",
    [
        (1, 2, 1, 129, 129, 16, 16, 16, ALL_POOL, (0.2, 0.2, 0.2, 0.2, 0.2)),  # every level, irregular L
        (2, 4, 2, 77, 300, 32, 32, 16, ALL_POOL, (0.1, 0.3, 0.2, 0.2, 0.2)),  # GQA, Lq < Lk
        (1, 3, 3, 200, 200, 16, 16, 32, (2, 8), (0.3, 0.3, 0.2, 0.0, 0.2)),  # subset of factors
        (1, 2, 1, 150, 150, 16, 32, 32, (), (0.5, 0.5, 0, 0, 0)),  # binary
        (1, 2, 2, 40, 40, 8, 16, 16, ALL_POOL, (0.9, 0.1, 0.0, 0.0, 0.0)),  # many empty rows (only diag kept)
    ],
)
@pytest.mark.parametrize("merge,hybrid", [("reference", ()), ("triton", ()), ("triton", "largest2")])
def test_levels_plus_merge_equal_reference(B, Hq, Hkv, Lq, Lk, D, bq, bk, factors, probs, merge, hybrid):
    """``hybrid``: the two largest pooled factors in one Triton launch (with its log-sum-exp), the rest emulated."""
    torch.manual_seed(1000 + Lq + Lk + bq)
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32, device="cpu")
    f, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk, probs=probs, device="cpu")
    if not factors:  # the lists may only use factors the pyramid has
        from psa_vlm.kernels.assign.naive import build_block_lists

        f = torch.where(f > 1, torch.ones_like(f), f)
        f, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    else:
        from psa_vlm.kernels.assign.naive import build_block_lists

        allowed = torch.tensor([0, 1] + list(factors), dtype=f.dtype)
        f = torch.where(torch.isin(f, allowed), f, torch.ones_like(f))
        f, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    fn = fa4.merge_levels_reference if merge == "reference" else fa4.merge_levels
    hyb = tuple(factors[-2:]) if hybrid else ()
    got, ref = _decomposed(q, k, v, kv_idx, counts, bq, bk, factors, fn, hyb)
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) output"
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_level_lists_split_by_factor(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(fa4, "_interpreting", lambda: False)
    torch.manual_seed(3)
    Lq = Lk = 256
    f, kv_idx, counts = random_lists(2, 3, Lq, Lk, 32, 32, device="cpu")
    nk, nkf = cdiv(Lk, 32), Lk // 32
    lists = fa4.level_block_lists(kv_idx, counts, [nk, nkf, nkf, nkf])
    for col, p in enumerate((1, 2, 4, 8)):
        cnt, idx = lists[col]
        assert cnt.dtype == idx.dtype == torch.int32 and idx.is_contiguous()
        for b in range(2):
            for h in range(3):
                for i in range(cdiv(Lq, 32)):
                    want = sorted(torch.nonzero(f[b, h, i] == p).flatten().tolist())
                    assert idx[b, h, i, : int(cnt[b, h, i])].tolist() == want


def test_factor_one_is_issued_first_and_cpu_uses_one_stream(monkeypatch):
    """``attend_by_levels`` issues the factor-1 launch first (on the caller's stream), then the others; on CPU
    tensors there is no side stream. The merge still receives the partials in level order (checked against the
    reference)."""
    torch.manual_seed(11)
    B, Hq, Hkv, L, D, bq, bk = 1, 2, 1, 130, 16, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, torch.float32)
    _, kv_idx, counts = random_lists(B, Hq, L, L, bq, bk, probs=(0.3, 0.2, 0.2, 0.2, 0.1))
    assert fa4.CONCURRENT_LEVELS is True and fa4._side_stream(q) is None
    issued = []

    def launch(q_, k_, v_, cnt, idx, **kw):
        issued.append(("level", kw["block_kv"]))
        return fa4.emulate_level(q_, k_, v_, cnt, idx, **kw)

    def pooled(*a, **kw):
        issued.append(("pooled", None))
        return fa4.triton_pooled_launch(*a, block_q=bq, block_k=bk, factors=ALL_POOL, scale=1 / math.sqrt(D), **kw)

    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    out = torch.full((B, L, Hq, D), float("nan")).transpose(1, 2)
    got = fa4.attend_by_levels(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=ALL_POOL,
                               scale=1 / math.sqrt(D), out=out, launch=launch, merge=fa4.merge_levels_reference,
                               pooled_launch=pooled, pooled_factors=(4, 8))
    assert issued == [("level", bk), ("pooled", None), ("level", bk // 2)]
    ref = sparse_attention_ref(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=ALL_POOL)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_merge_handles_unused_levels_empty_rows_and_nan():
    torch.manual_seed(5)
    B, Lq, Hq, D, bq = 1, 40, 2, 16, 16
    outs = [torch.randn(B, Lq, Hq, D) for _ in range(3)]
    lses = [torch.randn(B, Hq, Lq) for _ in range(3)]
    used = [torch.ones(B, Hq, cdiv(Lq, bq), dtype=torch.int32) for _ in range(3)]
    used[1][:, :, 1] = 0  # level 1 unused by query block 1: its (garbage) statistics must not count
    lses[1][:, :, 16:32] = float("nan")
    for u in used:
        u[:, 1, 2] = 0  # head 1, query block 2: no level at all -> zeros
    lses[2][0, 0, 3] = float("nan")  # a NaN statistic in a used level propagates to its row
    bias = [0.0, math.log(2), math.log(4)]
    ref = torch.empty(B, Hq, Lq, D)
    fa4.merge_levels_reference(outs, lses, bias, used, bq, ref)
    got = torch.full((B, Hq, Lq, D), float("nan"))
    fa4.merge_levels(outs, lses, bias, used, bq, got)
    nan_row = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    nan_row[0, 0, 3] = True
    assert torch.isnan(got[nan_row]).all() and torch.isnan(ref[nan_row]).all()
    assert not torch.isnan(got[~nan_row]).any()
    assert (got[0, 1, 32:] == 0).all()
    torch.testing.assert_close(got[~nan_row], ref[~nan_row], atol=1e-5, rtol=1e-5)
    # hand check of one row: weights exp(lse + ln p) normalised
    r = 5
    w = torch.stack([lses[i][0, 0, r] + bias[i] for i in range(3)]).softmax(0)
    want = sum(w[i] * outs[i][0, r, 0] for i in range(3))
    torch.testing.assert_close(got[0, 0, r], want, atol=1e-5, rtol=1e-5)


def test_unsupported_reasons_name_the_limit():
    q = torch.randn(1, 2, 256, 128)
    assert "CUDA" in fa4.fa4_unsupported(q, block_q=128, block_k=128, factors=ALL_POOL)
    assert fa4.FA4_INSTALL_HINT.startswith('pip install "psa-vlm[fa4]"')


# ---------------------------------------------------------------------------------------------- pooled launch engine
def _pooled_case(dtype=torch.float16, D=64, seed=5):
    """A small GQA call with pooled-only lists (the (4, 8) tail) and the reference of that list."""
    torch.manual_seed(seed)
    B, Hq, Hkv, Lq, Lk, bq, bk = 1, 4, 2, 200, 300, 128, 128
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, device="cpu")
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk, probs=(0.2, 0.2, 0.2, 0.2, 0.2), device="cpu")
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    widths = [cdiv(Lk, bk), Lk // bk, 0, 0]
    tcounts, tidx = fa4.level_block_lists(kv_idx, counts, widths, tail_from=2)[4]
    ref = sparse_attention_ref(q.float(), k.float(), v.float(), kp.float(), vp.float(), tidx, tcounts, block_q=bq,
                               block_k=bk, factors=ALL_POOL)
    return (q, k, v, kp.contiguous(), vp.contiguous(), tidx, tcounts), ref


def _run_pooled(args):
    q = args[0]
    B, Hq, Lq, D = q.shape
    out = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype).transpose(1, 2)
    lse = torch.full((B, Hq, Lq), float("nan"))
    fa4.pooled_launch(*args, out=out, lse=lse, block_q=128, block_k=128, factors=ALL_POOL, scale=D ** -0.5)
    return out, lse


def poison_unlisted(kp, vp, tidx, tcounts, block_k, factors):
    """NaN in every pyramid row of ``kp`` / ``vp`` that no entry of the pooled-only list ``tidx`` / ``tcounts``
    reads (all levels; rows of one batch element and KV head are read by its query heads' lists). A kernel that
    loads rows it should not (past a stream's end, another level) gives NaN."""
    from psa_vlm.kernels.geometry import FACTOR_ORDER, level_offsets

    B, Hq = tidx.shape[:2]
    Hkv = kp.shape[1]
    G = Hq // Hkv
    listed = torch.zeros(B, Hkv, kp.shape[2], dtype=torch.bool, device=kp.device)
    rows_per = {p: block_k // p for p in factors}
    R = kp.shape[2]
    nkf = R // sum(rows_per.values())
    offs = level_offsets(nkf, block_k, factors)
    cnt = tcounts.cpu()
    idx = tidx.cpu()
    for b in range(B):
        for h in range(Hq):
            for i in range(idx.shape[2]):
                pos = 0
                for col, p in enumerate(FACTOR_ORDER):
                    c = int(cnt[b, h, i, col])
                    if p != 1:
                        for j in idx[b, h, i, pos:pos + c].tolist():
                            r0 = offs[p] + j * rows_per[p]
                            listed[b, h // G, r0:r0 + rows_per[p]] = True
                    pos += c
    kp, vp = kp.clone(), vp.clone()
    kp[~listed] = float("nan")
    vp[~listed] = float("nan")
    return kp, vp


def test_poison_unlisted_keeps_the_triton_pooled_launch_finite():
    """The helper of the GPU test below, checked on the Triton kernel: unlisted rows are poisoned, listed ones not."""
    (q, k, v, kp, vp, tidx, tcounts), ref = _pooled_case()
    pkp, pvp = poison_unlisted(kp, vp, tidx, tcounts, 128, ALL_POOL)
    assert torch.isnan(pkp).any() and not torch.isnan(pkp).all()
    out, lse = _run_pooled((q, k, v, pkp, pvp, tidx, tcounts))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_pooled_engine_is_triton_off_hopper(monkeypatch):
    """On the CPU (and under the interpreter) the pooled launch is the Triton kernel's, whatever is asked."""
    (q, k, v, kp, vp, tidx, tcounts), ref = _pooled_case()
    assert fa4.pooled_engine(q, kp, vp, block_q=128, block_k=128, factors=ALL_POOL) == \
        ("triton", "not a compute capability 9.x CUDA device")
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON": False})
    assert fa4.pooled_engine(q, kp, vp, block_q=128, block_k=128, factors=ALL_POOL)[0] == "triton"
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON": True})
    with pytest.raises(RuntimeError, match="cannot run"):
        _run_pooled((q, k, v, kp, vp, tidx, tcounts))


def test_pooled_gluon_needs_triton_3_6(monkeypatch):
    monkeypatch.setattr(fa4.triton, "__version__", "3.5.1")
    fa4._pooled_gluon_import_error.cache_clear()
    try:
        assert "3.5.1" in fa4._pooled_gluon_import_error()
    finally:
        monkeypatch.undo()
        fa4._pooled_gluon_import_error.cache_clear()


@pytest.fixture
def pooled_as_on_hopper(monkeypatch):
    """The pooled launch as on a Hopper GPU: only the hardware check is patched, no failure recorded yet; yields
    the ``hopper`` module to patch."""
    pytest.importorskip("triton.experimental.gluon")
    if fa4._pooled_gluon_import_error() is not None:
        pytest.skip(f"Gluon kernel unavailable here: {fa4._pooled_gluon_import_error()}")
    from psa_vlm.kernels import gluon_support
    from psa_vlm.kernels.attention import hopper

    monkeypatch.setattr(fa4, "_POOLED_GLUON_FAILURE", None)
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {})
    monkeypatch.setattr(gluon_support, "hopper_device", lambda t, interpret: True)
    return hopper


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf")])
def test_gluon_pooled_launch_refuses_a_bad_scale(scale):
    """The Gluon kernel's uniform-tile softmax takes the row maximum of the unscaled logits, which is right only for
    a positive scale: ``launch`` refuses any other before touching the device (``psa_attention`` validates it too)."""
    pytest.importorskip("triton.experimental.gluon")
    from psa_vlm.kernels.attention import hopper

    q = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    kp = torch.zeros(1, 1, 112, 64, dtype=torch.bfloat16)
    idx, counts = torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.zeros(1, 2, 1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        hopper.launch(q, kp, kp, idx, counts, torch.empty_like(q), None, Lk=128, block_q=128, block_k=128,
                      factors=(2, 4, 8), scale=scale)


def test_pooled_unsupported_names_the_limit(pooled_as_on_hopper, monkeypatch):
    hopper = pooled_as_on_hopper
    (q, k, v, kp, vp, tidx, tcounts), _ = _pooled_case()
    kw = dict(block_q=128, block_k=128, factors=ALL_POOL)
    assert hopper.pooled_unsupported(q, kp, vp, **kw) is None
    assert fa4.pooled_engine(q, kp, vp, **kw) == ("gluon", None)
    assert "dtype" in hopper.pooled_unsupported(q.float(), kp, vp, **kw)
    assert "head_dim 80" in hopper.pooled_unsupported(torch.zeros(1, 4, 200, 80, dtype=q.dtype), kp, vp, **kw)
    assert "block_q 64" in hopper.pooled_unsupported(q, kp, vp, block_q=64, block_k=128, factors=ALL_POOL)
    assert "block_k 32" in hopper.pooled_unsupported(q, kp, vp, block_q=128, block_k=32, factors=ALL_POOL)
    assert "block_k 512" in hopper.pooled_unsupported(q, kp, vp, block_q=128, block_k=512, factors=ALL_POOL)
    assert "non-contiguous" in hopper.pooled_unsupported(q, kp.transpose(1, 2), vp, **kw)
    assert "block_k 96" in hopper.pooled_unsupported(q, kp, vp, block_q=128, block_k=96, factors=ALL_POOL)
    assert "one dtype" in hopper.pooled_unsupported(q, kp.to(torch.bfloat16), vp, **kw)
    out = torch.zeros(1, 4, 200, 2 * 64, dtype=q.dtype)[..., ::2]
    assert "out with a non-contiguous" in hopper.pooled_unsupported(q, kp, vp, out=out, **kw)
    lse = torch.zeros(1, 4, 400)[..., ::2]
    assert "lse with a non-contiguous" in hopper.pooled_unsupported(q, kp, vp, lse=lse, **kw)
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON_TILES": {"BM": 256}})  # the effective tiles decide
    assert fa4.pooled_engine(q, kp, vp, **kw)[1] == "tiles BM 256 (128 only: two warpgroups of 64 query rows)"
    assert hopper.shared_bytes(hopper.TILES, 128) <= hopper.SHARED_LIMIT
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON_TILES": {"NSK": 3, "NSV": 3}})  # fits at D 64
    assert fa4.pooled_engine(q, kp, vp, **kw) == ("gluon", None)
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON_TILES": {"NSK": 8, "NSV": 8}})
    assert "need 295184 bytes of shared memory" in fa4.pooled_engine(q, kp, vp, **kw)[1]  # D 64
    assert hopper.shared_bytes(dict(hopper.TILES, NSK=3, NSV=3), 128) > hopper.SHARED_LIMIT  # 245,912 B compiled


def test_fa4_backend_runs_the_pooled_gluon_kernel_once(monkeypatch, pooled_as_on_hopper):
    """``fa4.sparse_attention`` sends its factors 4 / 8 through ``pooled_launch``: on Hopper the Gluon kernel runs once
    per call and the Triton kernel not at all (FlashAttention-4's level launches emulated; the Gluon kernel stood in
    for by the Triton kernel's launch, which computes the same)."""
    hopper = pooled_as_on_hopper
    real_triton = fa4.triton_pooled_launch
    calls = {"gluon": 0, "triton": 0}

    def gluon_stand_in(*args, tiles=None, **kwargs):
        calls["gluon"] += 1
        real_triton(*args, **kwargs)

    def counted_triton(*args, **kwargs):
        calls["triton"] += 1
        real_triton(*args, **kwargs)

    monkeypatch.setattr(hopper, "pooled_launch", gluon_stand_in)
    monkeypatch.setattr(fa4, "triton_pooled_launch", counted_triton)
    monkeypatch.setattr(fa4, "fa4_unsupported", lambda *a, **kw: None)
    monkeypatch.setattr(fa4, "flash_attn_level", fa4.emulate_level)
    monkeypatch.setattr(fa4, "TRITON_POOLED_FACTORS", (4, 8))
    torch.manual_seed(8)
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 4, 2, 300, 300, 64, 128, 128
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float16, device="cpu")
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk, device="cpu")
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    got = fa4.sparse_attention(q, k, v, kp.contiguous(), vp.contiguous(), kv_idx, counts, block_q=bq, block_k=bk,
                               factors=ALL_POOL)
    assert calls == {"gluon": 1, "triton": 0}
    ref = sparse_attention_ref(q.float(), k.float(), v.float(), kp.float(), vp.float(), kv_idx, counts, block_q=bq,
                               block_k=bk, factors=ALL_POOL)
    torch.testing.assert_close(got.float(), ref, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("error", ["compile", "host"])
def test_pooled_gluon_failure_falls_back(monkeypatch, pooled_as_on_hopper, caplog, error):
    """A Triton whose Gluon API no longer fits: logged once, the Triton kernel writes the outputs from then on."""
    from triton.errors import TritonError

    hopper = pooled_as_on_hopper
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if error == "compile":
            raise TritonError("gluon API changed")
        raise TypeError("gluon API changed: unexpected keyword")

    monkeypatch.setattr(hopper, "pooled_launch", broken)
    args, ref = _pooled_case()
    with caplog.at_level("WARNING", logger=fa4.__name__):
        out, lse = _run_pooled(args)
    assert calls == [1] and "gluon API changed" in fa4._POOLED_GLUON_FAILURE
    assert any("did not compile" in r.getMessage() for r in caplog.records)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    _run_pooled(args)
    assert calls == [1], "a failed Gluon kernel is not compiled again"
    monkeypatch.setattr(fa4, "_POOLED_GLUON_FAILURE", None)
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON": True})
    with pytest.raises((TritonError, TypeError)):  # asked for explicitly: the error, not a fallback
        _run_pooled(args)


def test_pooled_gluon_device_errors_propagate(monkeypatch, pooled_as_on_hopper):
    hopper = pooled_as_on_hopper
    args, _ = _pooled_case()
    for exc in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("Triton Error [CUDA]: an illegal address")):
        def launch(*a, _exc=exc, **kw):
            raise _exc

        monkeypatch.setattr(hopper, "pooled_launch", launch)
        with pytest.raises(type(exc)):
            _run_pooled(args)
        assert fa4._POOLED_GLUON_FAILURE is None


# ---------------------------------------------------------------------------------------------- GPU tier
def _need_fa4():
    if not torch.cuda.is_available() or not fa4.fa4_available():
        pytest.skip(f"needs flash-attn-4 on a Hopper GPU: {fa4.fa4_import_error() or 'no sm90 GPU'}")


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lq,D", [(4096, 4096, 128), (5000, 5000, 128), (6000, 2500, 128), (3000, 3000, 64)])
@pytest.mark.parametrize("video_like", [False, True])
@pytest.mark.parametrize("triton_pooled,engine", [((), None), ((4, 8), "gluon"), ((4, 8), "triton")])
def test_fa4_backend_matches_reference_gpu(L, Lq, D, video_like, triton_pooled, engine, monkeypatch):
    """``engine``: the pooled launch's kernel (``fa4.pooled_launch``; the Gluon one needs Hopper and Triton >= 3.6)."""
    _need_fa4()
    monkeypatch.setattr(fa4, "TRITON_POOLED_FACTORS", triton_pooled)
    if engine == "gluon" and (torch.cuda.get_device_capability()[0] != 9 or fa4._pooled_gluon_import_error()):
        pytest.skip(f"Gluon pooled kernel unavailable: {fa4._pooled_gluon_import_error() or 'not a Hopper GPU'}")
    monkeypatch.setattr(fa4, "POOLED_OVERRIDES", {"GLUON": engine == "gluon"} if engine else {})
    from psa_vlm.kernels.attention import hopper

    gluon_calls = []
    real_gluon = hopper.pooled_launch
    monkeypatch.setattr(hopper, "pooled_launch", lambda *a, **kw: (gluon_calls.append(1), real_gluon(*a, **kw)))
    from psa_vlm.bench.synthetic import video_like_qkv

    torch.manual_seed(L + Lq + D)
    Hq, Hkv, bq, bk = 28, 4, 128, 128
    if video_like:
        q, k, v = video_like_qkv(1, Hq, Hkv, L, D, dtype=torch.bfloat16, device="cuda")
        q = q[:, :, L - Lq :].contiguous()
    else:
        q, k, v = rand_qkv(1, Hq, Hkv, Lq, L, D, torch.bfloat16, device="cuda")
    _, kv_idx, counts = random_lists(1, Hq, Lq, L, bq, bk, device="cuda")
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    out = torch.full((1, Lq, Hq, D), float("nan"), dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    got = fa4.sparse_attention(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=ALL_POOL, out=out)
    assert len(gluon_calls) == (1 if engine == "gluon" else 0)
    ref = sparse_attention_ref(q.float(), k.float(), v.float(), kp.float(), vp.float(), kv_idx, counts,
                               block_q=bq, block_k=bk, factors=ALL_POOL)
    assert not torch.isnan(got).any()
    err = float((got.float() - ref).norm() / ref.norm())
    assert err <= 1e-2, err


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,Hq,Hkv,Lq,Lk,D,dtype,factors,tail",
    [
        (1, 4, 1, 1000, 1000, 128, torch.bfloat16, ALL_POOL, (4, 8)),  # irregular L, MQA
        (2, 6, 2, 700, 2100, 128, torch.float16, ALL_POOL, (2, 4, 8)),  # batch 2, Lq < Lk, every pooled level
        (1, 7, 1, 3000, 3000, 64, torch.bfloat16, ALL_POOL, (4, 8)),  # head_dim 64
        (1, 4, 2, 1500, 2600, 128, torch.bfloat16, (2, 8), (8,)),  # a factor subset: 16-row runs, one level
        (1, 4, 4, 1300, 1300, 128, torch.bfloat16, (2, 4), (2, 4)),  # 32-row runs
        (1, 2, 1, 100, 5000, 128, torch.bfloat16, ALL_POOL, (4, 8)),  # one query block, a long list
    ],
)
@pytest.mark.parametrize("per_sm", [0, 1, -3])
@pytest.mark.parametrize("uniform", [True, False])
def test_gluon_pooled_kernel_matches_reference_gpu(B, Hq, Hkv, Lq, Lk, D, dtype, factors, tail, per_sm, uniform):
    """The Gluon pooled kernel (``hopper.py``) on pooled-only lists against the float32 reference, outputs and
    log-sum-exps NaN-poisoned first; its log-sum-exp against the Triton kernel's. Every pyramid row the list does not
    read holds NaN (``poison_unlisted``): none may leak (runs past a stream's end load zeros). ``per_sm``: one
    program per query tile (0), the persistent grid (1), or 3 programs in all (-3: every program loops over many
    query tiles, so the rings' slots, phases and the warpgroups' turns carry across them). ``uniform``: the short
    softmax on tiles inside one factor's rows, or the column-wise one on every tile."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon pooled kernel needs a Hopper GPU")
    if fa4._pooled_gluon_import_error() is not None:
        pytest.skip(f"Gluon pooled kernel unavailable: {fa4._pooled_gluon_import_error()}")
    from psa_vlm.kernels.assign.naive import build_block_lists
    from psa_vlm.kernels.attention import hopper
    from psa_vlm.kernels.geometry import FACTOR_ORDER

    torch.manual_seed(Lq + Lk + D)
    bq = bk = 128
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, device="cuda")
    nq, nk = cdiv(Lq, bq), cdiv(Lk, bk)
    choice = torch.multinomial(torch.tensor([0.3, 0.1, 0.2, 0.2, 0.2]), B * Hq * nq * nk, replacement=True)
    f = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[choice].reshape(B, Hq, nq, nk)
    f = torch.where(torch.isin(f, torch.tensor([0, 1] + list(factors), dtype=f.dtype)), f, torch.ones_like(f))
    _, kv_idx, counts = build_block_lists(f.cuda(), lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=factors)
    kp, vp = kp.contiguous(), vp.contiguous()
    nkf = Lk // bk
    widths = [nk] + [nkf if (p in factors and p not in tail) else 0 for p in FACTOR_ORDER[1:]]
    tcounts, tidx = fa4.level_block_lists(kv_idx, counts, widths, tail_from=FACTOR_ORDER.index(tail[0]))[4]
    assert int(tcounts[..., 1:].sum()) > 0
    ref = sparse_attention_ref(q.float(), k.float(), v.float(), kp.float(), vp.float(), tidx, tcounts, block_q=bq,
                               block_k=bk, factors=factors)
    kp, vp = poison_unlisted(kp, vp, tidx, tcounts, bk, factors)
    scale = D ** -0.5
    outs = {}
    tiles = dict(hopper.TILES, PROGRAMS_PER_SM=per_sm) if per_sm >= 0 else dict(hopper.TILES, PROGRAMS=-per_sm)
    tiles["UNIFORM"] = uniform
    gluon = functools.partial(hopper.pooled_launch, tiles=tiles)
    for name, launch in (("gluon", gluon), ("triton", fa4.triton_pooled_launch)):
        out = torch.full((B, Lq, Hq, D), float("nan"), dtype=dtype, device="cuda").transpose(1, 2)
        lse = torch.full((B, Hq, Lq), float("nan"), device="cuda")
        launch(q, k, v, kp, vp, tidx, tcounts, out=out, lse=lse, block_q=bq, block_k=bk, factors=factors, scale=scale)
        outs[name] = (out, lse)
    out, lse = outs["gluon"]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN-poisoned) or leaked NaN"
    err = float((out.float() - ref).norm() / ref.norm())
    assert err <= 1e-2, err
    t_lse = outs["triton"][1]
    assert torch.equal(torch.isinf(lse), torch.isinf(t_lse))
    fin = torch.isfinite(t_lse)
    assert float((lse[fin] - t_lse[fin]).abs().max()) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("caller_stream", [False, True])
def test_side_stream_equals_one_stream_gpu(caller_stream, monkeypatch):
    """The launches other than factor 1's run on a side stream (``CONCURRENT_LEVELS``): outputs equal the
    one-stream order bit for bit, also when the caller works on its own stream (inputs written on it just
    before the call, output read on it right after); every output poisoned first."""
    _need_fa4()
    from psa_vlm.bench.synthetic import video_like_qkv

    torch.manual_seed(21)
    L, Hq, Hkv, D, bq, bk = 6000, 28, 4, 128, 128, 128
    q0, k0, v0 = video_like_qkv(1, Hq, Hkv, L, D, dtype=torch.bfloat16, device="cuda")
    _, kv_idx, counts = random_lists(1, Hq, L, L, bq, bk, device="cuda")
    streams_seen = []
    real_level = fa4.flash_attn_level
    monkeypatch.setattr(fa4, "flash_attn_level", lambda *a, **kw: (
        streams_seen.append(torch.cuda.current_stream().cuda_stream), real_level(*a, **kw))[1])

    def run(flag):
        monkeypatch.setattr(fa4, "CONCURRENT_LEVELS", flag)
        stream = torch.cuda.Stream() if caller_stream else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            q, k, v = (t * 1.0 for t in (q0, k0, v0))  # written on the caller's stream right before the call
            kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
            out = torch.full((1, L, Hq, D), float("nan"), dtype=torch.bfloat16, device="cuda").transpose(1, 2)
            fa4.sparse_attention(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=ALL_POOL, out=out)
            res = out.clone()  # read on the caller's stream right after
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return res, stream.cuda_stream

    got, caller = run(True)
    assert len(set(streams_seen)) == 2 and streams_seen[0] == caller  # factor 1 on the caller's, factor 2 aside
    streams_seen.clear()
    want, caller = run(False)
    assert set(streams_seen) == {caller}
    assert not torch.isnan(got).any()
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_fa4_dense_preset_matches_sdpa_gpu():
    _need_fa4()
    from psa_vlm import PSAConfig, psa_attention

    torch.manual_seed(7)
    q, k, v = rand_qkv(1, 28, 4, 3000, 4200, 128, torch.bfloat16, device="cuda")
    got = psa_attention(q, k, v, PSAConfig.preset("dense"), backend="fa4")
    ref = causal_sdpa(q, k, v)
    err = float((got.double() - ref).norm() / ref.norm())
    assert err <= 1e-2, err
    from psa_vlm.api import run_psa

    _, plan = run_psa(q, k, v, PSAConfig.preset("dense"), backend="auto")
    assert plan.attend_backend is None  # FlashAttention-4's dense forward ran, no attend stage


@pytest.mark.gpu
def test_auto_backend_short_prompts_gpu(spy):
    """``backend="auto"`` with FlashAttention-4: a threshold-mode call below ``THRESHOLD_MODE_MIN_TOKENS`` runs
    FlashAttention-4 dense before planning (recorded in the plan), with ``auto`` and with an explicit ``fa4``
    (the dense guard applies to both); a quota-mode call below ``AUTO_FA4_MIN_TOKENS`` keeps the sparse path on
    the Triton attend stage under ``auto`` and on FlashAttention-4's under ``fa4`` without the guard (with it, the
    guard runs FlashAttention-4 dense: the fa4 engine is host-bound at this length)."""
    _need_fa4()
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.cost import AUTO_FA4_MIN_TOKENS, THRESHOLD_MODE_MIN_TOKENS
    from psa_vlm.kernels.attention import kernel as triton_attention

    L = 6000
    assert L < THRESHOLD_MODE_MIN_TOKENS <= AUTO_FA4_MIN_TOKENS
    torch.manual_seed(11)
    q, k, v = rand_qkv(1, 28, 4, L, L, 128, torch.bfloat16, device="cuda")
    ref = causal_sdpa(q, k, v)
    for backend in ("auto", "fa4"):
        out = torch.full_like(q, float("nan"))
        got, plan = run_psa(q, k, v, PSAConfig.preset("paper"), backend=backend, out=out)
        assert got.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
        assert plan.dense_reason is not None and "threshold-mode" in plan.dense_reason, backend
        assert float(plan.level_map.density()) == pytest.approx(1.0)
        assert float((got.double() - ref).norm() / ref.norm()) <= 1e-2
    # quota mode: sparse; which attend stage ran is seen through the Triton kernel's entry point
    calls = spy(triton_attention, "sparse_attention")
    quota = PSAConfig.preset("quota-0.2")
    a, plan_q = run_psa(q, k, v, quota, backend="auto")
    assert calls and plan_q.dense_reason is None and float(plan_q.level_map.density()) < 0.5
    calls.clear()
    b, plan_f = run_psa(q, k, v, quota.replace(dense_guard=False), backend="fa4")
    assert not calls and plan_f.dense_reason is None
    assert float((a.float() - b.float()).norm() / b.float().norm()) <= 1e-2
    # with the guard, the explicit fa4 engine's host-bound launches (cost.ENGINE_TIMES host floors) lose to
    # FlashAttention-4 dense at this length: dense attention runs, and the plan says why
    c, plan_g = run_psa(q, k, v, quota, backend="fa4")
    assert not calls and plan_g.dense_reason is not None and "FlashAttention-4 dense" in plan_g.dense_reason
    assert float((c.double() - ref).norm() / ref.norm()) <= 1e-2


@pytest.mark.gpu
def test_auto_engine_by_level_mix_gpu(spy):
    """``backend="auto"`` at 64k tokens: a quota-0.2 plan takes FlashAttention-4's level launches, a pyramid plan
    of ~3% density the Triton kernel's single launch (``cost.faster_attend_backend``: FlashAttention-4's level
    launches and merge cost more per query tile than such a plan's blocks); each output equals the other engine's
    on the same plan."""
    _need_fa4()
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.attention import fa4 as fa4_mod

    q, k, v = video_like_qkv(1, 28, 4, 65536, 128, dtype=torch.bfloat16, device="cuda", seed=None)
    launches = spy(fa4_mod, "flash_attn_level")
    for cfg, engine in ((PSAConfig.preset("quota-0.2"), "fa4"),
                        (PSAConfig.preset("quota-0.2").replace(quotas=(0.02, 0.005, 0.005, 0.01)), "triton")):
        launches.clear()
        out = torch.full_like(q, float("nan"))
        got, plan = run_psa(q, k, v, cfg, backend="auto", out=out)
        assert plan.attend_backend == engine and plan.dense_reason is None
        assert bool(launches) == (engine == "fa4")
        assert not torch.isnan(out).any()
        other, _ = run_psa(q, k, v, cfg, backend="triton" if engine == "fa4" else "fa4")
        assert float((got.float() - other.float()).norm() / other.float().norm()) <= 1e-2
