"""Same-input level-map agreement of the stride-16 estimator with the stride-8 one (tiny model, CPU).

The model runs ``quota-0.3`` at stride 8 (64-token blocks, ``min_seq_len`` 256, the eval-fidelity settings of
the tiny model) on the first ``--limit`` prompts of ``psa_synth_long``. At every PSA layer the estimator's
inputs ``q, k`` are kept and, for each preset below, the level map is computed twice on those same inputs:
with the stride-8 scores and with stride-16 scores (PyTorch reference stages). Reported per preset and
layer, over the visible blocks of the query blocks the estimator decides (no text in the query block):
the share of blocks whose level differs, the share whose keep/drop status differs, and both densities.
Layers after the first see the stride-8 model's activations, so every layer compares the two estimators on
identical inputs.

    .venv/bin/python eval/results/fidelity-stride16/level_agreement.py --limit 4 > eval/results/fidelity-stride16/levels.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from psa_vlm import PSAConfig
from psa_vlm.eval import fidelity
from psa_vlm.kernels.assign import naive as assign_naive
from psa_vlm.kernels.estimate import naive as est_naive
from psa_vlm.kernels.geometry import block_masks
from psa_vlm.kernels.pool import naive as pool_naive

PRESETS = ("quota-0.2", "quota-0.3", "paper")
FLOPS = {0: 0.0, 1: 1.0, 2: 0.5, 4: 0.25, 8: 0.125}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=8)
    opts = ap.parse_args()
    parser = argparse.ArgumentParser()
    fidelity.add_arguments(parser)
    args = parser.parse_args(["--limit", str(opts.limit), "--max-frames", "96"])
    session = fidelity.Session(args)
    runner = session.runner
    n_layers = runner.n_layers
    base = dict(block_q=fidelity.TINY_BLOCK, block_k=fidelity.TINY_BLOCK, min_seq_len=fidelity.TINY_MIN_SEQ_LEN)
    driver = PSAConfig.preset("quota-0.3", **base)
    configs = {p: PSAConfig.preset(p, **base) for p in PRESETS}

    orig_est, orig_assign = est_naive.block_importance, assign_naive.assign_levels
    held = {}
    calls = [0]
    # stats[preset][layer] -> lists of (n, level diff, keep diff, density8 sum, density16 sum)
    stats = defaultdict(lambda: defaultdict(lambda: torch.zeros(5, dtype=torch.float64)))

    def est(q, k, **kw):
        held.update(q=q, k=k, kw=kw)
        return orig_est(q, k, **kw)

    def assign(scores, cap, kv_flags, q_flags, *, lq, lk, config):
        out = orig_assign(scores, cap, kv_flags, q_flags, lq=lq, lk=lk, config=config)
        layer = calls[0] % n_layers
        calls[0] += 1
        q, k, kw = held["q"], held["k"], dict(held["kw"])
        kw.pop("stride")
        s8 = torch.nan_to_num(orig_est(q, k, stride=8, **kw), nan=0.0, posinf=0.0, neginf=0.0)
        s16 = torch.nan_to_num(orig_est(q, k, stride=16, **kw), nan=0.0, posinf=0.0, neginf=0.0)
        vis, _ = block_masks(lq, lk, config.block_q, config.block_k)
        rows = ~q_flags[:, None, :, None] if q_flags is not None else torch.ones(1, 1, vis.shape[0], 1, dtype=torch.bool)
        sel = vis[None, None] & rows  # [B, 1, nq, nk]
        for name, cfg in configs.items():
            _, _, cp = pool_naive.pyramid_pool(k, k, block_k=cfg.block_k, factors=cfg.pool_factors,
                                              sim_thresholds=cfg.sim_thresholds)
            f8 = orig_assign(s8, cp, kv_flags, q_flags, lq=lq, lk=lk, config=cfg)[0]
            f16 = orig_assign(s16, cp, kv_flags, q_flags, lq=lq, lk=lk, config=cfg.replace(stride=16))[0]
            m = sel.expand_as(f8)
            a, b = f8[m].long(), f16[m].long()
            w8 = sum(float((a == f).sum()) * c for f, c in FLOPS.items())
            w16 = sum(float((b == f).sum()) * c for f, c in FLOPS.items())
            stats[name][layer] += torch.tensor([a.numel(), float((a != b).sum()), float(((a > 0) != (b > 0)).sum()),
                                                w8, w16], dtype=torch.float64)
        return out

    est_naive.block_importance, assign_naive.assign_levels = est, assign
    try:
        for j, prompt in enumerate(session.prompts, 1):
            runner.run(prompt, driver, "quota-0.3")
            print(f"prompt {j}/{len(session.prompts)} done", file=sys.stderr)
    finally:
        est_naive.block_importance, assign_naive.assign_levels = orig_est, orig_assign
        runner.apply(None)

    print(f"{len(session.prompts)} prompts, {calls[0]} PSA layer calls; blocks: visible blocks of query blocks "
          "without text (the estimated rows), all heads\n")
    print("| preset | layer | blocks | level differs | keep/drop differs | est. density s8 / s16 |")
    print("|---|---|---|---|---|---|")
    for name in PRESETS:
        tot = torch.zeros(5, dtype=torch.float64)
        for layer in range(n_layers):
            n, dl, dk, w8, w16 = stats[name][layer].tolist()
            tot += stats[name][layer]
            print(f"| {name} | {layer} | {int(n)} | {dl / n:.3f} | {dk / n:.3f} | {w8 / n:.3f} / {w16 / n:.3f} |")
        n, dl, dk, w8, w16 = tot.tolist()
        print(f"| {name} | all | {int(n)} | {dl / n:.3f} | {dk / n:.3f} | {w8 / n:.3f} / {w16 / n:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
