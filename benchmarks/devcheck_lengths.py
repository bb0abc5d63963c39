"""GPU check: a new prompt length does not recompile psa_vlm's kernels (except a new power-of-two block count).

Run on a CUDA machine from the repository root::

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/devcheck_lengths.py [--backend auto|triton|fa4] [--out DIR]

Warms the whole ``psa_attention`` call (quota-0.2, Qwen2.5-VL-7B attention shapes, video-like bf16 inputs) at
the first length, then calls it once at each further length (residues mod 16 and block counts of every class,
one crossing of a power-of-two block count), timing the first call against that length's steady median. Every
Triton kernel excludes its length-derived integer arguments from specialisation (``do_not_specialize``), so a
first call may only cost a compilation where a block-count power of two is crossed (the split, assign and
estimate kernels size tiles by ``next_pow2(nk)``). Each call's output is checked against the float32 reference
on the last query block. Prints one line per length and PASS/FAIL. Not imported by the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "fa4"))
    ap.add_argument("--lengths", type=int, nargs="+",
                    default=[65536, 66536, 66539, 68536, 65666, 70001, 100000, 131072 + 3000])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    import triton

    from psa_vlm import PSAConfig
    from psa_vlm.api import resolve_backend, run_psa
    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.attention import naive
    from psa_vlm.kernels.pool.naive import pyramid_pool

    cfg = PSAConfig.preset("quota-0.2")
    args.backend = resolve_backend(args.backend)  # on the current CUDA device; the name recorded in the output
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "backend", args.backend, "commit", os.environ.get("PSA_VLM_COMMIT", "?"), flush=True)
    rows, ok_all, seen_pow2 = [], True, set()
    for n, L in enumerate(args.lengths):
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        torch.cuda.synchronize()
        t0 = time.time()
        out, plan = run_psa(q, k, v, cfg, backend=args.backend)
        torch.cuda.synchronize()
        first_ms = (time.time() - t0) * 1e3
        steady = float(triton.testing.do_bench(lambda: run_psa(q, k, v, cfg, backend=args.backend), warmup=5,
                                               rep=100, return_mode="median"))
        # the last query block against the PyTorch reference on the same level map (float32)
        bq, bk = cfg.block_q, cfg.block_k
        i = plan.kv_idx.shape[2] - 1
        r0 = i * bq
        kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=plan.pool_factors, sim_thresholds=None)
        ref = naive.sparse_attention(q[:, :, r0:].float(), k.float(), v.float(), kp.float(), vp.float(),
                                     plan.kv_idx[:, :, i:], plan.counts[:, :, i:], block_q=bq, block_k=bk,
                                     factors=plan.pool_factors)
        err = float((out[:, :, r0:].float() - ref).norm() / ref.norm())
        nk = -(-L // cfg.block_k)
        pow2 = triton.next_power_of_2(nk)
        new_class = n > 0 and pow2 not in seen_pow2
        seen_pow2.add(pow2)
        # a first call within 1.5x (+5 ms) of the steady time did not compile anything
        compiled = first_ms > 1.5 * steady + 5.0
        ok = n == 0 or new_class or not compiled
        ok &= err < 1e-2
        ok_all &= ok
        rows.append(dict(L=L, nk=nk, first_ms=first_ms, steady_ms=steady, compiled=compiled,
                         new_pow2_class=new_class, err=err, ok=ok))
        print(f"L={L:>7} nk={nk:>5} (L%16={L % 16:>2}, nk%16={nk % 16:>2}) first call {first_ms:9.1f} ms, steady "
              f"{steady:7.2f} ms{' [new power-of-two block count]' if new_class else ''}"
              f", rel. err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
        del q, k, v, out, plan
        torch.cuda.empty_cache()
    if args.out:
        with open(os.path.join(args.out, f"devcheck_lengths_{args.backend}.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    print("NEW-LENGTH CHECK " + ("PASS" if ok_all else "FAIL"), flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
