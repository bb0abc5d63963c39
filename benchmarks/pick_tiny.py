"""Pick the best of several tiny-model training runs and install it as the shipped checkpoint.

Compares each candidate's ``training.json`` held-out accuracy with the shipped checkpoint's
(``psa_vlm/data/tiny_trained/training.json``). Score: mean overall accuracy over the evaluation sets both
share. A candidate replaces the shipped model only if it is better by at least ``--margin`` and loses no
more than ``--max-drop`` on any (set, kind) the shipped model already answers well (>= 0.75).
The model files are copied; ``TRAINING.md`` and ``normal_path_eval.json`` are left for a person to update.
Prints a table and ``installed NAME`` or ``kept shipped``; exits 0 either way.

    python3 benchmarks/pick_tiny.py /tmp/train_tiny_runs/E/ckpt /tmp/train_tiny_runs/F/ckpt
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "psa_vlm" / "data" / "tiny_trained"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "training.json", "psa_vlm_tiny.json")


def score(meta: dict, sets) -> float:
    return sum(meta["held_out"][s]["overall"] for s in sets) / len(sets)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("candidates", nargs="+", type=Path)
    p.add_argument("--margin", type=float, default=0.03)
    p.add_argument("--max-drop", type=float, default=0.15)
    args = p.parse_args()
    base = json.loads((SHIPPED / "training.json").read_text())
    best, best_gain = None, args.margin
    for cand in args.candidates:
        f = cand / "training.json"
        if not f.is_file():
            print(f"{cand}: no training.json")
            continue
        meta = json.loads(f.read_text())
        sets = [s for s in meta["held_out"] if s in base["held_out"]]
        gain = score(meta, sets) - score(base, sets)
        drops = [(s, k, base["held_out"][s]["per_kind"][k] - v) for s in sets
                 for k, v in meta["held_out"][s]["per_kind"].items()
                 if base["held_out"][s]["per_kind"].get(k, 0) >= 0.75]
        worst = max((d for _, _, d in drops), default=0.0)
        per = {k: round(sum(meta["held_out"][s]["per_kind"][k] for s in sets) / len(sets), 2)
               for k in meta["held_out"][sets[0]]["per_kind"]}
        print(f"{cand}: score {score(meta, sets):.3f} (shipped {score(base, sets):.3f}), gain {gain:+.3f}, "
              f"worst drop on a solved kind {worst:.2f}, per kind {per}")
        if gain >= best_gain and worst <= args.max_drop:
            best, best_gain = cand, gain
    if best is None:
        print("kept shipped")
        return 0
    for name in MODEL_FILES:
        shutil.copy2(best / name, SHIPPED / name)
    print(f"installed {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
