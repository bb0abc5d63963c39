"""Where a patched layer's time goes beyond ``run_psa`` itself, on a GPU (developer check, not a test).

Builds the Qwen2.5-VL-7B-shaped language model of ``bench-prefill`` with a few layers, patches it with a preset,
and at one length reports (CUDA-event medians, ms): the prefill per layer dense and patched, ``run_psa`` on the
exact ``query``/``key``/``value`` tensors a patched layer received (same layouts), the same on contiguous
copies, and a ``torch.profiler`` table of CUDA kernel time by name for one patched prefill and for the
standalone call, so the patch's own kernels (statistics, masks, copies) show up as the difference. It also times
``run_psa`` back to back (``--loop`` calls between two events, so that every call but the first starts with work
queued, as in a model), with the dense guard's host read and without it (``dense_guard=False``): the difference is
what the read's pipeline drain costs per call, and the no-guard loop minus the kernel total the other host gaps. Whether the
standalone call reproduced the patched layer's output exactly is reported (``same_output``; the patch also passes
the prompt's token types, which the standalone call does not).

Usage: python benchmarks/devcheck_patch_overhead.py [--length 65536] [--layers 4] [--preset quota-0.2]
       [--backend auto] [--loop 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch


def _ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _kernels(fn, top: int = 25):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            agg[ev.name[:90]][0] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
            agg[ev.name[:90]][1] += 1
    rows = sorted(([n, round(t, 4), c] for n, (t, c) in agg.items()), key=lambda r: -r[1])
    return round(sum(r[1] for r in rows), 3), rows[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--preset", default="quota-0.2")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--loop", type=int, default=10, help="back-to-back run_psa calls per timed loop")
    ap.add_argument("--reps", type=int, default=0,
                    help="timed repetitions of the prefill and run_psa timings (default 3 / 5); more for clock "
                         "sampling beside the run: res['phases'] holds each timing's wall-clock start and end")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import psa_vlm
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.prefill import build_model, prefill
    from psa_vlm.bench.synthetic import video_like_embeddings

    model = build_model(None, args.layers, "qwen2_5_vl")
    tc = model.config.get_text_config()
    embeds = video_like_embeddings(args.length, tc.hidden_size, text_tokens=512, dtype=torch.bfloat16,
                                   device="cuda", seed=args.length)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "length": args.length,
           "layers": args.layers, "preset": args.preset, "backend": args.backend,
           "commit": os.environ.get("PSA_VLM_COMMIT", "")}
    phases = res["phases"] = []

    def timed(name, fn, reps):
        t0 = time.time()
        out = _ms(fn, args.reps or reps)
        phases.append([name, t0, time.time()])
        return out

    res["dense_prefill_ms"] = timed("dense_prefill", lambda: prefill(model, embeds), 3)
    cfg = PSAConfig.preset(args.preset)
    psa_vlm.patch(model, cfg, backend=args.backend)
    captured = {}

    def grab(i, out, dense, plan):
        if i == 0 and "q" not in captured:
            _, _, q, k, v, _, _, kwargs = dense._call
            captured.update(q=q, k=k, v=v, scale=kwargs.get("scaling"), out=out.clone(), engine=plan.attend_backend)

    with psa_vlm.observe(model, grab):
        prefill(model, embeds)
    res["psa_prefill_ms"] = timed("psa_prefill", lambda: prefill(model, embeds), 3)
    q, k, v, scale = captured["q"], captured["k"], captured["v"], captured["scale"]
    res["layouts"] = {n: [list(t.shape), list(t.stride())] for n, t in (("q", q), ("k", k), ("v", v))}
    res["engine"] = captured["engine"]
    buf = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)
    call = lambda: run_psa(q, k, v, cfg, scale=scale, backend=args.backend, out=buf.transpose(1, 2))  # noqa: E731
    call()
    res["same_output"] = bool(torch.equal(buf, captured["out"]))
    res["run_psa_ms"] = timed("run_psa", call, 5)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    res["run_psa_contiguous_ms"] = timed("run_psa_contiguous",
                                         lambda: run_psa(qc, kc, vc, cfg, scale=scale, backend=args.backend), 5)

    def loop_ms(c) -> float:
        for _ in range(2):
            run_psa(q, k, v, c, scale=scale, backend=args.backend, out=buf.transpose(1, 2))
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(args.loop):
            run_psa(q, k, v, c, scale=scale, backend=args.backend, out=buf.transpose(1, 2))
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / args.loop

    t0 = time.time()
    res["run_psa_loop_ms"] = sorted(loop_ms(cfg) for _ in range(3))[1]
    phases.append(["run_psa_loop", t0, time.time()])
    t0 = time.time()
    res["run_psa_loop_no_guard_ms"] = sorted(loop_ms(cfg.replace(dense_guard=False)) for _ in range(3))[1]
    phases.append(["run_psa_loop_no_guard", t0, time.time()])
    for key, fn in (("patched_prefill_kernels", lambda: prefill(model, embeds)), ("run_psa_kernels", call)):
        try:
            res[key] = _kernels(fn)
        except Exception as exc:  # report only
            res[key] = (0.0, [[f"profiler failed: {type(exc).__name__}: {exc}", 0.0, 0]])
    psa_vlm.unpatch(model)
    try:
        res["dense_prefill_kernels"] = _kernels(lambda: prefill(model, embeds))
    except Exception as exc:  # report only
        res["dense_prefill_kernels"] = (0.0, [[f"profiler failed: {type(exc).__name__}: {exc}", 0.0, 0]])
    per = lambda x: round(x / args.layers, 3)  # noqa: E731
    print(f"{res['gpu']} L={args.length} {args.preset} engine={res['engine']} same_output={res['same_output']}")
    print(f"per layer: dense prefill {per(res['dense_prefill_ms'])} ms, patched {per(res['psa_prefill_ms'])} ms; "
          f"run_psa on the layer's tensors {res['run_psa_ms']:.3f} ms, on contiguous copies "
          f"{res['run_psa_contiguous_ms']:.3f} ms; layouts {res['layouts']}")
    print(f"run_psa back to back: {res['run_psa_loop_ms']:.3f} ms per call with the dense guard's host read, "
          f"{res['run_psa_loop_no_guard_ms']:.3f} ms without it; CUDA kernel total of one call "
          f"{res['run_psa_kernels'][0]} ms")
    for key in ("patched_prefill_kernels", "run_psa_kernels", "dense_prefill_kernels"):
        total, rows = res[key]
        print(f"\n{key}: CUDA total {total} ms")
        for name, t, c in rows:
            print(f"  {t:9.3f} ms  x{c:<4d} {name}")
    if args.out:
        with open(os.path.join(args.out, f"devcheck_patch_overhead_{args.length}.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
