"""lmms-eval task functions for the synthetic video QA of ``psa_vlm.video.synth``.

The questions are planned on demand (deterministically, from fixed seeds; ``psa_vlm.video.synth.OFFLINE_TASKS``)
into ``eval/data/<task>/test.jsonl`` the first time lmms-eval loads a task's YAML: the variant modules
``short.py`` / ``long.py`` call ``ensure_data`` when they are imported, which happens before lmms-eval resolves
the YAML's relative ``data_files`` path. Each video is rendered the first time ``doc_to_visual`` asks for it, so
a run with ``--limit 8`` renders 8 clips, not 256. Render everything ahead of time (for example before a
multi-process run) with::

    python eval/tasks/psa_synth/utils.py            # both variants
    python eval/tasks/psa_synth/utils.py psa_synth_short

Paths are resolved relative to this file, so the repository can live anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
#: ``eval/data`` (next to ``eval/tasks``).
DATA_ROOT = HERE.parent.parent / "data"

logger = logging.getLogger("psa_synth")


def specs() -> Dict[str, Dict[str, Any]]:
    """Generation settings of each task variant (``psa_vlm.video.synth.OFFLINE_TASKS``)."""
    from psa_vlm.video.synth import OFFLINE_TASKS

    return OFFLINE_TASKS


def data_dir(task: str) -> Path:
    """Folder of a variant's dataset (``eval/data/<task>``)."""
    return DATA_ROOT / task


def _planned_jsonl(task: str, out: Path) -> str:
    """The jsonl text the current settings give (plans only: no video is rendered)."""
    from psa_vlm.video.synth import make_dataset

    tmp = out / ".plan"
    make_dataset(tmp, name="test", overwrite=True, render=False, **specs()[task])
    text = (tmp / "test.jsonl").read_text()
    shutil.rmtree(tmp, ignore_errors=True)
    return text


def ensure_data(task: str, *, timeout_s: float = 600.0) -> Path:
    """Plan the variant's questions unless its jsonl holds exactly them; return the jsonl path.

    A jsonl from other settings (e.g. the earlier 32/64-question versions) is replaced and its videos are
    deleted (they are rendered again on use). Safe under several processes (accelerate ranks): one takes a
    lock file and writes, the others wait for it.
    """
    out = data_dir(task)
    jsonl = out / "test.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".generating"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        deadline = time.monotonic() + timeout_s
        while lock.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout_s:.0f} s for {jsonl}; remove {lock} if no process is writing it"
                ) from None
            time.sleep(0.2)
        return jsonl
    try:
        os.close(fd)
        planned = _planned_jsonl(task, out)
        if not jsonl.is_file() or jsonl.read_text() != planned:
            if jsonl.is_file():
                logger.info("%s: questions changed; replacing %s and its videos", task, jsonl)
                shutil.rmtree(out / "videos", ignore_errors=True)
            tmp = out / ".test.jsonl.tmp"
            tmp.write_text(planned)
            os.replace(tmp, jsonl)
    finally:
        os.unlink(lock)
    return jsonl


def render_all(task: str) -> Path:
    """``ensure_data`` and render every video of the variant; return the jsonl path."""
    from psa_vlm.video.synth import ensure_video, load_dataset

    jsonl = ensure_data(task)
    items = load_dataset(jsonl)
    for i, item in enumerate(items, 1):
        ensure_video(item)
        if i % 32 == 0 or i == len(items):
            logger.info("%s: %d/%d videos rendered", task, i, len(items))
    return jsonl


# ---------------------------------------------------------------------------------------------- task functions
def make_doc_to_visual(task: str) -> Callable[[dict], List[str]]:
    """``doc_to_visual`` for a variant: the absolute path of the doc's mp4 (rendered now if missing)."""
    root = data_dir(task)

    def doc_to_visual(doc: dict) -> List[str]:
        from psa_vlm.video.synth import VideoQA, ensure_video

        item = VideoQA.from_dict(dict(doc))
        item.video = str(root / doc["video"])
        return [str(ensure_video(item))]

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
    for name in sys.argv[1:] or list(specs()):
        if name not in specs():
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(specs())}")
        print(render_all(name))
