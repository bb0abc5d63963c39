"""Paired numbers that ``fidelity.md`` does not print, from the per-prompt records in ``runs/``.

For each preset: the paired difference stride 16 - stride 8 of the attention error (mean over the 4 layers,
and layer 0 alone), and, as a noise floor, the paired KL difference between this study's stride-8 run and the
stride-8 run of the earlier study (``../fidelity-tiny/runs``, commit 48edf65), with the mean absolute
per-prompt KL differences of that re-run and of stride 16 against 8. Percentile bootstrap of the
mean of per-prompt differences, 2000 resamples, seed 0.

    .venv/bin/python eval/results/fidelity-stride16/paired_extras.py
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def load(folder: Path, name: str) -> dict:
    lines = (folder / "runs" / f"{name}.jsonl").read_text().splitlines()[1:]
    return {d["prompt_id"]: d for d in map(json.loads, lines)}


def boot(d: np.ndarray, rng: np.random.Generator) -> str:
    means = [rng.choice(d, len(d)).mean() for _ in range(2000)]
    return f"{d.mean():.3g} [{np.percentile(means, 2.5):.3g}, {np.percentile(means, 97.5):.3g}]"


def main() -> None:
    rng = np.random.default_rng(0)
    print("| preset | attn. error diff s16 - s8 (all layers) | layer 0 | KL diff s8 re-run - earlier s8 run "
          "| mean abs. KL diff: s8 re-run / s16 - s8 |")
    print("|---|---|---|---|---|")
    for name in ("quota-0.2", "quota-0.3", "paper"):
        s8, s16 = load(HERE, name), load(HERE, f"{name}-s16")
        old = load(HERE.parent / "fidelity-tiny", name)
        ids = sorted(s8)
        err = np.array([np.mean(list(s16[k]["layer_err"].values())) - np.mean(list(s8[k]["layer_err"].values()))
                        for k in ids])
        err0 = np.array([s16[k]["layer_err"]["0"] - s8[k]["layer_err"]["0"] for k in ids])
        rerun = np.array([s8[k]["kl"] - old[k]["kl"] for k in ids])
        kl16 = np.array([s16[k]["kl"] - s8[k]["kl"] for k in ids])
        print(f"| {name} | {boot(err, rng)} | {boot(err0, rng)} | {boot(rerun, rng)} "
              f"| {np.abs(rerun).mean():.2g} / {np.abs(kl16).mean():.2g} |")


if __name__ == "__main__":
    main()
