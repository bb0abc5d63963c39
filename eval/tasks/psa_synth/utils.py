"""lmms-eval task functions for the synthetic video QA of ``psa_vlm.video.synth``.

The datasets are generated on demand (deterministically, from fixed seeds) into ``eval/data/<task>/`` the
first time lmms-eval loads a task's YAML: the variant modules ``short.py`` / ``long.py`` call
``ensure_data`` when they are imported, which happens before lmms-eval resolves the YAML's relative
``data_files`` path. Generate them ahead of time (for example before a multi-process run) with::

    python eval/tasks/psa_synth/utils.py            # both variants
    python eval/tasks/psa_synth/utils.py psa_synth_short

Paths are resolved relative to this file, so the repository can live anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
#: ``eval/data`` (next to ``eval/tasks``).
DATA_ROOT = HERE.parent.parent / "data"

#: Generation settings of each task variant (``psa_vlm.video.synth.make_dataset`` arguments).
SPECS: Dict[str, Dict[str, Any]] = {
    # 16-frame clips (4 s at 4 fps): every frame can be given to the model.
    "psa_synth_short": dict(n=32, kind="mixed", frames=16, fps=4.0, width=224, height=168, seed=1),
    # 128-frame clips (16 s at 8 fps): needles last 10 frames, visible to any even sampling of >= 16 frames.
    "psa_synth_long": dict(n=64, kind="mixed", frames=128, fps=8.0, width=224, height=168, seed=2),
}

logger = logging.getLogger("psa_synth")


def data_dir(task: str) -> Path:
    """Folder of a variant's dataset (``eval/data/<task>``)."""
    return DATA_ROOT / task


def ensure_data(task: str, *, timeout_s: float = 600.0) -> Path:
    """Generate the variant's dataset unless its jsonl exists; return the jsonl path.

    Safe under several processes (accelerate ranks): one takes a lock file and generates, the others wait
    for the jsonl (``make_dataset`` writes it last, atomically).
    """
    out = data_dir(task)
    jsonl = out / "test.jsonl"
    if jsonl.is_file():
        return jsonl
    from psa_vlm.video.synth import make_dataset

    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".generating"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        deadline = time.monotonic() + timeout_s
        while not jsonl.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout_s:.0f} s for {jsonl}; remove {lock} if no process is writing it"
                ) from None
            time.sleep(0.5)
        return jsonl
    try:
        os.close(fd)
        logger.info("generating the %s dataset into %s", task, out)
        make_dataset(out, name="test", **SPECS[task])
    finally:
        os.unlink(lock)
    return jsonl


# ---------------------------------------------------------------------------------------------- task functions
def make_doc_to_visual(task: str) -> Callable[[dict], List[str]]:
    """``doc_to_visual`` for a variant: the absolute path of the doc's mp4."""
    root = data_dir(task)

    def doc_to_visual(doc: dict) -> List[str]:
        return [str(root / doc["video"])]

    return doc_to_visual


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: Optional[dict] = None) -> str:
    """Question, the four lettered choices, then the post prompt."""
    kw = lmms_eval_specific_kwargs or {}
    lines = [kw.get("pre_prompt", "") + doc["question"]]
    lines += [f"{letter}. {text}" for letter, text in zip("ABCD", doc["choices"])]
    post = kw.get("post_prompt", "\nAnswer with the option's letter from the given choices directly.")
    return "\n".join(lines) + post


_LETTER = re.compile(r"\b([A-D])\b")


def extract_letter(response: str) -> str:
    """The first stand-alone A-D letter of a response ('' if none): ``"B. cyan"`` -> ``"B"``."""
    text = response.strip()
    for prefix in ("The answer is", "The best answer is", "Answer:", "answer:"):
        text = text.replace(prefix, " ")
    m = _LETTER.search(text)
    return m.group(1) if m else ""


def process_results(doc: dict, results: List[str]) -> Dict[str, Any]:
    """``accuracy``: 1 if the extracted letter is the answer; the per-kind record for ``kind_accuracy``."""
    pred = extract_letter(results[0] if results else "")
    score = float(pred == doc["answer"])
    return {"accuracy": score, "kind_accuracy": {"kind": doc["kind"], "score": score}}


def aggregate_kind_accuracy(items: List[Dict[str, Any]]) -> float:
    """Mean accuracy; logs the per-kind accuracies."""
    by_kind: Dict[str, List[float]] = {}
    for it in items:
        by_kind.setdefault(it["kind"], []).append(it["score"])
    for kind, scores in sorted(by_kind.items()):
        logger.info("psa_synth %s: %.3f (%d items)", kind, sum(scores) / len(scores), len(scores))
    total = [s for v in by_kind.values() for s in v]
    return sum(total) / len(total) if total else 0.0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in sys.argv[1:] or list(SPECS):
        if name not in SPECS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(SPECS)}")
        print(ensure_data(name))
