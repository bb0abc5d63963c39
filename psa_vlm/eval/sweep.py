"""``psa-vlm eval-sweep``: lmms-eval accuracy against measured sparsity, the same tasks across PSA presets.

One model instance (``--lmms-model``: ``qwen2_vl_psa``, ``qwen2_5_vl_psa`` or ``qwen3_vl_psa``, by default the
one that serves the checkpoint's ``model_type``) is loaded once and re-configured per preset; every (task, preset)
pair is one in-process ``lmms_eval.evaluator.simple_evaluate`` call (no CLI start-up per run), with a
``TaskManager`` that includes the repository's offline tasks (``eval/tasks``). Each finished pair is written
to ``OUT/runs/<task>__<preset>.json`` at once, so an interrupted sweep resumes where it stopped (a result
is reused when its model, weights fingerprint, model args and limit match; ``--redo`` runs everything again).

Outputs, rebuilt from the run files after every sweep:

- ``OUT/sweep.csv`` and ``OUT/sweep.md``: task, preset, family, accuracy, metric, measured sparsity and
  density (per-sample means over the prefill), mean prefill time, mean prompt tokens, samples;
- ``OUT/sweep.png``: accuracy against measured sparsity, one panel per task, one line per method family
  (pyramid: ``paper`` / ``quota-*``; binary: ``binary`` / ``binary-*``), dense as a single point.

Without ``--model`` the sweep runs on the tiny offline model (the shipped trained one if the package has it,
else random weights: chance-level accuracy), with frame/pixel settings and PSA block sizes small enough for the
CPU; see ``eval/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import PRESETS
from . import LMMS_MODEL_FOR_FAMILY, MODEL_IDS, PSA_MODEL_ARGS

__all__ = [
    "add_arguments",
    "main",
    "DEFAULT_PRESETS",
    "TABLE_COLUMNS",
    "family_of",
    "run_file",
    "summarize_run",
    "write_tables",
    "write_figure",
    "default_include_path",
]

logger = logging.getLogger(__name__)

DEFAULT_PRESETS = "dense,paper,quota-0.2,binary-0.2"
DEFAULT_TASKS = "psa_synth_short"
#: Columns of ``sweep.csv`` / ``sweep.md``.
TABLE_COLUMNS = [
    "task", "preset", "family", "accuracy", "accuracy_lo", "accuracy_hi", "metric", "sparsity", "density",
    "prefill_s", "vision_s", "prompt_tokens", "samples", "limit",
]
#: lmms-eval model args used with the tiny offline model unless given (small frames and PSA blocks).
TINY_MODEL_ARGS = {
    "max_num_frames": 16,
    "min_pixels": 28 * 28 * 4,
    "max_pixels": 224 * 168,
    "block_size": 32,
    "min_seq_len": 64,
}
_METRIC_PRIORITY = ("accuracy", "acc", "exact_match", "score")
RUN_FORMAT = 3


# ---------------------------------------------------------------------------------------------- arguments
def default_include_path() -> Optional[Path]:
    """``eval/tasks`` of the source checkout this package runs from (``None`` for an installed wheel)."""
    p = Path(__file__).resolve().parents[2] / "eval" / "tasks"
    return p if p.is_dir() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psa-vlm eval-sweep``."""
    parser.add_argument("--model", default=None,
                        help="local checkpoint directory of a supported family (qwen2_vl, qwen2_5_vl, qwen3_vl, "
                             "qwen3_vl_moe; default: the tiny offline Qwen2.5-VL)")
    parser.add_argument("--lmms-model", "--model-family", dest="lmms_model", default=None,
                        help="lmms-eval model: qwen2_vl_psa, qwen2_5_vl_psa or qwen3_vl_psa, or a model family "
                             "(qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe) for the model that serves it "
                             "(default: the one for the checkpoint's model_type)")
    parser.add_argument("--force-simple", action="store_true",
                        help="use the lmms-eval model's simple class instead of its chat class "
                             "(qwen2_vl_psa has only a simple class)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated lmms-eval tasks (default {DEFAULT_TASKS})")
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help=f"comma-separated PSA presets (default {DEFAULT_PRESETS}); known: {', '.join(PRESETS)}")
    from ..cli import existing_dir, nonnegative_int, output_dir, positive_float

    parser.add_argument("--limit", type=positive_float, default=None,
                        help="documents per task (an int; a value below 1 is a fraction); default all")
    parser.add_argument("--out", type=output_dir, default=None,
                        help="output folder (default ./psa_sweep/<model name>)")
    parser.add_argument("--model-args", default="",
                        help="extra arguments of the lmms-eval model, 'k=v,k=v' as lmms-eval's --model_args "
                             "(e.g. 'max_num_frames=64,max_pixels=200704,min_seq_len=4096')")
    parser.add_argument("--include-path", type=existing_dir, action="append", default=None,
                        help="folder of extra lmms-eval task YAMLs (repeatable; default: the repo's eval/tasks)")
    parser.add_argument("--metric", default=None, help="metric to report as accuracy (default: picked per task)")
    parser.add_argument("--bootstrap-iters", type=nonnegative_int, default=0,
                        help="lmms-eval bootstrap iterations for stderr (default 0: none)")
    parser.add_argument("--redo", action="store_true", help="run every (task, preset) again, ignoring saved results")
    parser.add_argument("--psa-config", type=Path, action="append", default=[],
                        help="a JSON PSA config (PSAConfig.save, psa-vlm calibrate) to run as one more entry, named by "
                             "its file stem and used as written (--model-args PSA overrides do not apply to it; "
                             "repeatable)")


def _cli_error(msg: str) -> Exception:
    from ..cli import CLIError

    return CLIError(msg)


def _split(value: str) -> List[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _scalar(text: str) -> Any:
    """lmms-eval's value conversion for ``--model_args``: true/false, integers, floats, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.isnumeric():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _parse_model_args(text: str) -> Dict[str, Any]:
    """``"k=v,k=v"`` -> dict, values converted as lmms-eval converts ``--model_args``."""
    out: Dict[str, Any] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise _cli_error(f"--model-args {text!r} is not 'key=value,key=value' (at {part!r})")
        out[key.strip()] = _scalar(val.strip())
    return out


def _limit(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if value <= 0:
        raise _cli_error(f"--limit must be positive, got {value:g}")
    return int(value) if value >= 1 else float(value)


# ---------------------------------------------------------------------------------------------- results
def family_of(preset: str) -> str:
    """``dense``, ``binary`` (keep/drop presets) or ``pyramid`` (PSA presets)."""
    if preset == "dense":
        return "dense"
    if preset.startswith("binary"):
        return "binary"
    return "pyramid"


def weights_fingerprint(model_dir: Path, chunk: int = 1 << 20) -> str:
    """A cheap fingerprint of a checkpoint's weights: ``config.json`` and, per ``*.safetensors`` file, its size
    and the SHA-256 of its first and last MiB (retrained weights change both; hashing whole multi-GB shards
    would not be cheap). A sweep resumes a saved run only when this matches."""
    import hashlib

    h = hashlib.sha256()
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(chunk))
            fh.seek(max(0, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def run_file(out: Path, task: str, preset: str) -> Path:
    """Result file of one (task, preset) pair."""
    def safe(s: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)

    return out / "runs" / f"{safe(task)}__{safe(preset)}.json"


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _pick_metric(entry: Dict[str, Any], metric: Optional[str]) -> Tuple[Optional[str], Optional[float]]:
    keys = [k for k in entry if "," in k and "_stderr" not in k and _numeric(entry[k])]
    names = {k.split(",", 1)[0]: k for k in keys}
    if metric is not None:
        key = names.get(metric)
        return (metric, float(entry[key])) if key else (None, None)
    for name in _METRIC_PRIORITY:
        if name in names:
            return name, float(entry[names[name]])
    if keys:
        return keys[0].split(",", 1)[0], float(entry[keys[0]])
    return None, None


def _accuracy(results: Dict[str, Any], task: str, metric: Optional[str]) -> Tuple[Optional[str], Optional[float]]:
    res = results.get("results", {})
    name, val = _pick_metric(res.get(task, {}), metric)
    if val is not None:
        return name, val
    subtasks = results.get("group_subtasks", {}).get(task) or [t for t in res if t != task]
    vals = []
    for sub in subtasks:
        n, v = _pick_metric(res.get(sub, {}), metric)
        if v is not None:
            name, vals = n, vals + [v]
    if vals:
        return f"{name} (mean of {len(vals)} subtasks)", sum(vals) / len(vals)
    return None, None


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    vals = [float(x) for x in xs if x is not None and _numeric(x)]
    return sum(vals) / len(vals) if vals else None


def accuracy_interval(row: Dict[str, Any], confidence: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """95% interval of a row's accuracy from its per-sample scores.

    Scores that are all 0/1 give the Wilson interval of ``k / n``; other scores a percentile bootstrap interval
    of their mean. Rows saved before per-sample scores were recorded fall back to ``k = round(accuracy * n)``
    when the accuracy is a proportion of ``n`` samples (the synthetic and multiple-choice tasks). ``(None, None)``
    where neither applies.
    """
    from .stats import bootstrap_ci, wilson_interval

    acc, n = row.get("accuracy"), int(row.get("samples") or 0)
    if acc is None or n == 0:
        return None, None
    scores = [s.get("score") for s in row.get("per_sample") or []]
    if scores and all(_numeric(x) for x in scores):
        if all(float(x) in (0.0, 1.0) for x in scores):
            return wilson_interval(int(sum(float(x) for x in scores)), len(scores), confidence)
        return bootstrap_ci([float(x) for x in scores], confidence=confidence)
    k = acc * n
    if 0.0 <= acc <= 1.0 and abs(k - round(k)) < 1e-6:
        return wilson_interval(int(round(k)), n, confidence)
    return None, None


def summarize_run(results: Dict[str, Any], task: str, preset: str, metric: Optional[str] = None) -> Dict[str, Any]:
    """One table row (plus per-sample records) from a ``simple_evaluate`` result of one task and preset."""
    name, acc = _accuracy(results, task, metric)
    base_metric = None if name is None else name.split(" (", 1)[0]
    samples_out = []
    for sub, samples in (results.get("samples") or {}).items():
        for s in samples:
            tc = (s.get("token_counts") or [None])[0] or {}
            samples_out.append({
                "task": sub,
                "doc_id": s.get("doc_id"),
                "target": s.get("target"),
                "response": (s.get("filtered_resps") or [None])[0],
                "density": tc.get("psa_density"),
                "engaged": tc.get("psa_engaged"),
                "prefill_s": tc.get("prefill_s"),
                "vision_s": tc.get("vision_s"),
                "prompt_tokens": tc.get("input_tokens"),
                "score": s.get(base_metric) if base_metric and _numeric(s.get(base_metric)) else None,
            })
    density = _mean([s["density"] for s in samples_out])
    row = {
        "task": task,
        "preset": preset,
        "family": family_of(preset),
        "accuracy": acc,
        "metric": name,
        "density": density,
        "sparsity": None if density is None else 1.0 - density,
        "prefill_s": _mean([s["prefill_s"] for s in samples_out]),
        "vision_s": _mean([s["vision_s"] for s in samples_out]),
        "prompt_tokens": _mean([s["prompt_tokens"] for s in samples_out]),
        "samples": len(samples_out),
        "per_sample": samples_out,
    }
    row["accuracy_lo"], row["accuracy_hi"] = accuracy_interval(row)
    return row


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _fmt(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float):
        return round(v, digits)
    return "" if v is None else v


def write_tables(rows: List[Dict[str, Any]], out: Path, conditions: str) -> Tuple[Path, Path]:
    """``sweep.csv`` and ``sweep.md`` with ``TABLE_COLUMNS``."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in TABLE_COLUMNS})
    lines = ["# PSA accuracy against measured sparsity", "", conditions, "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(_fmt(r.get(c))) for c in TABLE_COLUMNS) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_figure(rows: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy against measured sparsity: a panel per task, a line per family, dense as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    styles = {"pyramid": ("tab:blue", "o", "pyramid (PSA)"), "binary": ("tab:orange", "s", "binary block-sparse"),
              "config": ("tab:green", "P", "JSON config"), "dense": ("black", "*", "dense")}
    for ax, task in zip(axes[0], tasks):
        for fam, (color, marker, label) in styles.items():
            pts = sorted(
                ((r["sparsity"], r["accuracy"], r["preset"]) for r in rows
                 if r["task"] == task and r["family"] == fam and r["accuracy"] is not None
                 and r["sparsity"] is not None),
            )
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            by_name = {r["preset"]: r for r in rows if r["task"] == task}
            los = [by_name[n].get("accuracy_lo") for n in names]
            his = [by_name[n].get("accuracy_hi") for n in names]
            yerr = None
            if all(v is not None for v in los + his):
                yerr = [[y - v for y, v in zip(ys, los)], [v - y for y, v in zip(ys, his)]]
            if fam == "dense":
                ax.errorbar(xs, ys, yerr=yerr, color=color, marker=marker, markersize=14, linestyle="none",
                            capsize=4, zorder=3, label=label)
            else:
                ax.errorbar(xs, ys, yerr=yerr, color=color, marker=marker, capsize=3, label=label)
            for x, y, n in pts:
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("measured sparsity (1 - FLOP-equivalent density)")
        ax.set_ylabel("accuracy (95% interval)")
        ax.set_xlim(-0.05, 1.0)
        accs = [r["accuracy"] for r in rows if r["task"] == task and r["accuracy"] is not None]
        if accs and all(0.0 <= a <= 1.0 for a in accs):
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def _task_manager(include: List[str], tasks: List[str]) -> Any:
    from lmms_eval.tasks import TaskManager

    if include:
        tm = TaskManager(include_path=include, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    logger.info("indexing lmms-eval's built-in tasks (about 10 s)")
    tm = TaskManager(include_path=include or None)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise _cli_error(f"unknown lmms-eval task(s) {', '.join(missing)}; see `python -m lmms_eval --tasks list`")
    return tm


def _env() -> Dict[str, str]:
    from ..bench.common import environment

    env = environment()
    try:
        from importlib.metadata import version

        env["lmms_eval"] = version("lmms_eval")
    except Exception:  # pragma: no cover
        env["lmms_eval"] = "unknown"
    return env


def main(args: argparse.Namespace) -> int:
    """``psa-vlm eval-sweep``: see the module docstring."""
    import torch

    from ..inference import CheckpointError, checkpoint_family, resolve_model_dir

    tasks = _split(args.tasks)
    presets = _split(args.presets)
    if not tasks:
        raise _cli_error("--tasks is empty")
    if not presets:
        raise _cli_error("--presets is empty")
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        raise _cli_error(f"unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}")
    from ..config import PSAConfig

    json_configs: Dict[str, Path] = {}
    for path in args.psa_config:
        try:
            PSAConfig.load(path)
        except (OSError, ValueError) as exc:
            raise _cli_error(str(exc)) from None
        label = Path(path).stem
        if label in presets or label in json_configs:
            raise _cli_error(f"--psa-config {path}: the name {label!r} is already used; rename the file")
        json_configs[label] = Path(path)
    presets = presets + list(json_configs)
    limit = _limit(args.limit)
    try:
        model_dir, tiny_info = resolve_model_dir(args.model)
    except CheckpointError as exc:
        raise _cli_error(str(exc)) from None
    family = checkpoint_family(model_dir)
    lmms_model = LMMS_MODEL_FOR_FAMILY.get(args.lmms_model, args.lmms_model) or LMMS_MODEL_FOR_FAMILY[family]
    if lmms_model not in MODEL_IDS:
        raise _cli_error(f"--lmms-model {args.lmms_model!r} is none of {', '.join(MODEL_IDS)} "
                         f"(or the families {', '.join(LMMS_MODEL_FOR_FAMILY)})")
    if LMMS_MODEL_FOR_FAMILY[family] != lmms_model:
        raise _cli_error(f"--lmms-model {lmms_model} does not serve {family} checkpoints ({model_dir}); "
                         f"use {LMMS_MODEL_FOR_FAMILY[family]}")
    chat_class, simple_class = MODEL_IDS[lmms_model]
    class_name = simple_class if (args.force_simple or chat_class is None) else chat_class
    tiny = tiny_info is not None
    untrained = tiny and not tiny_info.get("trained", False)
    model_args = _parse_model_args(args.model_args)
    if "preset" in model_args:
        raise _cli_error("give presets with --presets, not in --model-args")
    if model_args.get("pretrained") not in (None, str(model_dir)):
        raise _cli_error("give the checkpoint with --model, not pretrained= in --model-args")
    model_args.pop("pretrained", None)
    if tiny:
        model_args = {**TINY_MODEL_ARGS, **model_args}
    if not torch.cuda.is_available():
        model_args.setdefault("device", "cpu")
        model_args.setdefault("device_map", "cpu")
        model_args.setdefault("dtype", "float32")  # bf16 matmuls are very slow on CPUs
    psa_overrides = {k: v for k, v in model_args.items() if k in PSA_MODEL_ARGS}
    base_args = {k: v for k, v in model_args.items() if k not in PSA_MODEL_ARGS}
    # validate the PSA overrides for every preset before anything slow
    from ..inference import psa_config_from_options

    from ..api import check_config_for_backend

    device = model_args.get("device") if isinstance(model_args.get("device"), str) else None
    for p in presets:
        if p in json_configs:
            continue
        probe = {k: v for k, v in psa_overrides.items() if k not in ("backend", "psa_layers")}
        try:
            cfg = psa_config_from_options(p, **probe)
            if p != "dense":  # the dense control runs unpatched
                check_config_for_backend(cfg, str(psa_overrides.get("backend", "auto")), device=device)
        except (TypeError, ValueError) as exc:
            raise _cli_error(f"preset {p} with --model-args: {exc}") from None

    out = args.out if args.out is not None else Path("psa_sweep") / Path(model_dir).name
    include = [str(p) for p in (args.include_path or [])]
    if not include and default_include_path() is not None:
        include = [str(default_include_path())]
    signature = {"model": str(model_dir), "weights": weights_fingerprint(model_dir),
                 "model_args": {k: str(v) for k, v in sorted(model_args.items())},
                 "limit": limit, "format": RUN_FORMAT}
    if class_name != (chat_class or simple_class):  # the lmms-eval class follows from the checkpoint otherwise
        signature["lmms_class"] = class_name
    if json_configs:
        signature["psa_configs"] = {k: PSAConfig.load(v).to_dict() for k, v in sorted(json_configs.items())}

    pairs = [(t, p) for p in presets for t in tasks]
    todo = []
    for t, p in pairs:
        f = run_file(out, t, p)
        if f.is_file() and not args.redo:
            try:
                saved = json.loads(f.read_text())
            except ValueError:
                saved = {}
            if saved.get("signature") == json.loads(json.dumps(signature)):
                continue
            logger.warning("%s was made with other settings; running it again", f)
        todo.append((t, p))
    logger.info("eval-sweep: %d (task, preset) runs, %d already done, %d to run; results in %s",
                len(pairs), len(pairs) - len(todo), len(todo), out)
    if untrained:
        logger.warning("the model is the tiny UNTRAINED one (random weights): accuracies are chance level")

    env = _env()
    if todo:
        from lmms_eval.evaluator import simple_evaluate

        from . import lmms_model as lmms_models

        tm = _task_manager(include, tasks)
        logger.info("loading %s (%s) from %s", lmms_model, class_name, model_dir)
        try:
            lm = getattr(lmms_models, class_name)(pretrained=str(model_dir), preset=todo[0][1], **model_args)
        except ValueError as exc:  # e.g. an attn_implementation this machine lacks
            raise _cli_error(str(exc)) from None
        lm.keep_model_loaded = True
        t_start = time.perf_counter()
        done_pairs = 0
        for i, (task, preset) in enumerate(todo, 1):
            eta = ""
            if done_pairs:
                per = (time.perf_counter() - t_start) / done_pairs
                eta = f", about {per * (len(todo) - i + 1) / 60:.1f} min left"
            logger.info("[%d/%d] task %s, preset %s%s", i, len(todo), task, preset, eta)
            if preset in json_configs:
                runtime = {k: v for k, v in psa_overrides.items() if k in ("backend", "psa_layers")}
                lm.set_psa(psa_config=str(json_configs[preset]), **runtime)
            else:
                lm.set_psa(preset, **psa_overrides)
            t0 = time.perf_counter()
            results = simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                      bootstrap_iters=args.bootstrap_iters, log_samples=True,
                                      batch_size=base_args.get("batch_size"))
            if results is None:  # non-zero ranks of a distributed run
                continue
            row = summarize_run(results, task, preset, args.metric)
            if preset in json_configs:
                row["family"] = "config"
            row.update(limit=limit, wall_s=time.perf_counter() - t0, signature=signature,
                       psa_config=str(lm.psa_config), env=env,
                       lmms_results={k: v for k, v in results.get("results", {}).items()})
            _write_json(run_file(out, task, preset), row)
            done_pairs += 1
            acc = row["accuracy"]
            logger.info("[%d/%d] %s / %s: %s %s, sparsity %s, prefill %s s (%.0f s)", i, len(todo), task, preset,
                        row["metric"], "n/a" if acc is None else f"{acc:.4f}",
                        "n/a" if row["sparsity"] is None else f"{row['sparsity']:.3f}",
                        "n/a" if row["prefill_s"] is None else f"{row['prefill_s']:.4f}", row["wall_s"])
        lm.keep_model_loaded = False
    if int(os.environ.get("RANK", "0")) != 0:  # under a distributed launcher only rank 0 reports
        return 0

    rows = []
    for t, p in pairs:
        f = run_file(out, t, p)
        if f.is_file():
            row = json.loads(f.read_text())
            if "accuracy_lo" not in row:  # saved by an earlier version
                row["accuracy_lo"], row["accuracy_hi"] = accuracy_interval(row)
            rows.append(row)
    device = model_args.get("device", "cuda")
    margs = ",".join(f"{k}={v}" for k, v in sorted(model_args.items()))
    conditions = (
        f"Model `{model_dir}`{' (tiny, untrained: chance-level accuracy)' if untrained else ''}; lmms-eval "
        f"{env['lmms_eval']} model `{lmms_model}` ({class_name}), model args `{margs}`; "
        f"limit {limit if limit is not None else 'none'}; device {device} ({env['gpu']}); torch {env['torch']}, "
        f"transformers {env['transformers']}, commit {env['commit']}. Sparsity and prefill time are per-sample "
        "means measured in the prefill (sparsity = 1 - FLOP-equivalent density, 0 for dense); accuracy_lo and "
        "accuracy_hi bound its 95% interval (Wilson for 0/1 scores, else a percentile bootstrap)."
    )
    csv_path, md_path = write_tables(rows, out, conditions)
    png = write_figure(rows, out / "sweep.png", f"{Path(model_dir).name}: accuracy vs measured sparsity")
    print(f"eval-sweep: {len(rows)} runs in {out}")
    w = max([len(r["task"]) for r in rows] + [4])
    print(f"{'task':<{w}}  {'preset':<11} {'family':<8} {'accuracy':>9} {'95% CI':>15} {'sparsity':>8} {'prefill s':>9} {'n':>4}")
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        ci = "" if r.get("accuracy_lo") is None else f"[{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}]"
        sp = "n/a" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        pf = "n/a" if r["prefill_s"] is None else f"{r['prefill_s']:.4f}"
        print(f"{r['task']:<{w}}  {r['preset']:<11} {r['family']:<8} {acc:>9} {ci:>15} {sp:>8} {pf:>9} {r['samples']:>4}")
    print(f"table: {csv_path}, {md_path}\nfigure: {png}")
    return 0
