"""Semantics of the PyTorch reference (PSA_SPEC steps 2-7) against independent constructions."""

import math

import pytest
import torch

from psa_vlm import LevelMap, PSAConfig, build_level_map, psa_attention
from psa_vlm.api import block_flags, run_psa
from psa_vlm.kernels.assign.naive import KV_FORCE_FULL, KV_SKIP, assign_levels, build_block_lists
from psa_vlm.kernels.estimate.naive import block_importance
from psa_vlm.kernels.geometry import block_masks, cdiv
from psa_vlm.kernels.pool.naive import pyramid_pool

SMALL = dict(block_q=16, block_k=16, stride=4, text_tail=16)


def rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


def sdpa_causal(q, k, v, key_padding_mask=None):
    """Dense bottom-right causal attention in float64, GQA by repeating KV (test-only)."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    Lk = k.shape[2]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    logits = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(D)
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return p @ vv


def explicit_psa(q, k, v, factors, bq, bk, key_padding_mask=None):
    """Independent construction: per query row, gather keys; a pooled key is repeated p times (no ln p)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    _, poolable = block_masks(Lq, Lk, bq, bk)
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, h // G].double(), v[b, h // G].double()
            for r in range(Lq):
                pos = Lk - Lq + r
                i = r // bq
                keys, vals = [], []
                for j in range(cdiv(Lk, bk)):
                    f = int(factors[b, h, i, j])
                    lo, hi = j * bk, min((j + 1) * bk, Lk)
                    if f == 0 or lo > Lk - Lq + min((i + 1) * bq, Lq) - 1:
                        continue
                    pad_in_block = key_padding_mask is not None and not bool(key_padding_mask[b, lo:hi].all())
                    if f == 1 or not bool(poolable[i, j]) or pad_in_block:
                        for t in range(lo, hi):
                            if t <= pos and (key_padding_mask is None or bool(key_padding_mask[b, t])):
                                keys.append(kh[t])
                                vals.append(vh[t])
                    else:
                        for w in range(lo, hi, f):
                            km, vm = kh[w : w + f].mean(0), vh[w : w + f].mean(0)
                            for _ in range(f):
                                keys.append(km)
                                vals.append(vm)
                if not keys:
                    continue
                K, V = torch.stack(keys), torch.stack(vals)
                p = torch.softmax(K @ q[b, h, r].double() / math.sqrt(D), 0)
                out[b, h, r] = p @ V
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------- dense anchor
@pytest.mark.parametrize(
    "B,Hq,Hkv,Lq,Lk,D",
    [(1, 2, 2, 64, 64, 16), (2, 4, 2, 17, 129, 32), (2, 6, 2, 129, 300, 16), (1, 4, 1, 300, 300, 8)],
)
def test_dense_preset_equals_causal_sdpa(B, Hq, Hkv, Lq, Lk, D):
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D)
    out = psa_attention(q, k, v, PSAConfig.preset("dense", **SMALL), backend="reference")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, sdpa_causal(q, k, v)) < 1e-6


# ----------------------------------------------------------------------------------------- pooled anchor
@pytest.mark.parametrize(
    "B,Hq,Hkv,Lq,Lk,bq,bk",
    [(2, 4, 2, 129, 300, 16, 16), (2, 6, 2, 47, 200, 16, 32), (1, 2, 1, 96, 96, 32, 16)],
)
def test_reference_equals_explicit_construction_on_random_maps(B, Hq, Hkv, Lq, Lk, bq, bk):
    D = 8
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D)
    nq, nk = cdiv(Lq, bq), cdiv(Lk, bk)
    choices = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
    factors = choices[torch.randint(0, 5, (B, Hq, nq, nk))]
    # make sure every pooled level lands on a poolable pair at least once (random draws can miss one)
    _, poolable = block_masks(Lq, Lk, bq, bk)
    pi, pj = poolable.nonzero(as_tuple=True)
    assert len(pi) >= 3, "shape must leave room for three poolable pairs"
    for n, p in enumerate((2, 4, 8)):
        factors[0, 0, pi[n], pj[n]] = p
    cfg = PSAConfig.preset("paper", block_q=bq, block_k=bk, stride=4)
    out = psa_attention(q, k, v, cfg, level_map=factors, backend="reference")
    assert rel(out, explicit_psa(q, k, v, factors, bq, bk)) < 1e-5
    # every level actually occurs among the blocks the attention reads
    f, _, counts = build_block_lists(factors, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    assert (counts.sum((0, 1, 2)) > 0).all(), counts.sum((0, 1, 2))


def test_pooled_bias_is_exact_for_repeated_keys():
    """If the p keys of every window are equal, pooling with + ln p reproduces dense attention exactly."""
    B, H, L, D, bk = 1, 2, 128, 16, 16
    q = torch.randn(B, H, L, D)
    k = torch.randn(B, H, L // 8, D).repeat_interleave(8, 2)
    v = torch.randn(B, H, L // 8, D).repeat_interleave(8, 2)
    cfg = PSAConfig.preset("paper", block_q=16, block_k=bk, stride=4)
    nq = nk = L // 16
    for p in (2, 4, 8):
        f = torch.full((B, H, nq, nk), p, dtype=torch.int8)
        out = psa_attention(q, k, v, cfg, level_map=f, backend="reference")
        assert rel(out, sdpa_causal(q, k, v)) < 1e-6


def test_level_map_object_and_promotion():
    """Pooled factors on diagonal/incomplete blocks are promoted to full; invisible blocks are ignored."""
    q, k, v = rand_qkv(1, 2, 1, 40, 100, 8)
    f = torch.full((1, 2, 3, 7), 8, dtype=torch.int8)
    cfg = PSAConfig.preset("paper", block_q=16, block_k=16, stride=4)
    lm = LevelMap(f, 16, 16, 40, 100)
    out = psa_attention(q, k, v, cfg, level_map=lm, backend="reference")
    norm, _, _ = build_block_lists(f, lq=40, lk=100, block_q=16, block_k=16)
    vis, poolable = block_masks(40, 100, 16, 16)
    assert ((norm == 8) == (poolable & torch.ones_like(norm, dtype=torch.bool))).all()
    assert ((norm == 1) == (vis & ~poolable)).all()
    assert (norm[..., ~vis.any(0)] == 0).all()
    assert rel(out, explicit_psa(q, k, v, f, 16, 16)) < 1e-5


# ----------------------------------------------------------------------------------------- pyramid / cap
def test_pyramid_means_and_layout():
    B, H, L, D, bk = 2, 2, 70, 4, 16  # 4 complete blocks + 6 tail keys
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    kp, vp, cap = pyramid_pool(k, v, block_k=bk, factors=(2, 8), sim_thresholds=None)
    nkf = L // bk
    assert kp.shape == (B, H, nkf * (8 + 2), D)
    torch.testing.assert_close(kp[:, :, 0], k[:, :, 0:2].mean(2))
    torch.testing.assert_close(kp[:, :, nkf * 8 + 1], k[:, :, 8:16].mean(2))
    torch.testing.assert_close(vp[:, :, nkf * 8 - 1], v[:, :, 62:64].mean(2))
    assert cap.shape == (B, H, 5) and (cap[..., :4] == 8).all() and (cap[..., 4] == 1).all()


def test_similarity_cap_picks_largest_passing_factor():
    D, bk = 8, 16
    base = torch.randn(6, D)
    blocks = [
        base[0].expand(16, D),  # constant block: every factor passes -> 8
        torch.randn(16, D),  # random: nothing passes -> 1
        base[1:5].repeat_interleave(4, 0),  # runs of 4 equal keys: windows of 2 and 4 are exact; 8 is not
    ]
    k = torch.cat(blocks)[None, None]
    _, _, cap = pyramid_pool(k, k, block_k=bk, factors=(2, 4, 8), sim_thresholds=(0.75, 0.70, 0.70))
    assert cap[0, 0].tolist() == [8, 1, 4]
    _, _, cap2 = pyramid_pool(k, k, block_k=bk, factors=(2,), sim_thresholds=(0.75, 0.70, 0.70))
    assert cap2[0, 0].tolist() == [2, 1, 2]


# ----------------------------------------------------------------------------------------- assignment
def _assign(scores, cfg, lq, lk, cap=None, kv_flags=None, q_flags=None):
    B, H, nq, nk = scores.shape
    if cap is None:
        cap = torch.full((B, H, nk), 8, dtype=torch.int8)
    f, _, _ = assign_levels(scores, cap, kv_flags, q_flags, lq=lq, lk=lk, config=cfg)
    return f


def test_threshold_rule_exclusive_mass_on_hand_made_row():
    # one query block (the last) over 8 KV blocks; sink and diagonal forced; candidates are blocks 1..6
    cfg = PSAConfig(block_q=16, block_k=16, stride=4, sink_blocks=1, sim_thresholds=None)
    lq, lk = 16, 128
    s = torch.zeros(1, 1, 1, 8)
    # candidate masses (normalised): 0.6, 0.15, 0.1, 0.08, 0.05, 0.02 on blocks 3, 1, 5, 2, 6, 4
    for j, m in {3: 0.6, 1: 0.15, 5: 0.1, 2: 0.08, 6: 0.05, 4: 0.02}.items():
        s[0, 0, 0, j] = m * 7.0  # un-normalised on purpose
    s[0, 0, 0, 0] = 100.0  # forced blocks' scores must not count
    f = _assign(s, cfg, lq, lk)[0, 0, 0].tolist()
    # before: b3=0 -> 1; b1=.6 -> 1; b5=.75 -> 2; b2=.85 -> 4 (tau_4=.9); b6=.93 -> 0; b4=.98 -> 0
    assert f == [1, 1, 4, 1, 0, 2, 0, 1]


def test_top_block_is_always_full_even_if_it_dominates():
    cfg = PSAConfig(block_q=16, block_k=16, stride=4, thresholds=(0.1, 0.2, 0.3, 0.4), sim_thresholds=None)
    s = torch.rand(1, 2, 1, 10)
    s[..., 4] = 1000.0
    f = _assign(s, cfg, 16, 160)
    assert (f[..., 4] == 1).all()
    # and with the inclusive rule it would have been dropped: every other candidate is skipped here
    assert (f[..., 1:9][..., [0, 1, 2, 4, 5, 6, 7]] == 0).all()


def test_quota_counts():
    cfg = PSAConfig(block_q=16, block_k=16, stride=4, mode="quota", quotas=(0.2, 0.2, 0.2, 0.2), sim_thresholds=None)
    lq, lk = 16, 320  # 20 visible blocks, forced: sink (0) and diagonal (19)
    s = torch.rand(2, 3, 1, 20)
    f = _assign(s, cfg, lq, lk)
    for b in range(2):
        for h in range(3):
            row = f[b, h, 0]
            assert row[0] == 1 and row[19] == 1
            # bounds floor(.2*20+.5)=4, 8, 12, 16 counting the 2 forced blocks as full
            assert [(row == p).sum().item() for p in (1, 2, 4, 8, 0)] == [4, 4, 4, 4, 4]
            cand = torch.arange(1, 19)
            order = cand[torch.argsort(s[b, h, 0, 1:19], descending=True, stable=True)]
            assert row[order[:2]].tolist() == [1, 1]
            assert (row[order[2:6]] == 2).all() and (row[order[14:]] == 0).all()


def test_forced_blocks_sink_diagonal_text_and_skip():
    cfg = PSAConfig(block_q=16, block_k=16, stride=4, mode="quota", quotas=(0.0, 0.0, 0.0, 0.0), sim_thresholds=None)
    lq, lk = 40, 200  # 3 query blocks over 13 KV blocks, Lq < Lk and neither a block multiple
    nq, nk = 3, 13
    s = torch.rand(1, 2, nq, nk)
    kv_flags = torch.zeros(1, nk, dtype=torch.int8)
    kv_flags[0, 5] = KV_FORCE_FULL
    kv_flags[0, 7] = KV_SKIP
    q_flags = torch.tensor([[False, True, False]])
    f = _assign(s, cfg, lq, lk, kv_flags=kv_flags, q_flags=q_flags)
    vis, poolable = block_masks(lq, lk, 16, 16)
    expect = torch.zeros(nq, nk, dtype=torch.int8)
    expect[vis & ~poolable] = 1  # diagonal / incomplete
    expect[:, 0] = 1  # sink
    expect[:, 5] = 1  # text block
    expect[1][vis[1]] = 1  # text query block sees everything visible at full resolution
    expect[:, 7] = 0  # skipped (padding)
    expect[~vis] = 0
    assert (f[0] == expect).all()


def test_similarity_cap_only_lowers_factors():
    cfg = PSAConfig(block_q=16, block_k=16, stride=4, mode="quota", quotas=(0.1, 0.2, 0.2, 0.3), sim_thresholds=None)
    s = torch.rand(1, 4, 2, 30)
    cap = torch.randint(0, 4, (1, 2, 30)).to(torch.int8)
    cap = torch.tensor([1, 2, 4, 8], dtype=torch.int8)[cap.long()]
    free = _assign(s, cfg, 32, 480)
    capped = _assign(s, cfg, 32, 480, cap=cap)
    capq = cap.repeat_interleave(2, 1)[:, :, None, :].expand_as(free)
    assert ((capped == 0) == (free == 0)).all()  # the cap never adds or drops a block
    assert (capped <= free).all()
    assert (capped == torch.where(free > 0, torch.minimum(free, capq), free)).all()


def test_binary_and_dense_presets_use_full_resolution_only():
    q, k, v = rand_qkv(1, 2, 1, 200, 200, 16)
    for name in ("binary", "binary-0.2", "dense"):
        lm = build_level_map(q, k, PSAConfig.preset(name, **SMALL), backend="reference")
        assert set(torch.unique(lm.factors).tolist()) <= {0, 1}
    lm = build_level_map(q, k, PSAConfig.preset("dense", **SMALL))
    assert lm.density() == pytest.approx(1.0) and lm.histogram()["full"] == pytest.approx(1.0)


def test_quota_density_close_to_target_at_length():
    q, k, v = rand_qkv(1, 2, 1, 1024, 1024, 16)
    cfg = PSAConfig.preset("quota-0.2", block_q=16, block_k=16, stride=4, text_tail=0, sink_blocks=0)
    lm = build_level_map(q, k, cfg, backend="reference")
    assert abs(lm.density() - 0.2) < 0.05, lm.density()
    h = lm.histogram()
    assert all(h[x] > 0 for x in ("full", "pool2", "pool4", "pool8", "skip"))


# ----------------------------------------------------------------------------------------- estimator
def test_estimator_rows_are_probability_masses():
    q, k, _ = rand_qkv(2, 4, 2, 45, 130, 8)
    s = block_importance(q, k, block_q=16, block_k=16, stride=4)
    assert s.shape == (2, 4, 3, 9)
    reduced_rows = torch.tensor([4, 4, 4.0])  # 45 queries -> 12 reduced rows: 4 per query block
    torch.testing.assert_close(s.sum(-1), reduced_rows.expand(2, 4, 3))
    vis, _ = block_masks(45, 130, 16, 16)
    assert (s[..., ~vis] == 0).all()


def test_estimator_matches_bruteforce_antidiagonal():
    B, H, L, D, st = 1, 1, 32, 4, 4
    q, k, _ = rand_qkv(B, H, H, L, L, D)
    s = block_importance(q, k, block_q=8, block_k=8, stride=st)
    R = L // st
    logit = torch.full((R, R), float("-inf"))
    for r in range(R):
        for c in range(r + 1):
            logit[r, c] = sum(q[0, 0, r * st + st - 1 - t] @ k[0, 0, c * st + t] for t in range(st)) / (
                math.sqrt(D) * st
            )
    p = torch.softmax(logit, -1)
    expect = p.reshape(4, 2, 4, 2).sum((1, 3))
    torch.testing.assert_close(s[0, 0], expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- GQA, batch, padding
def test_gqa_equals_repeated_kv():
    q, k, v = rand_qkv(2, 6, 2, 100, 180, 16)
    cfg = PSAConfig.preset("paper", **SMALL)
    a = psa_attention(q, k, v, cfg, backend="reference")
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    b = psa_attention(q, kr, vr, cfg, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    la, lb = build_level_map(q, k, cfg), build_level_map(q, kr, cfg)
    assert (la.factors == lb.factors).all()


@pytest.mark.parametrize("preset", ["paper", "quota-0.2", "dense"])
def test_batch_invariance(preset):
    q, k, v = rand_qkv(3, 4, 2, 150, 260, 16)
    cfg = PSAConfig.preset(preset, **SMALL)
    full = psa_attention(q, k, v, cfg)
    for b in range(3):
        one = psa_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], cfg)
        torch.testing.assert_close(full[b : b + 1], one, atol=1e-6, rtol=1e-5)


def test_left_padding_invariance_and_fully_padded_rows():
    B, Hq, Hkv, L, D, pad = 1, 4, 2, 120, 16, 37
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D)
    qp = torch.cat([torch.randn(B, Hq, pad, D) * 50, q], 2)
    kp = torch.cat([torch.randn(B, Hkv, pad, D) * 50, k], 2)
    vp = torch.cat([torch.randn(B, Hkv, pad, D) * 50, v], 2)
    mask = torch.cat([torch.zeros(B, pad, dtype=torch.bool), torch.ones(B, L, dtype=torch.bool)], 1)
    cfg = PSAConfig.preset("dense", **SMALL)
    out = psa_attention(qp, kp, vp, cfg, key_padding_mask=mask)
    torch.testing.assert_close(out[:, :, pad:], psa_attention(q, k, v, cfg), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all() and (out[:, :, :pad] == 0).all()
    # any level map: the padded keys never contribute (compare with the explicit construction)
    nq, nk = cdiv(L + pad, 16), cdiv(L + pad, 16)
    f = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 5, (B, Hq, nq, nk))]
    out = psa_attention(qp, kp, vp, cfg, level_map=f, key_padding_mask=mask)
    assert rel(out, explicit_psa(qp, kp, vp, f, 16, 16, key_padding_mask=mask)) < 1e-5


def test_block_flags_from_padding_and_token_types():
    cfg = PSAConfig(block_q=16, block_k=16, stride=4, text_tail=20)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[0, :20] = False  # block 0 fully padded, block 1 partly
    kv, qf = block_flags(2, 30, 70, cfg, torch.device("cpu"), key_padding_mask=mask)
    assert kv.shape == (2, 5) and qf.shape == (2, 2)
    assert kv[0, 0] & KV_SKIP and kv[0, 1] & 4 and not kv[1, 0] & KV_SKIP
    assert (kv[:, 3] & KV_FORCE_FULL).all() and (kv[:, 4] & KV_FORCE_FULL).all() and not (kv[:, 2] & 1).any()
    types = torch.ones(2, 70, dtype=torch.long)
    types[:, 5] = 0  # one text token in block 0
    types[:, -1] = 0
    kv, qf = block_flags(2, 30, 70, cfg, torch.device("cpu"), token_types=types)
    assert (kv[:, 0] == KV_FORCE_FULL).all() and (kv[:, 1:4] == 0).all() and (kv[:, 4] == KV_FORCE_FULL).all()
    assert qf.tolist() == [[False, True], [False, True]]


# ----------------------------------------------------------------------------------------- dtypes, memory
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    q, k, v = rand_qkv(1, 2, 1, 64, 96, 16, dtype=dtype)
    cfg = PSAConfig.preset("paper", **SMALL)
    out = psa_attention(q, k, v, cfg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = psa_attention(q.float(), k.float(), v.float(), cfg)
    assert rel(out, ref) < 2e-2


def test_reference_runs_8k_tokens_in_bounded_memory():
    q, k, v = rand_qkv(1, 2, 1, 8192, 8192, 16)
    out, plan = run_psa(q, k, v, PSAConfig.preset("paper", text_tail=128), backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert 0 < plan.level_map.density() <= 1


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, exc, msg",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of KV heads"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "head_dim mismatch"),
        (lambda q, k, v: (torch.cat([q, q], 2), k, v), ValueError, "Lq=64 > Lk=48"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "share a dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "dtype"),
        (lambda q, k, v: (q, k, v[:, :, :40]), ValueError, "same shape"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "batch size mismatch"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "torch.Tensor"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
    ],
)
def test_invalid_inputs_raise(make, exc, msg):
    q, k, v = rand_qkv(2, 4, 2, 32, 48, 16)
    with pytest.raises(exc, match=msg):
        psa_attention(*make(q, k, v), PSAConfig.preset("paper", **SMALL))


def test_invalid_options_raise():
    q, k, v = rand_qkv(2, 4, 2, 32, 48, 16)
    cfg = PSAConfig.preset("paper", **SMALL)
    with pytest.raises(ValueError, match="backend"):
        psa_attention(q, k, v, cfg, backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        psa_attention(q, k, v, cfg, scale=-1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        psa_attention(q, k, v, cfg, key_padding_mask=torch.ones(2, 47, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_types"):
        psa_attention(q, k, v, cfg, token_types=torch.ones(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="level_map factors must have shape"):
        psa_attention(q, k, v, cfg, level_map=torch.ones(2, 4, 2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="0, 1, 2, 4 or 8"):
        psa_attention(q, k, v, cfg, level_map=torch.full((2, 4, 2, 3), 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="PSAConfig"):
        psa_attention(q, k, v, {"block_q": 16})


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    from psa_vlm.api import _resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _resolve_backend("triton", torch.device("cpu"))
    assert _resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolve_backend("triton", torch.device("cpu")) == "triton"
