"""Compare two lmms-eval ``--log_samples`` runs of the same task: one process against data-parallel.

Works for every psa_vlm lmms-eval model (``qwen2_vl_psa``, ``qwen2_5_vl_psa``, ``qwen3_vl_psa``: each writes
``psa_density`` / ``psa_engaged`` into the samples' ``token_counts``). Checks, one line each:

* documents: every document is present exactly once in both runs, the same set (and ``--expect N`` of them);
* model: both runs used the same lmms-eval model and model arguments (from the ``*_results.json``, if there);
* responses: identical answers for every document (``--allow-response-diffs`` only reports the count: a
  random-weight model's long outputs can diverge on a last-bit difference);
* density: PSA engaged on every document of both runs and the per-document densities agree within
  ``--density-tol`` (bf16 kernels on different GPUs may differ in the last bits).

Prints the lines and a summary ``dp check <model>: PASS|FAIL``; exits 1 when a check fails.

    python3 benchmarks/compare_dp.py /tmp/dp_qwen3_vl_psa_1 /tmp/dp_qwen3_vl_psa_2 --expect 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple


def load(folder: Path) -> Dict[int, dict]:
    files = sorted(folder.rglob("*samples_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples jsonl under {folder}")
    docs: Dict[int, dict] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            doc_id = int(rec["doc_id"])
            if doc_id in docs:
                raise SystemExit(f"FAIL document {doc_id} appears twice in {folder}")
            docs[doc_id] = rec
    return docs


def run_config(folder: Path) -> Tuple[Optional[str], Optional[str]]:
    """``(model, model_args)`` of the run from its ``*_results.json`` (``(None, None)`` when there is none)."""
    files = sorted(folder.rglob("*_results.json"))
    if not files:
        return None, None
    cfg = json.loads(files[-1].read_text()).get("config") or {}
    return cfg.get("model"), cfg.get("model_args")


def response(rec: dict) -> str:
    r = rec.get("filtered_resps") or rec.get("resps")
    while isinstance(r, list) and r:
        r = r[0]
    return str(r)


def counts(rec: dict) -> dict:
    tc = rec.get("token_counts") or {}
    if isinstance(tc, list):
        tc = tc[0] if tc else {}
    return tc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("single", type=Path, help="--output_path of the single-process run")
    p.add_argument("parallel", type=Path, help="--output_path of the data-parallel run")
    p.add_argument("--expect", type=int, default=None, help="number of documents each run must have")
    p.add_argument("--density-tol", type=float, default=1e-3,
                   help="largest per-document |density difference| (default 1e-3)")
    p.add_argument("--allow-response-diffs", action="store_true",
                   help="report differing answers without failing on them")
    args = p.parse_args(argv)

    one, many = load(args.single), load(args.parallel)
    (model1, margs1), (model2, margs2) = run_config(args.single), run_config(args.parallel)
    model = model1 or model2 or "?"
    results = []

    ok = sorted(one) == sorted(many) and (args.expect is None or len(one) == args.expect)
    detail = f"single {len(one)}, data-parallel {len(many)}" + (f", expected {args.expect}" if args.expect else "")
    if sorted(one) != sorted(many):
        only1, only2 = sorted(set(one) - set(many)), sorted(set(many) - set(one))
        detail += f"; only in single {only1}, only in data-parallel {only2}"
    results.append(("documents", ok, detail))

    if model1 is not None and model2 is not None:
        results.append(("model", model1 == model2 and margs1 == margs2,
                        f"{model1} ({margs1})" if model1 == model2 and margs1 == margs2
                        else f"single {model1} ({margs1}) vs data-parallel {model2} ({margs2})"))

    common = [d for d in sorted(one) if d in many]
    differ = [d for d in common if response(one[d]) != response(many[d])]
    results.append(("responses", not differ or args.allow_response_diffs,
                    f"identical {len(common) - len(differ)}/{len(common)}"
                    + (f"; differ on documents {differ}" if differ else "")
                    + (" (not required)" if differ and args.allow_response_diffs else "")))

    engaged1 = sum(bool(counts(one[d]).get("psa_engaged")) for d in one)
    engaged2 = sum(bool(counts(many[d]).get("psa_engaged")) for d in many)
    dens = [(counts(one[d]).get("psa_density"), counts(many[d]).get("psa_density")) for d in common]
    known = [(a, b) for a, b in dens if a is not None and b is not None]
    worst = max((abs(a - b) for a, b in known), default=float("nan"))
    mean = sum(b for _, b in known) / max(1, len(known))
    ok = engaged1 == len(one) and engaged2 == len(many) and len(known) == len(common) and worst <= args.density_tol
    results.append(("density", ok, f"PSA engaged single {engaged1}/{len(one)}, data-parallel {engaged2}/{len(many)}; "
                                   f"mean {mean:.4f}; max |diff| {worst:.5f} (tolerance {args.density_tol:g})"))

    for name, passed, text in results:
        print(f"{name}: {'PASS' if passed else 'FAIL'} - {text}")
    verdict = all(passed for _, passed, _ in results)
    print(f"dp check {model}:", "PASS" if verdict else "FAIL")
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
