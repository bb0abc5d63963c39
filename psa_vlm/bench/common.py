"""Benchmark plumbing shared by ``bench-attention`` and ``bench-prefill``: environment facts and CSV output."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from ..config import PSAConfig

__all__ = ["environment", "append_csv", "write_markdown", "median_ms", "binary_config_at_density"]


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PSA_VLM_COMMIT", "unknown")


def environment() -> Dict[str, str]:
    """GPU name and library versions, recorded beside every benchmark row."""
    import triton

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover
        tf = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": tf,
        "commit": os.environ.get("PSA_VLM_COMMIT") or _git_commit(),
    }


def median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """CUDA-event median of ``fn()`` in milliseconds (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def append_csv(path: Path, rows: Iterable[Dict], columns: List[str]) -> None:
    """Append rows with fixed columns, writing the header when the file is new.

    A file written with other columns (an older version of the benchmark) is rewritten first with the union of
    both, its columns first, so that every row stays under its own header (missing cells are empty).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            old_columns = list(reader.fieldnames or [])
            # the rows are read only when the file has to be rewritten (the usual append reads the header alone)
            old_rows = list(reader) if old_columns != list(columns) else []
        if old_columns != list(columns):
            columns = old_columns + [c for c in columns if c not in old_columns]
            tmp = path.with_name(path.name + ".tmp")  # replaced in one step: an interrupted run loses no row
            with tmp.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                for r in old_rows:
                    w.writerow({c: r.get(c, "") for c in columns})
            os.replace(tmp, path)
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})


def write_markdown(path: Path, rows: List[Dict], columns: List[str], title: str, conditions: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", conditions, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    path.write_text("\n".join(lines) + "\n")


def binary_config_at_density(
    q: torch.Tensor,
    k: torch.Tensor,
    target: float,
    *,
    base: Optional[PSAConfig] = None,
    backend: str = "auto",
    iters: int = 4,
    tol: float = 0.005,
) -> Tuple[PSAConfig, float]:
    """Binary keep/drop (quota mode, full resolution only) whose *measured* density on ``(q, k)`` is ``target``.

    Forced blocks (sink, diagonal, text) add density on top of a quota, so a quota equal to another method's
    measured density overshoots it; this corrects the quota a few times (fixed-point steps on the measured
    density) and returns the closest configuration found.

    Args:
        q, k: The inputs the comparison runs on.
        target: Density to match (e.g. a PSA preset's measured density).
        base: Configuration whose blocks, stride and flags to keep (default ``"binary"``).
        backend, iters, tol: Level-map backend, correction steps, and the accepted density error.

    Returns:
        ``(config, measured_density)``.
    """
    from ..api import build_level_map

    base = PSAConfig.preset("binary") if base is None else base
    best: Optional[Tuple[PSAConfig, float]] = None
    quota = min(max(target, 0.0), 1.0)
    for _ in range(max(1, iters)):
        cfg = base.replace(mode="quota", pool_factors=(), quotas=(quota, 0.0, 0.0, 0.0), sim_thresholds=None,
                           dense=False)
        measured = build_level_map(q, k, cfg, backend=backend).density()
        if best is None or abs(measured - target) < abs(best[1] - target):
            best = (cfg, measured)
        if abs(measured - target) <= tol:
            break
        quota = min(max(quota + (target - measured), 0.0), 1.0)
    assert best is not None
    return best


def split_method(name: str) -> Tuple[str, Dict[str, Any]]:
    """A benchmark method name and the config fields its suffixes set.

    Suffixes, each at most once, in any order: ``/sN`` sets the estimator stride to ``N``, ``/kv`` the GQA-shared
    estimator (``estimate_heads="kv"``). ``"quota-0.2/s16/kv"`` -> ``("quota-0.2", {"stride": 16,
    "estimate_heads": "kv"})``; a name without suffixes -> ``(name, {})``. A name with an unknown or repeated
    suffix comes back whole with no changes (it then fails the caller's check of known names).
    """
    base, *tails = name.split("/")
    changes: Dict[str, Any] = {}
    for tail in tails:
        if tail == "kv" and "estimate_heads" not in changes:
            changes["estimate_heads"] = "kv"
        elif tail[:1] == "s" and tail[1:].isdigit() and int(tail[1:]) > 0 and "stride" not in changes:
            changes["stride"] = int(tail[1:])
        else:
            return name, {}
    return base, changes
