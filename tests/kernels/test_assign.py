"""Triton level assignment (``kernels/assign/kernel.py``) against ``kernels/assign/naive.py``.

Factors and block lists must be equal, with one exception computed here in float64: in threshold mode a
factor may differ where the reference's ``before(j)`` lies within 1e-5 of a threshold, since float32 sums in
another order may land on either side. Rows with such a difference must still carry the block list of the
kernel's own factors. Quota mode allows no difference (its bounds are computed with identical float32 ops).

CPU tier: the kernel runs under the Triton interpreter (``tests/conftest.py``) at tiny, irregular shapes.
GPU tier (``pytest -m gpu`` with ``PSA_VLM_TEST_GPU=1``): Qwen2.5-VL-7B shapes with real estimator scores.
"""

import pytest
import torch

from psa_vlm.config import PSAConfig
from psa_vlm.kernels.assign import kernel as assign_kernel
from psa_vlm.kernels.assign.kernel import assign_levels
from psa_vlm.kernels.assign.naive import KV_FORCE_FULL, KV_NEEDS_FULL, KV_SKIP, build_block_lists
from psa_vlm.kernels.assign.naive import assign_levels as assign_levels_ref
from psa_vlm.kernels.geometry import FACTOR_ORDER, block_masks, cdiv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEAR = 1e-5


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def poisoned(monkeypatch):
    """Poisoned output buffers (factors 99, indices/counts -7): every element must be written."""

    def alloc(shape, dtype, device):
        return torch.full(shape, 99 if dtype == torch.int8 else -7, dtype=dtype, device=device)

    monkeypatch.setattr(assign_kernel, "_alloc", alloc)


def make_inputs(B, Hq, Hkv, lq, lk, cfg, *, flags=True, ties=False, device=DEV):
    nq, nk = cdiv(lq, cfg.block_q), cdiv(lk, cfg.block_k)
    scores = torch.rand(B, Hq, nq, nk) ** 4  # skewed, like real block importance
    if ties:
        scores = torch.round(scores * 4) / 4  # many exact ties (zeros included)
    cap = torch.tensor([1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 4, (B, Hkv, nk))]
    kv_flags = q_flags = None
    if flags:
        bits = torch.tensor([0, 0, 0, 0, 0, KV_FORCE_FULL, KV_SKIP, KV_NEEDS_FULL, KV_FORCE_FULL | KV_NEEDS_FULL])
        kv_flags = bits[torch.randint(0, len(bits), (B, nk))].to(torch.int8)
        q_flags = torch.rand(B, nq) < 0.2
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(scores), to(cap), to(kv_flags), to(q_flags)


def near_threshold(scores, kv_flags, q_flags, lq, lk, cfg):
    """Bool ``[B, Hq, nq, nk]``: where a factor may legitimately differ from the reference (float64)."""
    B, Hq, nq, nk = scores.shape
    dev = scores.device
    visible, poolable = block_masks(lq, lk, cfg.block_q, cfg.block_k, dev)
    fl = torch.zeros(B, nk, dtype=torch.int32, device=dev) if kv_flags is None else kv_flags.to(torch.int32)
    skip = ((fl & KV_SKIP) != 0)[:, None, None, :]
    active = visible & ~skip
    forced = (visible & ~poolable) | ((fl & (KV_FORCE_FULL | KV_NEEDS_FULL)) != 0)[:, None, None, :]
    forced = forced | (torch.arange(nk, device=dev) < cfg.sink_blocks)
    if q_flags is not None:
        forced = forced | q_flags[:, None, :, None]
    forced = forced & active
    cand = (active & ~forced).expand(B, Hq, nq, nk)
    if cfg.dense:
        return torch.zeros_like(cand)
    if cfg.mode == "quota":
        # the kernel evaluates floor(Q_p * n + 0.5) with the reference's float32 operations (no FMA
        # contraction), so bounds are bit-identical: no allowance (stricter than near-integer tolerance)
        return torch.zeros_like(cand)
    s = torch.where(cand, scores.double(), 0.0)
    key = torch.where(cand, s, -1.0)
    sk, perm = torch.sort(key, dim=-1, descending=True, stable=True)
    tot = s.sum(-1, keepdim=True)
    w = torch.where(tot > 0, sk.clamp(min=0) / torch.where(tot > 0, tot, 1.0), 0.0)
    before_sorted = torch.cumsum(w, -1) - w
    before = torch.empty_like(before_sorted).scatter_(-1, perm, before_sorted)
    taus = dict(zip(FACTOR_ORDER, cfg.thresholds))
    near = torch.zeros_like(cand)
    for p in cfg.factors:
        near |= (before - taus[p]).abs() < NEAR
    return near & cand


def check_assign(got, ref, near, lq, lk, cfg, kv_flags):
    f, idx, cnt = got
    rf, ridx, rcnt = ref
    assert f.dtype == torch.int8 and idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert f.shape == rf.shape and idx.shape == ridx.shape and cnt.shape == rcnt.shape
    mism = f != rf
    bad = mism & ~near
    assert not bad.any(), f"factor differs away from a threshold at {torch.nonzero(bad)[:5].tolist()}"
    same_rows = ~mism.any(-1)
    assert torch.equal(idx[same_rows], ridx[same_rows]), "block lists differ"
    assert torch.equal(cnt[same_rows], rcnt[same_rows]), "counts differ"
    # every row (near-threshold ones too) carries the block list of the kernel's own factors
    bf, bidx, bcnt = build_block_lists(f, lq=lq, lk=lk, block_q=cfg.block_q, block_k=cfg.block_k,
                                       kv_flags=kv_flags)
    assert torch.equal(bf, f) and torch.equal(bidx, idx) and torch.equal(bcnt, cnt)


def run_case(B, Hq, Hkv, lq, lk, cfg, **kw):
    scores, cap, kv_flags, q_flags = make_inputs(B, Hq, Hkv, lq, lk, cfg, **kw)
    got = assign_levels(scores, cap, kv_flags, q_flags, lq=lq, lk=lk, config=cfg)
    ref = assign_levels_ref(scores, cap, kv_flags, q_flags, lq=lq, lk=lk, config=cfg)
    near = near_threshold(scores, kv_flags, q_flags, lq, lk, cfg)
    assert near.float().mean() < 0.01, "the tolerance must stay narrow"
    check_assign(got, ref, near, lq, lk, cfg, kv_flags)
    return got, ref


def preset(name, bq, bk, **kw):
    return PSAConfig.preset(name, block_q=bq, block_k=bk, stride=4, **kw)


# ---------------------------------------------------------------------------------------------- CPU tier
CASES = [
    # preset, B, Hq, Hkv, lq, lk, bq, bk, extra config
    ("paper", 2, 4, 2, 300, 300, 32, 32, {}),
    ("paper", 1, 6, 2, 129, 300, 16, 32, {}),  # Lq < Lk, GQA 3
    ("paper", 2, 4, 2, 17, 17, 16, 16, {}),
    ("paper", 1, 4, 2, 300, 300, 32, 32, dict(pool_factors=(4,), thresholds=(0.3, 0.5, 0.6, 0.6))),
    ("paper", 1, 4, 2, 129, 129, 16, 16, dict(pool_factors=(2, 8), sim_thresholds=None, sink_blocks=2)),
    ("dense", 2, 4, 2, 129, 300, 16, 32, {}),
    ("quota-0.2", 2, 4, 2, 300, 300, 32, 32, {}),
    ("quota-0.3", 1, 6, 2, 129, 300, 16, 32, dict(sink_blocks=0)),
    ("binary", 2, 4, 2, 129, 300, 16, 32, {}),
    ("binary-0.3", 1, 4, 2, 300, 300, 32, 32, dict(sink_blocks=3)),
]


@pytest.mark.parametrize("name,B,Hq,Hkv,lq,lk,bq,bk,extra", CASES)
def test_matches_reference(poisoned, name, B, Hq, Hkv, lq, lk, bq, bk, extra):
    cfg = preset(name, bq, bk, **extra)
    _, (rf, _, _) = run_case(B, Hq, Hkv, lq, lk, cfg)
    vis, _ = block_masks(lq, lk, bq, bk, rf.device)
    levels = {int(p) for p in rf[vis.expand_as(rf)].unique()}
    if cfg.dense:
        assert levels <= {0, 1}
    elif lq > 4 * bq:  # the inputs must exercise more than one level (a test that can't fail is a defect)
        assert len(levels) >= 2, levels


@pytest.mark.parametrize("name", ["paper", "quota-0.2", "binary-0.1"])
def test_no_flags(poisoned, name):
    run_case(2, 4, 2, 129, 300, preset(name, 16, 32), flags=False)


@pytest.mark.parametrize("name", ["paper", "quota-0.1"])
def test_ties_go_to_the_lower_block(poisoned, name):
    run_case(1, 4, 2, 300, 300, preset(name, 32, 32), ties=True)


def test_each_flag_forces_what_it_should(poisoned):
    cfg = preset("quota-0.1", 16, 16, sink_blocks=1)
    lq = lk = 160
    nq = nk = 10
    scores = torch.zeros(1, 2, nq, nk, device=DEV)  # nothing earns a level: only forced blocks are kept
    cap = torch.full((1, 1, nk), 8, dtype=torch.int8, device=DEV)
    kv_flags = torch.zeros(1, nk, dtype=torch.int8, device=DEV)
    kv_flags[0, 3] = KV_FORCE_FULL
    kv_flags[0, 5] = KV_NEEDS_FULL
    kv_flags[0, 6] = KV_SKIP
    q_flags = torch.zeros(1, nq, dtype=torch.bool, device=DEV)
    q_flags[0, 8] = True
    f, idx, cnt = assign_levels(scores, cap, kv_flags, q_flags, lq=lq, lk=lk, config=cfg)
    ref = assign_levels_ref(scores, cap, kv_flags, q_flags, lq=lq, lk=lk, config=cfg)
    check_assign((f, idx, cnt), ref, torch.zeros_like(f, dtype=torch.bool), lq, lk, cfg, kv_flags)
    row = f[0, 0, 9]  # last query block: the 4 forced blocks exceed every quota bound, candidates get 0
    assert row[0] == 1 and row[3] == 1 and row[5] == 1 and row[6] == 0 and row[9] == 1  # sink, text, pad, diag
    assert (f[0, :, 8, :9] == torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.int8, device=DEV)).all()


def test_all_zero_scores_threshold_mode(poisoned):
    """All-zero candidate mass: every candidate has before(j) = 0 and gets full resolution (as the reference)."""
    cfg = preset("paper", 16, 16, sim_thresholds=None)
    nq = nk = 8
    scores = torch.zeros(1, 2, nq, nk, device=DEV)
    cap = torch.full((1, 1, nk), 8, dtype=torch.int8, device=DEV)
    got = assign_levels(scores, cap, None, None, lq=128, lk=128, config=cfg)
    ref = assign_levels_ref(scores, cap, None, None, lq=128, lk=128, config=cfg)
    check_assign(got, ref, torch.zeros_like(got[0], dtype=torch.bool), 128, 128, cfg, None)
    vis, _ = block_masks(128, 128, 16, 16, DEV)
    assert (got[0][..., vis] == 1).all()


def test_checker_can_fail():
    """A factor changed away from every threshold, or a list entry changed, is reported."""
    cfg = preset("paper", 32, 32)
    scores, cap, kv_flags, q_flags = make_inputs(1, 4, 2, 300, 300, cfg)
    ref = assign_levels_ref(scores, cap, kv_flags, q_flags, lq=300, lk=300, config=cfg)
    near = near_threshold(scores, kv_flags, q_flags, 300, 300, cfg)
    f, idx, cnt = (t.clone() for t in ref)
    kept = torch.nonzero((f > 1) & ~near)
    assert len(kept), "no pooled block to corrupt"
    b, h, i, j = kept[0].tolist()
    f[b, h, i, j] = 0
    with pytest.raises(AssertionError):
        check_assign((f, idx, cnt), ref, near, 300, 300, cfg, kv_flags)
    f, idx, cnt = (t.clone() for t in ref)
    idx[b, h, i, 0] = -1
    with pytest.raises(AssertionError):
        check_assign((f, idx, cnt), ref, near, 300, 300, cfg, kv_flags)


def test_errors():
    cfg = preset("paper", 16, 16)
    scores = torch.rand(1, 2, 4, 4, device=DEV)
    cap = torch.ones(1, 1, 4, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError):
        assign_levels(scores, cap, None, None, lq=64, lk=80, config=cfg)  # nk mismatch
    with pytest.raises(ValueError):
        assign_levels(scores, cap[:, :, :3], None, None, lq=64, lk=64, config=cfg)
    with pytest.raises(ValueError):
        assign_levels(scores, cap, torch.zeros(1, 3, dtype=torch.int8, device=DEV), None, lq=64, lk=64, config=cfg)
    with pytest.raises(TypeError):
        assign_levels(scores, cap, None, None, lq=64, lk=64, config="paper")


# ---------------------------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["paper", "quota-0.2", "binary", "dense"])
@pytest.mark.parametrize("L,lq", [(16384, 16384), (12288 + 40, 12288 - 300)])
def test_gpu_qwen_shapes_real_scores(name, L, lq):
    from psa_vlm.api import block_flags
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.estimate.kernel import block_importance
    from psa_vlm.kernels.pool.kernel import pyramid_pool

    cfg = PSAConfig.preset(name)
    q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=None)
    scores = block_importance(q[:, :, L - lq :], k, block_q=128, block_k=128, stride=8)
    _, _, cap = pyramid_pool(k, v, block_k=128, factors=cfg.pool_factors, sim_thresholds=cfg.sim_thresholds)
    kv_flags, q_flags = block_flags(1, lq, L, cfg, torch.device("cuda"))
    got = assign_levels(scores, cap, kv_flags, q_flags, lq=lq, lk=L, config=cfg)
    ref = assign_levels_ref(scores, cap, kv_flags, q_flags, lq=lq, lk=L, config=cfg)
    near = near_threshold(scores, kv_flags, q_flags, lq, L, cfg)
    check_assign(got, ref, near, lq, L, cfg, kv_flags)
