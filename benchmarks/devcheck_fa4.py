"""GPU check and timing of the FlashAttention-4 attend stage, level by level (developer script, outside the package).

Run on a Hopper GPU with flash-attn-4 importable, from the repository root::

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/devcheck_fa4.py [--lengths 65536 131072] [--out DIR]

For each length, video-like bf16 Q/K/V at Qwen2.5-VL-7B attention shapes (Hq 28, Hkv 4, D 128):
1. dense baselines (``psa_vlm.bench.attention.dense_baselines``): cuDNN SDPA, FlashAttention-2 through SDPA's
   flash backend, FlashAttention-4 dense;
2. for quota-0.1/0.2/0.3 and binary-0.2 plans (Triton pool/estimate/assign): correctness of the fa4 attend stage
   against the float32 reference on three query blocks, then medians of the Triton attend stage, the fa4 attend
   stage, each fa4 level launch alone and the merge; ideal = density x cuDNN dense;
3. import and first-compile costs of the fa4 path (new-length costs: ``benchmarks/devcheck_lengths.py
   --backend fa4``).
``--per-program``: instead, the factor-1 FlashAttention-4 launch alone on lists of the last ``n`` visible blocks of
every query block (the diagonal and ``n - 1`` before it; ``n`` = 0, 1, 2, 4, 16, 64): the intercept of time against
tiles is the launch's cost per program (one per query block and head), the slope its cost per tile.
Prints a table last and writes ``$OUT/devcheck_fa4.json``.

This is a command-line report: it writes to stdout by design.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List

import torch


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def bench(fn, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def check_fa4(q, k, v, plan, cfg) -> float:
    from psa_vlm.kernels.attention import fa4
    from psa_vlm.kernels.attention.naive import sparse_attention as ref_attn
    from psa_vlm.kernels.pool.naive import pyramid_pool

    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    factors = plan.pool_factors
    out = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    fa4.sparse_attention(q, k, v, plan.k_pooled, plan.v_pooled, plan.kv_idx, plan.counts, block_q=bq, block_k=bk,
                         factors=factors, out=out)
    if torch.isnan(out).any():
        return float("nan")
    nq = plan.kv_idx.shape[2]
    errs = []
    for i in sorted({0, nq // 2, nq - 1}):
        r0, r1 = i * bq, min((i + 1) * bq, Lq)
        kend = Lk - Lq + r1
        ks, vs = k[:, :, :kend], v[:, :, :kend]
        kp, vp, _ = pyramid_pool(ks, vs, block_k=bk, factors=factors, sim_thresholds=None)
        ref = ref_attn(q[:, :, r0:r1], ks, vs, kp, vp, plan.kv_idx[:, :, i : i + 1], plan.counts[:, :, i : i + 1],
                       block_q=bq, block_k=bk, factors=factors)
        errs.append(rel(out[:, :, r0:r1], ref))
    return max(errs)


def level_times(q, k, v, plan, cfg) -> Dict[str, float]:
    from psa_vlm.kernels.attention import fa4
    from psa_vlm.kernels.geometry import FACTOR_ORDER, cdiv, level_offsets

    bq, bk = cfg.block_q, cfg.block_k
    Lk = k.shape[2]
    nkf = Lk // bk
    factors = plan.pool_factors
    offs = level_offsets(nkf, bk, factors)
    widths = [cdiv(Lk, bk)] + [nkf if p in factors else 0 for p in FACTOR_ORDER[1:]]
    lists = fa4.level_block_lists(plan.kv_idx, plan.counts, widths)
    res = {"split_ms": bench(lambda: fa4.level_block_lists(plan.kv_idx, plan.counts, widths))}
    outs, lses, bias, used = [], [], [], []
    scale = 1.0 / math.sqrt(q.shape[-1])
    for col, p in enumerate(FACTOR_ORDER):
        if p != 1 and p not in factors:
            continue
        cnt, idx = lists[col]
        kl, vl = (k, v) if p == 1 else (plan.k_pooled[:, :, offs[p] : offs[p] + nkf * bk // p],
                                        plan.v_pooled[:, :, offs[p] : offs[p] + nkf * bk // p])
        fn = lambda: fa4.flash_attn_level(q, kl, vl, cnt, idx, block_q=bq, block_kv=bk // p, causal=p == 1,  # noqa
                                          scale=scale)
        o, lse = fn()
        res[f"level{p}_ms"] = bench(fn)
        outs.append(o)
        lses.append(lse)
        bias.append(math.log(p))
        used.append(cnt)
    out = torch.empty_like(q)
    res["merge_ms"] = bench(lambda: fa4.merge_levels(outs, lses, bias, used, bq, out))
    return res


def per_program(lengths) -> List[Dict]:
    """The factor-1 launch on lists of the last ``n`` visible blocks per query block (``--per-program``)."""
    from psa_vlm.bench.attention import dense_baselines
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.attention import fa4

    rows = []
    for L in lengths:
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        dense = dense_baselines(q, k, v, rep=100)
        nq = L // 128
        i = torch.arange(nq, device="cuda")
        row = dict(L=L, programs=28 * nq, sms=torch.cuda.get_device_properties(0).multi_processor_count, **dense)
        pts = []
        for n in (0, 1, 2, 4, 16, 64):
            cnt = torch.clamp(i + 1, max=n).to(torch.int32)
            j = torch.arange(nq, device="cuda")
            idx = (i[:, None] - cnt[:, None] + 1 + j[None, :]).to(torch.int32)  # ascending, the diagonal last
            idx = torch.where(j[None, :] < cnt[:, None], idx, torch.zeros_like(idx))
            cnt = cnt[None, None].expand(1, 28, nq).contiguous()
            idx = idx[None, None].expand(1, 28, nq, nq).contiguous()
            fn = lambda: fa4.flash_attn_level(q, k, v, cnt, idx, block_q=128, block_kv=128,  # noqa: E731
                                              causal=True, scale=128 ** -0.5)
            if n:
                o, _ = fn()
                ref, _ = fa4.emulate_level(q[:, :, -128:], k, v, cnt[:, :, -1:], idx[:, :, -1:], block_q=128,
                                           block_kv=128, causal=True, scale=128 ** -0.5)
                err = rel(o[:, -128:], ref)
                row[f"err_n{n}"] = err
                row["ok"] = row.get("ok", True) and err < 1e-2
            ms = bench(fn)
            tiles = int(cnt.sum())
            row[f"ms_n{n}"] = ms
            row[f"tiles_n{n}"] = tiles
            pts.append((tiles, ms))
            say(f"L={L} n={n}: {tiles} tiles, {ms:.3f} ms")
        xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        A = torch.stack([torch.ones_like(xs), xs], 1)
        sol = torch.linalg.lstsq(A, ys[:, None]).solution.flatten()
        row["intercept_ms"], row["ms_per_tile"] = float(sol[0]), float(sol[1])
        row["us_per_program_on_one_sm"] = 1e3 * float(sol[0]) * row["sms"] / row["programs"]
        row["us_per_tile_on_one_sm"] = 1e3 * float(sol[1]) * row["sms"]
        say(json.dumps(row))
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--presets", nargs="+", default=["quota-0.1", "quota-0.2", "quota-0.3", "binary-0.2"])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--quick", action="store_true",
                    help="no per-level timings, and only the shipped pooled factors unless --hybrids is given")
    ap.add_argument("--hybrids", nargs="+", default=None,
                    help="pooled-launch factor sets to time, e.g. none 8 4-8 2-4-8 (default: none 8 4-8)")
    ap.add_argument("--per-program", action="store_true",
                    help="only the factor-1 launch's cost per program and per tile (module docstring)")
    args = ap.parse_args()
    if args.per_program:
        rows = per_program(args.lengths)
        if args.out:
            with open(os.path.join(args.out, "devcheck_fa4_per_program.json"), "w") as fh:
                json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                               commit=os.environ.get("PSA_VLM_COMMIT", "?"), rows=rows), fh, indent=1)
        ok = all(r.get("ok", False) for r in rows)
        say("ALL CHECKS " + ("PASS" if ok else "FAIL"))
        return 0 if ok else 1
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.attention import dense_baselines
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.attention import fa4
    from psa_vlm.kernels.attention import kernel as tk

    t0 = time.time()
    err = fa4.fa4_import_error()
    say(f"flash-attn-4 import: {err or 'ok'} ({time.time() - t0:.1f} s)")
    if err:
        return 1
    say(torch.cuda.get_device_name(), "torch", torch.__version__)
    results: List[Dict] = []
    ok_all = True
    first = True
    for L in args.lengths:
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        dense = dense_baselines(q, k, v, rep=100)
        say(f"L={L} dense ms: " + ", ".join(f"{a} {b:.2f}" for a, b in dense.items()))
        for name in args.presets:
            cfg = PSAConfig.preset(name)
            _, plan = run_psa(q, k, v, cfg, backend="triton", plan_only=True)
            dens = plan.level_map.density()
            hist = plan.level_map.histogram()
            t1 = time.time()
            err = check_fa4(q, k, v, plan, cfg)
            if first:
                say(f"  first fa4 call incl. compile of every level: {time.time() - t1:.1f} s")
                first = False
            ok = err == err and err < 1e-2
            ok_all &= ok
            o = torch.empty_like(q)
            kw = dict(block_q=cfg.block_q, block_k=cfg.block_k, factors=plan.pool_factors, out=o)
            triton_ms = bench(lambda: tk.sparse_attention(q, k, v, plan.k_pooled, plan.v_pooled, plan.kv_idx,
                                                          plan.counts, **kw))
            attend = lambda: fa4.sparse_attention(q, k, v, plan.k_pooled, plan.v_pooled,  # noqa: E731
                                                  plan.kv_idx, plan.counts, **kw)
            variants = {}
            shipped = fa4.TRITON_POOLED_FACTORS
            if args.hybrids:
                hybrids = [() if h == "none" else tuple(int(x) for x in h.split("-")) for h in args.hybrids]
            else:
                hybrids = [shipped] if args.quick else [(), (8,), (4, 8)]
            for tp in hybrids:
                fa4.TRITON_POOLED_FACTORS = tp
                err_tp = check_fa4(q, k, v, plan, cfg) if tp != shipped else err  # every variant checked
                if not (err_tp == err_tp and err_tp < 1e-2):
                    say(f"  {name}: pooled factors {tp or 'none'} FAILED its check (err {err_tp:.2e}); not timed")
                    ok = ok_all = False
                    continue
                variants[tp] = bench(attend)
            fa4.TRITON_POOLED_FACTORS = min(variants, key=variants.get) if variants else shipped
            fa4_ms = variants.get(fa4.TRITON_POOLED_FACTORS, float("nan"))
            say(f"  {name}: attend by pooled factors on Triton: " +
                ", ".join(f"{tp or 'none'} {ms:.2f} ms" for tp, ms in variants.items()))
            # the other launches on a side stream (CONCURRENT_LEVELS) against all on one stream: same outputs
            conc = {}
            outs_by = {}
            for flag in (True, False):
                fa4.CONCURRENT_LEVELS = flag
                o.fill_(float("nan"))
                attend()
                outs_by[flag] = o.clone()
                conc[flag] = (bench(attend), bench(lambda: run_psa(q, k, v, cfg, backend="fa4")))
            fa4.CONCURRENT_LEVELS = True
            same = bool(torch.equal(outs_by[True], outs_by[False])) and not torch.isnan(outs_by[True]).any()
            ok &= same
            ok_all &= same
            say(f"  {name}: streams: attend {conc[True][0]:.3f} (side stream) vs {conc[False][0]:.3f} ms (one), "
                f"whole call {conc[True][1]:.3f} vs {conc[False][1]:.3f} ms, outputs equal: {same}")
            lv = {} if args.quick else level_times(q, k, v, plan, cfg)
            whole_fa4 = bench(lambda: run_psa(q, k, v, cfg, backend="fa4"))
            whole_triton = bench(lambda: run_psa(q, k, v, cfg, backend="triton"))
            ideal = dens * dense["cudnn"]
            row = dict(L=L, preset=name, density=dens, hist=hist, err=err, ok=ok, triton_ms=triton_ms, fa4_ms=fa4_ms,
                       hybrid={str(kk): vv for kk, vv in variants.items()},
                       whole_fa4_ms=whole_fa4, whole_triton_ms=whole_triton, ideal_ms=ideal,
                       attend_side_stream_ms=conc[True][0], attend_one_stream_ms=conc[False][0],
                       whole_side_stream_ms=conc[True][1], whole_one_stream_ms=conc[False][1], streams_equal=same,
                       **dense, **lv)
            results.append(row)
            say(f"  {name}: dens {dens:.3f} err {err:.2e} triton {triton_ms:.2f} ({triton_ms / ideal:.2f}x ideal) "
                f"fa4 {fa4_ms:.2f} ({fa4_ms / ideal:.2f}x) levels " +
                " ".join(f"{kk}={vv:.2f}" for kk, vv in lv.items()) +
                f" | whole fa4 {whole_fa4:.2f} triton {whole_triton:.2f} -> {dense['cudnn'] / whole_fa4:.2f}x cudnn, "
                f"{dense['fa4'] / whole_fa4:.2f}x fa4-dense")
        for name in ("paper",):
            cfg = PSAConfig.preset(name)
            out, plan = run_psa(q, k, v, cfg, backend="fa4")
            nog = cfg.replace(dense_guard=False)
            _, plan2 = run_psa(q, k, v, nog, backend="fa4")
            w = bench(lambda: run_psa(q, k, v, cfg, backend="fa4"))
            w2 = bench(lambda: run_psa(q, k, v, nog, backend="fa4"))
            say(f"  paper: density {plan2.level_map.density():.3f} hist {plan2.level_map.histogram()} guard "
                f"{plan.dense_reason} | whole (guard) {w:.2f} ms, (no guard) {w2:.2f} ms; fastest dense "
                f"{min(dense.values()):.2f}")
            results.append(dict(L=L, preset="paper", density=plan2.level_map.density(), guard=plan.dense_reason,
                                whole_guard_ms=w, whole_noguard_ms=w2, **dense))
        del q, k, v
        torch.cuda.empty_cache()
    if args.out:
        with open(os.path.join(args.out, "devcheck_fa4.json"), "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    say("ALL CHECKS " + ("PASS" if ok_all else "FAIL"))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
