"""The GQA-shared estimator (``PSAConfig.estimate_heads="kv"``): one importance estimate and one level
assignment per KV head, from the mean of its query group, shared by the group's query heads.

Every backend is checked against an explicit construction from the reference stages: the group means of the
queries, ``block_importance`` on them, ``assign_levels`` per KV head, the lists repeated per query head and
the reference attention on those lists. CPU tier: the reference and the Triton kernels (interpreted) at small,
irregular shapes; GPU tier: Qwen2.5-VL-7B attention shapes (group size 7) on every GPU engine.
"""

import math
import random

import pytest
import torch

from psa_vlm import PSAConfig, build_level_map, psa_attention
from psa_vlm.api import block_flags, estimator_queries, run_psa, share_in_groups
from psa_vlm.kernels.assign.naive import assign_levels
from psa_vlm.kernels.attention.naive import sparse_attention
from psa_vlm.kernels.estimate.naive import block_importance
from psa_vlm.kernels.pool.naive import pyramid_pool

SMALL = dict(block_q=16, block_k=16, stride=4, text_tail=16, min_seq_len=0)


def rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, device="cpu"):
    """Fresh random inputs on every run; the seed is printed (pytest shows it for a failing test)."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"rand_qkv seed {seed}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def explicit_shared_plan(q, k, v, cfg, key_padding_mask=None):
    """The GQA-shared plan built by hand from the reference stages, without ``run_psa``."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qm = torch.stack([q[:, g * G : (g + 1) * G].float().mean(1) for g in range(Hkv)], 1).to(q.dtype)
    scores = block_importance(qm, k, block_q=cfg.block_q, block_k=cfg.block_k, stride=cfg.stride)
    kp, vp, cap = pyramid_pool(k, v, block_k=cfg.block_k, factors=cfg.pool_factors,
                               sim_thresholds=cfg.sim_thresholds)
    kv_flags, q_flags = block_flags(B, Lq, Lk, cfg, q.device, key_padding_mask=key_padding_mask)
    f, idx, cnt = assign_levels(scores, cap, kv_flags, q_flags, lq=Lq, lk=Lk, config=cfg)
    assert f.shape[1] == Hkv
    f, idx, cnt = (t.repeat_interleave(G, 1) for t in (f, idx, cnt))
    return f, idx, cnt, kp, vp


# ---------------------------------------------------------------------------------------------- config
def test_config_field_default_values_and_errors(tmp_path):
    assert PSAConfig().estimate_heads == "query"
    for name in ("paper", "quota-0.2", "binary-0.2", "dense"):
        assert PSAConfig.preset(name).estimate_heads == "query"
    c = PSAConfig.preset("quota-0.2", estimate_heads="kv")
    assert c.estimate_heads == "kv"
    path = tmp_path / "c.json"
    c.save(path)
    assert PSAConfig.load(path) == c
    path.write_text('{"preset": "paper", "estimate_heads": "kv"}')
    assert PSAConfig.load(path) == PSAConfig.preset("paper", estimate_heads="kv")
    assert PSAConfig(layer_overrides={1: {"estimate_heads": "kv"}}).for_layer(1).estimate_heads == "kv"
    for bad in ("KV", "group", "", None, 1):
        with pytest.raises(ValueError, match=r"estimate_heads.*'query', 'kv'"):
            PSAConfig(estimate_heads=bad)


def test_options_and_model_args_accept_it():
    from psa_vlm.eval import PSA_MODEL_ARGS
    from psa_vlm.inference import psa_config_from_options

    assert "estimate_heads" in PSA_MODEL_ARGS
    assert psa_config_from_options("quota-0.2", estimate_heads="kv").estimate_heads == "kv"
    assert psa_config_from_options("quota-0.2", estimate_heads=" kv ").estimate_heads == "kv"
    assert psa_config_from_options("quota-0.2").estimate_heads == "query"
    for bad in ("heads", "KV"):  # spelled as in PSAConfig, JSON and the bench suffix: lower case
        with pytest.raises(ValueError, match="estimate_heads"):
            psa_config_from_options("quota-0.2", estimate_heads=bad)


def test_default_value_keeps_the_format_1_json(tmp_path):
    """A config that does not use the field writes the JSON (and run signatures) of earlier versions."""
    assert "estimate_heads" not in PSAConfig.preset("quota-0.2").to_dict()
    assert PSAConfig.preset("quota-0.2", estimate_heads="kv").to_dict()["estimate_heads"] == "kv"
    old = PSAConfig.preset("paper").to_dict()  # what psa_vlm wrote before the field existed
    assert PSAConfig.from_dict(old) == PSAConfig.preset("paper")
    for cfg in (PSAConfig.preset("paper"), PSAConfig.preset("paper", estimate_heads="kv")):
        cfg.save(tmp_path / "c.json")
        assert PSAConfig.load(tmp_path / "c.json") == cfg


def test_calibration_candidates_keep_it():
    from psa_vlm.eval.calibrate import candidate_config

    base = PSAConfig.preset("paper", estimate_heads="kv")
    for name in ("quota-0.2", "paper", "tau-0.8"):
        assert candidate_config(name, base).estimate_heads == "kv"


# ---------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_estimator_queries_are_group_means(dtype):
    q = (torch.randn(2, 6, 37, 8) * 3).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] view
    kv = PSAConfig(estimate_heads="kv")
    got = estimator_queries(q, 2, kv)
    assert got.shape == (2, 2, 37, 8) and got.dtype == dtype
    expect = torch.stack([q[:, :3].double().mean(1), q[:, 3:].double().mean(1)], 1)
    eps = torch.finfo(dtype).eps  # one rounding of the float32 mean (float32: of the sum's rounding errors)
    atol = 4 * torch.finfo(torch.float32).eps * float(q.abs().max())
    torch.testing.assert_close(got.double(), expect.to(dtype).double(), atol=atol, rtol=eps)
    assert estimator_queries(q, 2, PSAConfig()) is q
    assert estimator_queries(q, 6, kv) is q  # G = 1: nothing to share


def test_share_in_groups_repeats_each_kv_head():
    t = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    f, i, c = share_in_groups((t, t + 1, t[..., :4]), 6)
    assert f.shape == (2, 6, 4, 5) and c.shape == (2, 6, 4, 4)
    for h in range(6):
        assert torch.equal(f[:, h], t[:, h // 2]) and torch.equal(i[:, h], t[:, h // 2] + 1)
    same = (t, t, t)
    assert share_in_groups(same, 3) is same
    with pytest.raises(ValueError, match="cannot be shared by 5"):
        share_in_groups(same, 5)
    with pytest.raises(ValueError, match="cannot be shared"):
        share_in_groups((t, t[:, :2], t), 6)
    with pytest.raises(ValueError, match="num_kv_heads=4 must divide the 6"):
        estimator_queries(torch.zeros(1, 6, 4, 8), 4, PSAConfig(estimate_heads="kv"))


# ---------------------------------------------------------------------------------------------- semantics
CASES = [
    # B, Hq, Hkv, Lq, Lk, D, preset
    (1, 6, 2, 131, 131, 16, "quota-0.2"),
    (2, 8, 2, 77, 203, 32, "paper"),  # Lq < Lk, batch 2, G = 4, similarity cap on
    (1, 3, 1, 150, 150, 16, "quota-0.3"),  # MQA: one group
    (1, 7, 1, 96, 96, 16, "binary-0.2"),  # G = 7 as in Qwen2.5-VL-7B
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,preset", CASES)
def test_backends_equal_explicit_construction(backend, B, Hq, Hkv, Lq, Lk, D, preset):
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D)
    cfg = PSAConfig.preset(preset, **SMALL, estimate_heads="kv")
    f, idx, cnt, kp, vp = explicit_shared_plan(q, k, v, cfg)
    out = torch.full_like(q, float("nan"))
    o, plan = run_psa(q, k, v, cfg, backend=backend, out=out)
    assert o is out and not torch.isnan(out).any()
    assert torch.equal(plan.level_map.factors, f), "level map differs from the explicit GQA-shared assignment"
    G = Hq // Hkv
    for h in range(Hq):
        assert torch.equal(plan.level_map.factors[:, h], plan.level_map.factors[:, (h // G) * G])
    ref = sparse_attention(q, k, v, kp, vp, idx, cnt, block_q=cfg.block_q, block_k=cfg.block_k,
                           factors=cfg.pool_factors, scale=1 / math.sqrt(D))
    assert rel(o, ref) < 1e-5
    # the pyramid is really used (not everything full or dropped) on the pyramid presets
    hist = plan.level_map.histogram()
    if preset.startswith("quota"):
        assert hist["skip"] > 0 and hist["full"] < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_transformers_layout_on_triton(dtype):
    """bf16/fp16 queries stored as transformers' ``[B, L, H, D]`` (a transposed view): the Triton backend's plan
    equals the explicit construction's on the same inputs, its output the reference attention on that plan."""
    B, Hq, Hkv, L, D = 1, 6, 2, 200, 32
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    cfg = PSAConfig.preset("quota-0.2", **SMALL, estimate_heads="kv")
    f, idx, cnt, kp, vp = explicit_shared_plan(q, k, v, cfg)
    o, plan = run_psa(q, k, v, cfg, backend="triton")
    assert o.dtype == dtype and torch.isfinite(o).all()
    # the group mean is the same tensor in both, so the scores differ by summation order only: rare ties aside,
    # the maps agree
    assert (plan.level_map.factors != f).float().mean() < 0.02
    ref = sparse_attention(q, k, v, kp, vp, plan.kv_idx, plan.counts, block_q=16, block_k=16,
                           factors=cfg.pool_factors, scale=1 / math.sqrt(D))
    assert rel(o, ref) < 2e-2


def test_bench_stage_checks_accept_it():
    """``bench-attention``'s per-stage checks run the estimator on the group means and share the lists."""
    from psa_vlm.bench.attention import check_stages

    q, k, v = rand_qkv(1, 6, 2, 256, 256, 32)
    for name in ("quota-0.2", "paper"):
        res = check_stages(q, k, v, PSAConfig.preset(name, block_q=64, block_k=64, estimate_heads="kv"),
                           backend="triton")
        assert res["ok"] == 1.0, res


def test_padding_and_lq_below_lk():
    B, Hq, Hkv, Lq, Lk, D = 2, 6, 3, 60, 140, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D)
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[0, :23] = False  # left padding
    mask[1, 100:] = False  # right padding: the last keys are never attended
    cfg = PSAConfig.preset("quota-0.2", **SMALL, estimate_heads="kv")
    f, idx, cnt, kp, vp = explicit_shared_plan(q, k, v, cfg, key_padding_mask=mask)
    for backend in ("reference", "triton"):
        o, plan = run_psa(q, k, v, cfg, backend=backend, key_padding_mask=mask)
        assert torch.equal(plan.level_map.factors, f)
        assert torch.isfinite(o).all()
    ref = sparse_attention(q, k, v, kp, vp, idx, cnt, block_q=16, block_k=16, factors=cfg.pool_factors,
                           scale=1 / math.sqrt(D), key_padding_mask=mask)
    assert rel(o, ref) < 1e-5


def test_group_of_one_equals_per_query_head():
    q, k, v = rand_qkv(1, 4, 4, 120, 120, 16)
    a = PSAConfig.preset("quota-0.2", **SMALL)
    la, lb = build_level_map(q, k, a), build_level_map(q, k, a.replace(estimate_heads="kv"))
    assert torch.equal(la.factors, lb.factors)
    torch.testing.assert_close(psa_attention(q, k, v, a), psa_attention(q, k, v, a.replace(estimate_heads="kv")),
                               atol=0, rtol=0)


def test_identical_heads_in_a_group_equal_per_query_head():
    """When a group's query heads are equal, their mean is that head: the shared map is the per-head map."""
    q, k, v = rand_qkv(1, 2, 2, 128, 128, 16)
    q = q.repeat_interleave(3, 1)  # 6 query heads, groups of 3 equal heads
    a = PSAConfig.preset("paper", **SMALL)
    assert torch.equal(build_level_map(q, k, a).factors,
                       build_level_map(q, k, a.replace(estimate_heads="kv")).factors)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_query_in_one_head_keeps_its_block_full(backend, bad):
    """A NaN/inf in one query head reaches its group's mean: the query block attends every visible block at
    full resolution, as with per-head estimates, and the output is non-finite only where SDPA's would be."""
    q, k, v = rand_qkv(1, 4, 2, 96, 96, 16)
    q[0, 1, 40, 3] = bad  # query block 2 (rows 32-47), head 1 of group 0
    cfg = PSAConfig.preset("quota-0.2", **SMALL, estimate_heads="kv")
    o, plan = run_psa(q, k, v, cfg, backend=backend)
    f = plan.level_map.factors
    assert (f[0, :, 2, :3] == 1).all(), "the block with a non-finite query must be full resolution in every head"
    finite_rows = torch.ones(96, dtype=torch.bool)
    finite_rows[40] = False
    assert torch.isfinite(o[0, :, finite_rows]).all()
    assert not torch.isfinite(o[0, 1, 40]).all()


def test_bench_method_suffixes():
    from psa_vlm.bench.common import split_method

    assert split_method("quota-0.2") == ("quota-0.2", {})
    assert split_method("quota-0.2/s16") == ("quota-0.2", {"stride": 16})
    assert split_method("quota-0.2/kv") == ("quota-0.2", {"estimate_heads": "kv"})
    assert split_method("paper/kv/s16") == ("paper", {"estimate_heads": "kv", "stride": 16})
    for odd in ("quota-0.2/kv/kv", "quota-0.2/s0", "quota-0.2/x", "quota-0.2/s16/s8"):
        assert split_method(odd) == (odd, {})


def test_append_csv_keeps_rows_under_their_headers(tmp_path):
    import csv

    from psa_vlm.bench.common import append_csv

    path = tmp_path / "r.csv"
    append_csv(path, [{"a": 1, "b": 2}], ["a", "b"])
    append_csv(path, [{"a": 3, "c": 4}], ["a", "c"])
    append_csv(path, [{"a": 5, "b": 6, "c": 7}], ["a", "b", "c"])
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}, {"a": "5", "b": "6", "c": "7"}]


# ---------------------------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("L", [8192 + 77])
def test_gqa_shared_estimator_gpu(backend, L):
    """Qwen2.5-VL-7B shapes (Hq 28, Hkv 4: G = 7), video-like bf16 inputs: the whole call's plan is shared per
    group and its output equals the reference attention on that plan; the stages' scores equal the reference
    estimator on the group means."""
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.estimate.kernel import block_importance as gpu_importance

    q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
    cfg = PSAConfig.preset("quota-0.2", estimate_heads="kv", min_seq_len=1024)
    qm = estimator_queries(q, 4, cfg)
    s = gpu_importance(qm, k, block_q=128, block_k=128, stride=8)
    assert s.shape[1] == 4
    s_ref = block_importance(qm.float(), k.float(), block_q=128, block_k=128, stride=8)
    assert rel(s, s_ref) < 1e-3
    out = torch.full_like(q, float("nan"))
    o, plan = run_psa(q, k, v, cfg, backend=backend, out=out)
    assert not torch.isnan(o).any()
    f = plan.level_map.factors
    for h in range(28):
        assert torch.equal(f[:, h], f[:, (h // 7) * 7])
    kp, vp, _ = pyramid_pool(k.float(), v.float(), block_k=128, factors=cfg.pool_factors, sim_thresholds=None)
    ref = sparse_attention(q.float(), k.float(), v.float(), kp, vp, plan.kv_idx, plan.counts, block_q=128,
                           block_k=128, factors=cfg.pool_factors, scale=1 / math.sqrt(128))
    assert rel(o, ref) < 1e-2
    assert 0.15 < plan.level_map.density() < 0.35
