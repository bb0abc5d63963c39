"""GPU check and timing of the Triton sparse attention kernel (a developer script kept outside the package).

Run on an H100/H200 from the repository root::

    PYTHONPATH=. PYTHONUNBUFFERED=1 PSA_VLM_TEST_GPU=1 python3 benchmarks/devcheck_attention.py [--sweep]

1. Correctness: bfloat16/float16 kernel vs the float32 reference (``naive.sparse_attention`` on the GPU) at
   Qwen2.5-VL-7B shapes (28/4 heads, D 128), NaN-poisoned transposed output buffers; the all-full list vs
   torch SDPA.
2. ``--sweep``: times a few tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) at one length.
3. Timing: for each length, dense causal SDPA (flash and cuDNN backends, KV repeated outside the timed region)
   and the kernel on quota-mode pyramid lists and binary (all-full) lists at each density; every timed
   configuration is first checked against the reference on two 256-row slices. ``triton.testing.do_bench``
   medians. The table (kernel ms, dense ms, density, ideal = density x dense, kernel / ideal) comes last;
   ``$OUT/attention_devcheck.json`` gets every number.

This is a command-line report: it writes to stdout by design.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from psa_vlm.config import PSAConfig
from psa_vlm.kernels.assign.naive import assign_levels, build_block_lists
from psa_vlm.kernels.geometry import cdiv
from psa_vlm.kernels.pool.naive import pyramid_pool
from psa_vlm.kernels.attention import kernel as K
from psa_vlm.kernels.attention.naive import sparse_attention as reference

Hq, Hkv, D, BQ, BK = 28, 4, 128, 128, 128
POOL = (2, 4, 8)


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def make_qkv(L: int, dtype: torch.dtype, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Hq, L, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, Hkv, L, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, Hkv, L, D, device="cuda", generator=g).to(dtype)
    return q, k, v


def quota_lists(L: int, density: float, binary: bool, seed: int):
    """Block lists of quota mode at ``density`` over random scores (pyramid levels or full-only)."""
    name = f"binary-{density}" if binary else f"quota-{density}"
    cfg = PSAConfig.preset(name, block_q=BQ, block_k=BK)
    nq, nk = cdiv(L, BQ), cdiv(L, BK)
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(1, Hq, nq, nk, device="cuda", generator=g)
    cap = torch.full((1, Hkv, nk), 8, dtype=torch.int8, device="cuda")
    f, kv_idx, counts = assign_levels(scores, cap, None, None, lq=L, lk=L, config=cfg)
    return f, kv_idx, counts


def map_density(f: torch.Tensor, L: int) -> float:
    from ...api import LevelMap

    return LevelMap(f, BQ, BK, L, L).density()


def check_slices(q, k, v, kv_idx, counts, factors, out) -> float:
    """Kernel output rows vs the float32 reference on the last 256 rows and 256 rows in the middle."""
    L = q.shape[2]
    worst = 0.0
    for a in (L - 256, (L // 2 // BQ) * BQ):
        lk = a + 256
        i0, i1 = a // BQ, cdiv(lk, BQ)
        nk = cdiv(lk, BK)
        kk, vv = k[:, :, :lk].float(), v[:, :, :lk].float()
        kp, vp, _ = pyramid_pool(kk, vv, block_k=BK, factors=factors)
        ref = reference(
            q[:, :, a:lk].float(), kk, vv, kp, vp,
            kv_idx[:, :, i0:i1, :nk].contiguous(), counts[:, :, i0:i1].contiguous(),
            block_q=BQ, block_k=BK, factors=factors,
        )
        got = out[:, :, a:lk]
        if torch.isnan(got).any():
            return float("nan")
        worst = max(worst, rel_err(got, ref))
    return worst


def run_kernel(q, k, v, kp, vp, kv_idx, counts, factors, out, variant=None):
    """The public launcher, or ``_launch`` with a variant (see ``VARIANT_FIELDS``)."""
    if variant is None:
        K.sparse_attention(q, k, v, kp, vp, kv_idx, counts, block_q=BQ, block_k=BK, factors=factors, out=out)
        return None
    return K._launch(
        q, k, v, kp, vp, kv_idx, counts, out, block_q=BQ, block_k=BK, factors=tuple(factors),
        scale=1.0 / math.sqrt(D), key_padding_mask=None, tiles=tuple(variant),
    )


def bench(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def correctness(results: Dict) -> bool:
    ok = True
    L = 8192
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = make_qkv(L, dtype, seed=1)
        kp, vp, _ = pyramid_pool(k, v, block_k=BK, factors=POOL)
        kpf, vpf, _ = pyramid_pool(k.float(), v.float(), block_k=BK, factors=POOL)
        for name, binary in (("pyramid", False), ("binary", True)):
            _, kv_idx, counts = quota_lists(L, 0.2, binary, seed=2)
            out = torch.full((1, L, Hq, D), float("nan"), dtype=dtype, device="cuda").transpose(1, 2)
            run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out)
            torch.cuda.synchronize()
            ref = reference(
                q.float(), k.float(), v.float(), kpf, vpf, kv_idx, counts, block_q=BQ, block_k=BK, factors=POOL
            )
            nan = bool(torch.isnan(out).any())
            err = rel_err(out, ref)
            good = (not nan) and err <= 1e-2
            ok &= good
            results.setdefault("correctness", []).append(
                dict(L=L, dtype=str(dtype), lists=name, rel_err=err, nan=nan, ok=good)
            )
            say(f"check {str(dtype):15s} {name:8s} L={L}: rel err {err:.2e} nan={nan} -> {'ok' if good else 'FAIL'}")
    # all-full lists vs SDPA, FlashAttention-style bound
    q, k, v = make_qkv(L, torch.bfloat16, seed=3)
    f = torch.ones(1, Hq, L // BQ, L // BK, dtype=torch.int8, device="cuda")
    _, kv_idx, counts = build_block_lists(f, lq=L, lk=L, block_q=BQ, block_k=BK)
    out = torch.full_like(q, float("nan"))
    e = k.new_empty(1, Hkv, 0, D)
    run_kernel(q, k, v, e, e, kv_idx, counts, (), out)
    G = Hq // Hkv
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sd = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), is_causal=True)
    e_k, e_s = float((out.float() - ref).abs().max()), float((sd.float() - ref).abs().max())
    good = (not bool(torch.isnan(out).any())) and e_k <= 2 * e_s + 1e-5
    ok &= good
    results.setdefault("correctness", []).append(
        dict(L=L, lists="dense-vs-sdpa", max_err=e_k, sdpa_max_err=e_s, ok=good)
    )
    say(f"check dense list vs SDPA L={L}: max err {e_k:.2e} (SDPA {e_s:.2e}) -> {'ok' if good else 'FAIL'}")
    return ok


def dense_times(L: int) -> Dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_qkv(L, torch.bfloat16, seed=11)
    G = Hq // Hkv
    kk, vv = k.repeat_interleave(G, 1).contiguous(), v.repeat_interleave(G, 1).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    times = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                times[name] = bench(lambda: sdpa(q, kk, vv, is_causal=True))
        except Exception as exc:  # backend missing on this build
            say(f"  sdpa {name}: unavailable ({type(exc).__name__}: {str(exc)[:80]})")
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            times["flash_gqa"] = bench(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
    except Exception as exc:
        say(f"  sdpa flash enable_gqa: unavailable ({type(exc).__name__})")
    return times


VARIANT_FIELDS = "(BLOCK_M, BLOCK_N, num_warps, num_stages)"
SWEEP = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]  # the first is the default


def sweep(L: int, density: float, results: Dict) -> None:
    q, k, v = make_qkv(L, torch.bfloat16, seed=21)
    kp, vp, _ = pyramid_pool(k, v, block_k=BK, factors=POOL)
    out = torch.empty_like(q)
    lists = {n: quota_lists(L, density, b, seed=22)[1:] for n, b in (("pyramid", False), ("binary", True))}
    f = torch.ones(1, Hq, L // BQ, L // BK, dtype=torch.int8, device="cuda")
    lists["all-full"] = build_block_lists(f, lq=L, lk=L, block_q=BQ, block_k=BK)[1:]
    for cfg in SWEEP:
        for name, (kv_idx, counts) in lists.items():
            if name == "all-full" and cfg != SWEEP[0]:
                continue
            try:
                out.fill_(float("nan"))
                ck = run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out, variant=cfg)
                torch.cuda.synchronize()
                err = check_slices(q, k, v, kv_idx, counts, POOL, out)
                t = bench(lambda: run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out, variant=cfg))
            except Exception as exc:
                say(f"sweep {name} {cfg}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                continue
            regs, spills = getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)
            results.setdefault("sweep", []).append(
                dict(L=L, density=density, lists=name, variant=cfg, ms=t, err=err, regs=regs, spills=spills)
            )
            say(f"sweep L={L} d={density} {name:8s} {cfg}: {t:.3f} ms err {err:.1e} regs {regs} spills {spills}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument(
        "--alt", type=str, default=None, help="BLOCK_M,BLOCK_N,warps,stages timed beside the default, or 'best' "
                    "(the sweep's fastest on pyramid lists at 32k)")
    args = ap.parse_args(argv)

    import triton

    props = torch.cuda.get_device_properties(0)
    results: Dict = dict(
        gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
        default_tiles=K._pick_tiles(BQ, BK, D, torch.bfloat16),
    )
    say(f"GPU {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    say(f"default tiles (BLOCK_M, BLOCK_N, warps, stages) = {results['default_tiles']}")
    t0 = time.time()
    ok = True if args.skip_check else correctness(results)
    say(f"correctness {'passed' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
    if args.sweep:
        say(f"sweep variants: {VARIANT_FIELDS}")
        sweep(16384, 0.1, results)
        sweep(32768, 0.2, results)

    alt = None
    if args.alt == "best" and results.get("sweep"):
        cands = [
            r for r in results["sweep"] if r["lists"] == "pyramid" and r["L"] == 32768 and r["variant"] != SWEEP[0]
        ]
        alt = min(cands, key=lambda r: r["ms"])["variant"] if cands else None
    elif args.alt and args.alt != "best":
        alt = tuple(int(x) for x in args.alt.split(","))
    rows = []
    for L in args.lengths:
        dt = dense_times(L)
        dense = min(dt.values())
        say(f"L={L}: dense SDPA " + ", ".join(f"{n} {t:.3f} ms" for n, t in dt.items()))
        q, k, v = make_qkv(L, torch.bfloat16, seed=31)
        kp, vp, _ = pyramid_pool(k, v, block_k=BK, factors=POOL)
        out = torch.full_like(q, float("nan"))
        for dens in args.densities:
            for name, binary in (("pyramid", False), ("binary", True)):
                f, kv_idx, counts = quota_lists(L, dens, binary, seed=32)
                rho = map_density(f, L)
                out.fill_(float("nan"))
                run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out)
                torch.cuda.synchronize()
                err = check_slices(q, k, v, kv_idx, counts, POOL, out)
                good = err <= 1e-2  # NaN fails
                t = bench(lambda: run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out)) if good else float("nan")
                t_alt = float("nan")
                if alt is not None:
                    out.fill_(float("nan"))
                    run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out, variant=alt)
                    torch.cuda.synchronize()
                    if check_slices(q, k, v, kv_idx, counts, POOL, out) <= 1e-2:
                        t_alt = bench(lambda: run_kernel(q, k, v, kp, vp, kv_idx, counts, POOL, out, variant=alt))
                ideal = rho * dense
                row = dict(L=L, lists=name, target=dens, density=rho, kernel_ms=t, dense_ms=dense,
                           ideal_ms=ideal, ratio=t / ideal, rel_err=err, ok=good, dense_all=dt, alt=alt,
                           alt_ms=t_alt)
                rows.append(row)
                say(f"  {name:8s} d={dens}: density {rho:.3f} err {err:.1e} kernel {t:.3f} ms ratio {t / ideal:.2f}"
                    f" alt {t_alt:.3f} ms")
    results["timings"] = rows
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "attention_devcheck.json"), "w") as fh:
            json.dump(results, fh, indent=1, default=str)

    say("")
    say(f"{props.name}, bf16, B=1 Hq={Hq} Hkv={Hkv} D={D} bq=bk={BQ}, do_bench medians")
    say(f"{'L':>6} {'lists':8} {'density':>7} {'kernel ms':>9} {'dense ms':>9} {'ideal ms':>9} {'k/ideal':>7}"
        f" {'check':>6}"
        + (f" {'alt ms':>8} {'alt/ideal':>9}" if alt else ""))
    for r in rows:
        say(
            f"{r['L']:>6} {r['lists']:8} {r['density']:7.3f} {r['kernel_ms']:9.3f} {r['dense_ms']:9.3f} "
            f"{r['ideal_ms']:9.3f} {r['ratio']:7.2f} {('ok' if r['ok'] else 'FAIL'):>6}"
            + (f" {r['alt_ms']:8.3f} {r['alt_ms'] / r['ideal_ms']:9.2f}" if alt else "")
        )
    if alt:
        say(f"alt = {VARIANT_FIELDS} {alt}")
    return 0 if ok and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
