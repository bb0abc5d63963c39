"""GPU check and timing of the estimator's GEMM form: the Gluon kernel (``estimate/hopper.py``) against the Triton
kernel, on the same inputs in the same run. Not imported by the library.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/devcheck_gluon_estimate.py [--lengths 65536 131072] [--out DIR]

1. Checks (on a Hopper GPU both engines, elsewhere the Triton one; bf16, video-like, transformers' ``[B, L, H, D]``
   storage; even and ragged lengths, ``Lq < Lk``, stride 8 and 16): against the float32 reference at 8k, the Gluon
   kernel against the Triton one at 20k; every output poisoned with NaN first.
2. ``triton.testing.do_bench`` medians of cuDNN SDPA (causal GQA) and ``block_importance`` with either engine
   (``_OVERRIDES["GLUON"]``), at each length, stride 8 and 16, an even length and the length minus 3 (the ragged
   row added after the kernel). Timings only for the engines whose checks passed.
Writes ``devcheck_gluon_estimate_<commit>.json`` (GPU name, versions, commit) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import torch


def _log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--variants", action="store_true",
                    help="also time Gluon tile variants (GLUON_TILES overrides), each checked first")
    args = ap.parse_args()
    import triton

    from psa_vlm.bench.synthetic import video_like_qkv
    from psa_vlm.kernels.estimate import kernel as est
    from psa_vlm.kernels.estimate.naive import block_importance as ref

    dev = torch.device("cuda")
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               commit=os.environ.get("PSA_VLM_COMMIT", "?"), checks=[], times={})

    def run(engine: str, q, k, s: int, poison: bool = False, tiles: Optional[dict] = None) -> torch.Tensor:
        est._OVERRIDES = {"GEMM": True, "GLUON": engine == "gluon", "GLUON_TILES": tiles or {}}
        if poison:
            est._alloc = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
        try:
            return est.block_importance(q, k, block_q=128, block_k=128, stride=s)
        finally:
            est._alloc = _alloc
            est._OVERRIDES = {}

    _alloc = est._alloc
    good = {"gluon": True, "triton": True} if torch.cuda.get_device_capability()[0] == 9 else {"triton": True}
    for L, lq, s in ((8192, 8192 - 3, 8), (8192, 8192, 16), (20000, 20000 - 1000 - 5, 8), (20000, 20000 - 1, 16)):
        q, k, _ = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device=dev, seed=int(time.time()) % 1000)
        q = q[:, :, L - lq:].transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] storage
        outs = {e: run(e, q, k, s, poison=True) for e in good}
        rf = ref(q.float(), k.float(), block_q=128, block_k=128, stride=s) if L <= 8192 else outs["triton"]
        for e, o in outs.items():
            err = (o - rf).abs().max().item() if torch.isfinite(o).all() else float("nan")
            ok = err <= 1e-4 * max(1.0, rf.abs().max().item())
            good[e] &= ok
            res["checks"].append(dict(engine=e, L=L, lq=lq, stride=s, max_abs_err=err, ok=ok,
                                      against="float32 reference" if L <= 8192 else "triton engine"))
            _log(f"  check {e} L={L} lq={lq} s={s}: max|err|={err:.3g} -> {'ok' if ok else 'FAIL'}")
    for L in args.lengths:
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device=dev, seed=1)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        t = {"sdpa_cudnn": triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), warmup=10, rep=300, return_mode="median")}
        for s in (8, 16):
            for lq in (L, L - 3):
                qq = q[:, :, L - lq:]
                for e in good:
                    if good[e]:
                        ms = triton.testing.do_bench(lambda: run(e, qq, k, s), warmup=10, rep=300,
                                                     return_mode="median")
                        t[f"{e}_s{s}_lq{lq}"] = ms
                        _log(f"L={L} lq={lq} s={s} {e}: {ms:.3f} ms = {ms / t['sdpa_cudnn'] * 100:.1f}% of cuDNN "
                             f"dense ({t['sdpa_cudnn']:.2f} ms)")
        res["times"][L] = t
        del q, k, v
    res["ok"] = good
    if args.variants and good.get("gluon"):
        res["variants"] = []
        small = []
        for L, lq, s in ((8192, 8192 - 3, 8), (8192, 8192 - 5, 16)):
            q, k, _ = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device=dev, seed=7)
            q = q[:, :, L - lq:].transpose(1, 2).contiguous().transpose(1, 2)
            small.append((q, k, s, ref(q.float(), k.float(), block_q=128, block_k=128, stride=s)))
        big = {}
        for L in args.lengths:
            q, k, _ = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device=dev, seed=1)
            big[L] = (q.transpose(1, 2).contiguous().transpose(1, 2), k)
        for tiles in ({}, {"NJ": 32}, {"NJ": 64}, {"NJ": 32, "NS": 4}, {"NJ": 64, "NS": 4},
                      {"NJ": 32, "UNROLL": 8}):
            row = dict(tiles=tiles)
            try:
                errs = [(run("gluon", q, k, s, poison=True, tiles=tiles) - rf).abs().max().item()
                        for q, k, s, rf in small]
                row["ok"] = all(e <= 1e-4 * 16 for e in errs)
                if row["ok"]:
                    for L, (q, k) in big.items():
                        for s in (8, 16):
                            row[f"L{L}_s{s}"] = triton.testing.do_bench(
                                lambda: run("gluon", q, k, s, tiles=tiles), warmup=10, rep=200, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
            res["variants"].append(row)
            _log(f"variant {row}")
    with open(os.path.join(args.out, f"devcheck_gluon_estimate_{res['commit']}.json"), "w") as f:
        json.dump(res, f, indent=1)
    if not all(good.values()) or not all(row.get("ok", True) for row in res.get("variants", [])):
        raise SystemExit("a check failed (see above)")


if __name__ == "__main__":
    main()
