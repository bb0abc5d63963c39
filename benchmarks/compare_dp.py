"""Compare two lmms-eval ``--log_samples`` runs of the same task: one process against data-parallel.

Every document must be present once in both and (for ``qwen2_5_vl_psa``) PSA must have engaged with nearly
the same density (bf16 kernels on different GPUs may differ in the last bits); identical responses are
counted and reported (a random-weight model's long outputs can diverge on a last-bit difference).
Prints one line per check and a summary; exits 1 when a check fails.

    python3 benchmarks/compare_dp.py /tmp/dp_1 /tmp/dp_2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict


def load(folder: Path) -> Dict[int, dict]:
    files = sorted(folder.rglob("*samples_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples jsonl under {folder}")
    docs: Dict[int, dict] = {}
    for f in files:
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            doc_id = int(rec["doc_id"])
            if doc_id in docs:
                raise SystemExit(f"document {doc_id} appears twice in {folder}")
            docs[doc_id] = rec
    return docs


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


def main() -> int:
    one, many = (load(Path(p)) for p in sys.argv[1:3])
    ok = True
    if sorted(one) != sorted(many):
        print(f"FAIL documents differ: single {sorted(one)} vs data-parallel {sorted(many)}")
        ok = False
    same_resp = sum(response(one[d]) == response(many[d]) for d in one if d in many)
    dens = [(counts(one[d]).get("psa_density"), counts(many[d]).get("psa_density")) for d in one if d in many]
    engaged = sum(bool(counts(many[d]).get("psa_engaged")) for d in many)
    worst = max((abs(a - b) for a, b in dens if a is not None and b is not None), default=float("nan"))
    print(f"documents: single {len(one)}, data-parallel {len(many)}")
    print(f"identical responses: {same_resp}/{len(one)}")
    print(f"PSA engaged (data-parallel): {engaged}/{len(many)}; density mean "
          f"{sum(b for _, b in dens if b is not None) / max(1, len(dens)):.3f}; max |density diff| {worst:.4f}")
    if engaged != len(many) or not worst < 0.02:
        ok = False
    print("dp check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
