"""GPU check and timing of the attend stage's pooled stream as a Gluon kernel (Hopper) against the Triton kernel.

Developer script, outside the package. Run on a Hopper GPU from the repository root::

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/devcheck_gluon_pooled.py [--lengths 65536 131072] [--out DIR]

1. Checks (small shapes, fresh random inputs, NaN-poisoned outputs): ``hopper.launch`` against the float32
   reference ``naive.sparse_attention`` on the same pooled-only list (the ``fa4.level_block_lists`` tail list),
   its log-sum-exp against the Triton kernel's, with GQA, batch 2, ``Lq < Lk``, irregular lengths, D 64 / 128,
   fp16 / bf16, pyramids (2, 4, 8) / (2, 8) / (2, 4), tails (4, 8) and (2, 4, 8), a NaN in pyramid rows the list
   never reads, each variant in ``VARIANTS``.
2. Timing (video-like bf16 Q/K/V, Qwen2.5-VL-7B shapes): the pooled launch alone (Triton, Gluon variants) on the
   tails (4, 8) and (2, 4, 8) of quota plans, and the whole fa4 attend stage with each pooled engine (Gluon also
   with factor 2 in the pooled launch), checked against the Triton attend stage in the same run; ideal = density x
   cuDNN dense. Earlier variants of the kernel (without the loader warp, 64-row key tiles, free-running
   warpgroups) and their numbers: ``psa_vlm/kernels/attention/NOTES_fa4.md`` v6.
3. ``--new-lengths``: the first call of the kernel at each new prompt length against its second call (a new length
   must not compile it again).
4. ``--profile``: only two launches of each timed variant at the first length and preset, for Nsight Compute.
Prints JSON lines and a verdict; writes ``$OUT/devcheck_gluon_pooled.json``. Exits 1 when a check fails.
This is a command-line report: it writes to stdout by design.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch
from devcheck_fa4 import bench, rel, say  # the FlashAttention-4 devcheck's report helpers (this folder is on sys.path)


def tail_list(kv_idx, counts, Lk, bk, factors, tail):
    from psa_vlm.kernels.attention import fa4
    from psa_vlm.kernels.geometry import FACTOR_ORDER, cdiv

    nkf = Lk // bk
    widths = [cdiv(Lk, bk)] + [nkf if (p in factors and p not in tail) else 0 for p in FACTOR_ORDER[1:]]
    lists = fa4.level_block_lists(kv_idx, counts, widths, tail_from=FACTOR_ORDER.index(tail[0]))
    return lists[4]  # (counts, idx)


#: kernel variants checked and timed: the shipped tiles (two MMA warpgroups in FlashAttention-3's ping-pong with the
#: uniform-tile softmax; ``NOTES_fa4.md`` v10), the other grid (one program per query tile / a persistent grid of one
#: program per multiprocessor; v9), the column-wise softmax on every tile, and a 3-slot K ring (213 KB of shared
#: memory; v11: no faster). The one-partition form (8 MMA warps, v6-v9) was timed against the ping-pong in v10
#: (commit 14a23cb) and removed; named-barrier turns and one release event per turn were timed in v11 (commit a70db2d,
#: ``eval/results/devcheck_gluon_pooled_a70db2d-barriers.json``) and removed.
VARIANTS = {"default": {}, "other_grid": dict(PROGRAMS_PER_SM=None), "no_uniform": dict(UNIFORM=False),
            "k_ring3": dict(NSK=3)}
TIMED = ("default", "other_grid", "no_uniform", "k_ring3")


def _tiles(variant: str) -> dict:
    """``hopper.TILES`` with the variant's overrides; ``PROGRAMS_PER_SM=None`` flips the shipped grid (0 <-> 1)."""
    from psa_vlm.kernels.attention import hopper

    tiles = dict(hopper.TILES, **VARIANTS[variant])
    if tiles["PROGRAMS_PER_SM"] is None:
        tiles["PROGRAMS_PER_SM"] = 0 if hopper.TILES["PROGRAMS_PER_SM"] else 1
    return tiles


def run_gluon(q, k, kp, vp, tidx, tcounts, bq, bk, factors, variant, lse=True):
    from psa_vlm.kernels.attention import hopper

    B, Hq, Lq, D = q.shape
    o = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    l = torch.full((B, Hq, Lq), float("nan"), dtype=torch.float32, device=q.device) if lse else None
    hopper.pooled_launch(q, k, k, kp, vp, tidx, tcounts, out=o, lse=l, block_q=bq, block_k=bk, factors=factors,
                         scale=1.0 / math.sqrt(D), tiles=_tiles(variant))
    return o, l


def run_triton(q, k, kp, vp, tidx, tcounts, bq, bk, factors):
    from psa_vlm.kernels.attention import fa4

    B, Hq, Lq, D = q.shape
    o = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    l = torch.full((B, Hq, Lq), float("nan"), dtype=torch.float32, device=q.device)
    fa4.triton_pooled_launch(q, k, k, kp, vp, tidx, tcounts, out=o, lse=l, block_q=bq, block_k=bk, factors=factors,
                             scale=1.0 / math.sqrt(D))
    return o, l


def checks() -> bool:
    from psa_vlm.kernels.assign.naive import build_block_lists
    from psa_vlm.kernels.attention.naive import sparse_attention as ref_attn
    from psa_vlm.kernels.geometry import cdiv
    from psa_vlm.kernels.pool.naive import pyramid_pool

    cases = [  # B, Hq, Hkv, Lq, Lk, D, dtype, pyramid factors, tail
        (1, 4, 1, 1000, 1000, 128, torch.bfloat16, (2, 4, 8), (4, 8)),
        (2, 6, 2, 700, 2100, 128, torch.float16, (2, 4, 8), (2, 4, 8)),
        (1, 7, 1, 3000, 3000, 64, torch.bfloat16, (2, 4, 8), (4, 8)),
        (1, 4, 2, 1500, 2600, 128, torch.bfloat16, (2, 8), (8,)),
        (1, 4, 4, 1300, 1300, 128, torch.bfloat16, (2, 4), (2, 4)),
        (1, 2, 1, 100, 5000, 128, torch.bfloat16, (2, 4, 8), (4, 8)),
    ]
    ok_all = True
    for n, (B, Hq, Hkv, Lq, Lk, D, dt, factors, tail) in enumerate(cases):
        torch.manual_seed(100 + n)
        bq = bk = 128
        q = torch.randn(B, Hq, Lq, D, device="cuda").to(dt)
        k = torch.randn(B, Hkv, Lk, D, device="cuda").to(dt)
        v = torch.randn(B, Hkv, Lk, D, device="cuda").to(dt)
        nq, nk = cdiv(Lq, bq), cdiv(Lk, bk)
        choice = torch.multinomial(torch.tensor([0.3, 0.1, 0.2, 0.2, 0.2]), B * Hq * nq * nk, replacement=True)
        f = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[choice].reshape(B, Hq, nq, nk)
        allowed = torch.tensor([0, 1] + list(factors), dtype=f.dtype)
        f = torch.where(torch.isin(f, allowed), f, torch.ones_like(f)).cuda()
        _, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
        kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=factors)
        kp, vp = kp.contiguous(), vp.contiguous()
        tcounts, tidx = tail_list(kv_idx, counts, Lk, bk, factors, tail)
        ref = ref_attn(q.float(), k.float(), v.float(), kp.float(), vp.float(), tidx, tcounts, block_q=bq,
                       block_k=bk, factors=factors)
        if n == 0:  # NaN in the factor-2 rows, which the (4, 8) tail never reads: must stay hidden
            vp = vp.clone()
            vp[:, :, : (Lk // bk) * (bk // 2)] = float("nan")
        to, tl_ = run_triton(q, k, kp, vp, tidx, tcounts, bq, bk, factors)
        for variant in VARIANTS:
            go, gl_ = run_gluon(q, k, kp, vp, tidx, tcounts, bq, bk, factors, variant)
            err = rel(go, ref)
            finite = (gl_ == gl_) & torch.isfinite(tl_)
            lse_err = float((gl_[finite] - tl_[finite]).abs().max()) if bool(finite.any()) else 0.0
            same_inf = bool(((gl_ == float("-inf")) == (tl_ == float("-inf"))).all())
            ok = (not torch.isnan(go).any()) and err <= 1e-2 and lse_err <= 1e-2 and same_inf \
                and not torch.isnan(gl_).any()
            ok_all &= ok
            say(json.dumps(dict(check=n, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=str(dt), factors=factors,
                                tail=tail, variant=variant, rel_err=err, triton_rel_err=rel(to, ref),
                                lse_max_abs=lse_err, lse_inf_match=same_inf, ok=ok)))
    return ok_all


def timings(lengths, presets) -> list:
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.attention import dense_baselines
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.attention import fa4, hopper

    rows = []
    for L in lengths:
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        dense = dense_baselines(q, k, v, rep=50)
        say(f"L={L} dense ms: " + ", ".join(f"{a} {b:.2f}" for a, b in dense.items()))
        for name in presets:
            cfg = PSAConfig.preset(name)
            _, plan = run_psa(q, k, v, cfg, backend="triton", plan_only=True)
            dens = float(plan.level_map.density())
            bq, bk, factors = cfg.block_q, cfg.block_k, plan.pool_factors
            kp, vp = plan.k_pooled, plan.v_pooled
            row = dict(L=L, preset=name, density=dens, ideal_ms=dens * dense["cudnn"], **dense)
            for tail in ((4, 8), (2, 4, 8)):
                tcounts, tidx = tail_list(plan.kv_idx, plan.counts, L, bk, factors, tail)
                to, tl_ = run_triton(q, k, kp, vp, tidx, tcounts, bq, bk, factors)
                key = "".join(map(str, tail))
                row[f"triton_{key}_ms"] = bench(lambda: run_triton(q, k, kp, vp, tidx, tcounts, bq, bk, factors))
                for variant in TIMED:
                    go, gl_ = run_gluon(q, k, kp, vp, tidx, tcounts, bq, bk, factors, variant)
                    err = rel(go, to)
                    row[f"gluon_{variant}_{key}_err_vs_triton"] = err
                    row[f"gluon_{variant}_{key}_ms"] = bench(
                        lambda: run_gluon(q, k, kp, vp, tidx, tcounts, bq, bk, factors, variant))
                    row.setdefault("ok", True)
                    row["ok"] &= err <= 1e-2 and not torch.isnan(go).any()
            # the whole fa4 attend stage with each pooled engine
            o_ref = torch.empty_like(q)
            kw = dict(block_q=bq, block_k=bk, factors=factors)
            from psa_vlm.kernels.attention import kernel as tk

            tk.sparse_attention(q, k, v, kp, vp, plan.kv_idx, plan.counts, out=o_ref, **kw)
            scale = 1.0 / math.sqrt(128)
            for label, pl, pf in (
                ("attend_triton48", functools.partial(fa4.triton_pooled_launch, scale=scale, **kw), (4, 8)),
                ("attend_gluon48", functools.partial(hopper.pooled_launch, scale=scale, **kw), (4, 8)),
                ("attend_gluon48_other_grid", functools.partial(hopper.pooled_launch, scale=scale,
                                                                tiles=_tiles("other_grid"), **kw), (4, 8)),
                ("attend_gluon248", functools.partial(hopper.pooled_launch, scale=scale, **kw), (2, 4, 8)),
            ):
                o = torch.full_like(q, float("nan"))

                def go(o=o, pl=pl, pf=pf):
                    return fa4.attend_by_levels(q, k, v, kp, vp, plan.kv_idx, plan.counts, scale=scale, out=o,
                                                launch=fa4.flash_attn_level, merge=fa4.merge_levels,
                                                pooled_launch=pl, pooled_factors=pf, **kw)
                go()
                err = rel(o, o_ref)
                row[f"{label}_err_vs_triton_attend"] = err
                row["ok"] &= err <= 1e-2
                row[f"{label}_ms"] = bench(go)
                row[f"{label}_over_ideal"] = row[f"{label}_ms"] / row["ideal_ms"]
            rows.append(row)
            say(json.dumps(row))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def new_lengths(lengths) -> list:
    """First call of the pooled Gluon kernel at each new prompt length against its second call (ms): a length must
    not compile the kernel again (its length-derived arguments are not specialised)."""
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.synthetic import video_like_qkv

    rows = []
    cfg = PSAConfig.preset("quota-0.2")
    for L in lengths:
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        _, plan = run_psa(q, k, v, cfg, backend="triton", plan_only=True)
        tcounts, tidx = tail_list(plan.kv_idx, plan.counts, L, cfg.block_k, plan.pool_factors, (4, 8))
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_gluon(q, k, plan.k_pooled, plan.v_pooled, tidx, tcounts, cfg.block_q, cfg.block_k,
                      plan.pool_factors, "default")
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(L=L, first_ms=times[0], second_ms=times[1]))
        say(json.dumps(rows[-1]))
        del q, k, v, plan
        torch.cuda.empty_cache()
    return rows


def profile_launches(L: int, preset: str, tail=(4, 8), reps: int = 2, variants=TIMED) -> None:
    """For Nsight Compute: the pooled launch of each timed variant ``reps`` times back to back (no checks, no
    timing), variant after variant in ``TIMED`` order, at one length and preset, e.g.
    ``ncu --clock-control none -k regex:_pooled_gluon_kernel -s 1 -c 3 --section WarpStateStats ...``."""
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.synthetic import video_like_qkv

    q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
    cfg = PSAConfig.preset(preset)
    _, plan = run_psa(q, k, v, cfg, backend="triton", plan_only=True)
    tcounts, tidx = tail_list(plan.kv_idx, plan.counts, L, cfg.block_k, plan.pool_factors, tail)
    for variant in variants:
        say(f"profile: variant {variant}, launches {reps}")
        for _ in range(reps):
            run_gluon(q, k, plan.k_pooled, plan.v_pooled, tidx, tcounts, cfg.block_q, cfg.block_k, plan.pool_factors,
                      variant)
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[65536, 131072])
    ap.add_argument("--presets", nargs="+", default=["quota-0.2"])
    ap.add_argument("--new-lengths", type=int, nargs="*", default=[],
                    help="after the timings: first against second call at these prompt lengths (ms)")
    ap.add_argument("--profile", action="store_true",
                    help="only launch each timed variant twice at the first length and preset (for Nsight Compute)")
    ap.add_argument("--variants", nargs="+", default=list(TIMED), choices=list(VARIANTS),
                    help="the variants --profile launches")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    import triton

    if args.profile:
        profile_launches(args.lengths[0], args.presets[0], variants=args.variants)
        return 0

    say(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
        "commit", os.environ.get("PSA_VLM_COMMIT", "?"))
    t0 = time.time()
    ok = checks()
    say(f"checks {'PASS' if ok else 'FAIL'} ({time.time() - t0:.1f} s incl. compiles)")
    rows = timings(args.lengths, args.presets) if ok else []
    ok &= all(r.get("ok", False) for r in rows)
    fresh = new_lengths(args.new_lengths) if ok else []
    if args.out:
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    commit=os.environ.get("PSA_VLM_COMMIT", "?"))
        with open(os.path.join(args.out, "devcheck_gluon_pooled.json"), "w") as fh:
            json.dump(dict(**meta, ok=ok, rows=rows, new_lengths=fresh), fh, indent=1, default=str)
    say("ALL CHECKS " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
