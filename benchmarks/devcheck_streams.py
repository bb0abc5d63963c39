"""Interleaved A/B of a switch in the fa4 attend stage on a GPU: developer check, not a test.

``--ab streams`` (default): the side stream (``fa4.CONCURRENT_LEVELS``) on / off. ``--ab persistent``: the pooled
Gluon kernel on a persistent grid against one program per query tile (``hopper.TILES["PROGRAMS_PER_SM"]`` 1 / 0).
``--ab uniform``: its short softmax on tiles inside one factor's rows against the column-wise one on every tile
(``hopper.TILES["UNIFORM"]`` True / False). (``--ab pingpong``, the ping-pong against one 8-warp MMA partition, ran at
commit 14a23cb before the one-partition form was removed: ``devcheck_streams_pingpong_ddfbd84-pingpong.json``.)
The H200's SM clock moves with power (1.4-1.98 GHz under these loads), so A and B are timed *interleaved*: every
round times A, then B, and the report gives the median of each and the median of the per-round ratios A / B.

1. ``run_psa`` (video-like bf16 Q/K/V, Qwen2.5-VL-7B attention shapes, fa4 backend) at each length and preset:
   ``--loop`` calls back to back between two events per sample, as in a model; the outputs of A and B must be
   equal bit for bit.
2. Time to first token of bench-prefill's 28-layer Qwen2.5-VL-7B-shaped model (random weights) patched with
   ``--prefill-preset`` at each length: one prefill per side per round; first-token logits of A and B must be
   equal.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/devcheck_streams.py [--lengths 65536 131072] [--out DIR]

Writes ``devcheck_streams_<commit>.json`` (``devcheck_streams_persistent_<commit>.json``) into ``--out``. This is a
command-line report: it prints by design.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

import torch


def _events_ms(fn, n: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


#: What ``--ab`` switches: (label of A, label of B, setter(flag) where flag True selects A).
def _switches():
    from psa_vlm.kernels.attention import fa4

    def streams(flag):
        fa4.CONCURRENT_LEVELS = flag

    def grid(flag):  # the pooled Gluon kernel's persistent grid (NOTES_fa4.md v9); None: the shipped grid
        fa4.POOLED_OVERRIDES = {} if flag is None else {"GLUON_TILES": {"PROGRAMS_PER_SM": 1 if flag else 0}}

    def uniform(flag):  # the pooled Gluon kernel's uniform-tile softmax (NOTES_fa4.md v10); None: the shipped form
        fa4.POOLED_OVERRIDES = {} if flag is None else {"GLUON_TILES": {"UNIFORM": flag}}

    return {"streams": ("side stream", "one stream", streams, True),
            "persistent": ("persistent pooled grid", "one program per query tile", grid, None),
            "uniform": ("uniform-tile softmax", "column-wise softmax", uniform, None)}


def _ab(fn, setter, default, rounds: int, n: int) -> dict:
    """Interleaved samples of ``fn`` with A (``setter(True)``) and B (``setter(False)``); then ``setter(default)``
    (``None``: the shipped setting)."""
    a_ms, b_ms = [], []
    for _ in range(rounds):
        for flag, acc in ((True, a_ms), (False, b_ms)):
            setter(flag)
            acc.append(_events_ms(fn, n))
    setter(default)
    ratios = [a / b for a, b in zip(a_ms, b_ms)]
    return dict(a_ms=statistics.median(a_ms), b_ms=statistics.median(b_ms), ratio=statistics.median(ratios),
                a_samples=a_ms, b_samples=b_ms)


def _same(fn, setter, default) -> bool:
    outs = []
    for flag in (True, False):
        setter(flag)
        outs.append(fn().clone())
    setter(default)
    return bool(torch.equal(outs[0], outs[1])) and bool(torch.isfinite(outs[0]).all())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--presets", nargs="+", default=["quota-0.1", "quota-0.2", "quota-0.3"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--loop", type=int, default=10)
    ap.add_argument("--prefill-preset", default="quota-0.2")
    ap.add_argument("--prefill-rounds", type=int, default=5)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--ab", choices=["streams", "persistent", "uniform"], default="streams",
                    help="streams: fa4.CONCURRENT_LEVELS on / off; persistent: the pooled Gluon kernel's grid; "
                         "uniform: its softmax on tiles inside one factor's rows")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton

    import psa_vlm
    from psa_vlm import PSAConfig
    from psa_vlm.api import run_psa
    from psa_vlm.bench.prefill import build_model, prefill
    from psa_vlm.bench.synthetic import video_like_embeddings, video_like_qkv

    label_a, label_b, setter, default = _switches()[args.ab]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": os.environ.get("PSA_VLM_COMMIT", ""), "ab": args.ab, "a": label_a, "b": label_b,
           "layer": [], "prefill": []}
    ok = True
    for L in args.lengths:
        q, k, v = video_like_qkv(1, 28, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        for name in args.presets:
            cfg = PSAConfig.preset(name)
            fn = lambda: run_psa(q, k, v, cfg, backend="fa4")[0]  # noqa: E731
            same = _same(fn, setter, default)
            ok &= same
            r = dict(L=L, preset=name, same=same, **_ab(fn, setter, default, args.rounds, args.loop))
            res["layer"].append(r)
            print(f"L={L} {name}: run_psa {label_a} {r['a_ms']:.3f} ms, {label_b} {r['b_ms']:.3f} ms, "
                  f"ratio {r['ratio']:.4f}, outputs equal {same}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    if not args.no_prefill:
        model = build_model(None, None, "qwen2_5_vl")
        hidden = model.config.get_text_config().hidden_size
        psa_vlm.patch(model, PSAConfig.preset(args.prefill_preset), backend="auto")
        for L in args.lengths:
            embeds = video_like_embeddings(L, hidden, text_tokens=512, dtype=torch.bfloat16, device="cuda", seed=L)
            fn = lambda: prefill(model, embeds)  # noqa: E731
            same = _same(fn, setter, default)
            ok &= same
            r = dict(L=L, preset=args.prefill_preset, same=same, **_ab(fn, setter, default, args.prefill_rounds, 1))
            res["prefill"].append(r)
            print(f"L={L} prefill {args.prefill_preset}: TTFT {label_a} {r['a_ms']:.1f} ms, {label_b} "
                  f"{r['b_ms']:.1f} ms, ratio {r['ratio']:.4f}, logits equal {same}", flush=True)
            del embeds
            torch.cuda.empty_cache()
    res["ok"] = ok
    tag = "" if args.ab == "streams" else f"_{args.ab}"
    commit = re.sub(r"[^A-Za-z0-9._-]", "-", res["commit"] or "unknown")  # a file name the device tool returns
    path = os.path.join(args.out, f"devcheck_streams{tag}_{commit}.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print("ALL CHECKS " + ("PASS" if ok else "FAIL"), "->", path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
