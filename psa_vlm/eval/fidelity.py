"""``psa-vlm eval-fidelity``: how far each PSA setting moves a model from dense attention, with intervals.

For a checkpoint (the shipped tiny model by default) and a set of prompts (the offline task
``psa_synth_long`` by default, a folder of videos with one question each, or an lmms-eval task), every prompt
is answered once with the unpatched model (the dense reference) and once per PSA setting (named presets and
JSON configs, ``PSAConfig.load``). Per setting it reports:

- **agreement** of the greedy answer with the dense answer (the answer letter where the prompt has labels,
  else the whole answer text) and **accuracy** where labels exist, each with a 95% Wilson interval;
- **KL divergence** ``KL(dense || PSA)`` of the next-token distribution at the answer position (the last
  prompt position, where the answer's first token is predicted), mean and 95% percentile-bootstrap interval;
- per layer, the **relative error of the attention output** against dense attention on the same inputs
  (``||O_psa - O_dense||_F / ||O_dense||_F`` over the whole prefill, captured inside the patch with
  ``psa_vlm.patches.observe``: the dense output is the model's own attention function on the very query,
  key and value PSA saw, so it measures each layer's own error on the model's own activations), and the
  layer's FLOP-equivalent density;
- mean density and language-model prefill time.

Paired comparisons (``quota-d`` against ``binary-d``, and any ``--pair A:B``) give the paired mean
difference of KL with its bootstrap interval and McNemar's exact test for accuracy and agreement.

Outputs in ``--out``: ``fidelity.csv`` (one row per setting), ``layers.csv`` (per setting and layer),
``pairs.csv``, ``fidelity.md`` (the three tables with their conditions), ``fidelity.png`` (KL and accuracy
against density, one line per family, with intervals) and ``runs/<setting>.jsonl`` (per-prompt records;
a setting whose file matches the model, prompts and config is not run again, so a study can grow).

The reusable parts (``FidelityRunner``, ``load_prompts``) also serve ``psa-vlm calibrate``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import PRESETS, PSAConfig
from .stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_ci, wilson_interval

__all__ = [
    "FidelityPrompt",
    "PromptResult",
    "FidelityRunner",
    "load_prompts",
    "kl_divergence",
    "relative_error",
    "summarize",
    "paired_comparisons",
    "family_of_config",
    "add_arguments",
    "main",
    "DEFAULT_PRESETS",
]

logger = logging.getLogger(__name__)

DEFAULT_PRESETS = "dense,paper,binary,quota-0.1,quota-0.2,quota-0.3,binary-0.1,binary-0.2,binary-0.3"
DEFAULT_TASK = "psa_synth_long"
#: Block size and ``min_seq_len`` used for named presets on the tiny model (its prompts are 2-4k tokens).
TINY_BLOCK = 64
TINY_MIN_SEQ_LEN = 256
#: Frame pixel range used on the tiny model (224 x 168 frames: 48 tokens per temporal patch).
TINY_MIN_PIXELS = 4 * 28 * 28
TINY_MAX_PIXELS = 224 * 168
_LETTER = re.compile(r"\b([A-D])\b")


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class FidelityPrompt:
    """One question about one video.

    Attributes:
        id: Unique id (used to pair results across settings).
        video: Video file path.
        prompt: The full text given to the model after the video.
        answer: The right choice letter (A-D) where known, else ``None``.
        kind: Question kind where known (``needle_color``, ...), else ``None``.
        nframes: Frames to sample (``None``: ``FidelityRunner.max_frames``).
    """

    id: str
    video: str
    prompt: str
    answer: Optional[str] = None
    kind: Optional[str] = None
    nframes: Optional[int] = None


def _offline_prompts(task: str, limit: Optional[int]) -> List[FidelityPrompt]:
    """The first ``limit`` questions of an offline synthetic task (``psa_vlm.video.synth.OFFLINE_TASKS``)."""
    from ..video.synth import OFFLINE_TASKS, ensure_video, load_dataset, make_dataset
    from .sweep import default_include_path

    if task not in OFFLINE_TASKS:
        raise ValueError(f"unknown offline task {task!r}; choose one of {', '.join(OFFLINE_TASKS)}")
    tasks_dir = default_include_path()
    if tasks_dir is not None:  # a source checkout: the very data the lmms-eval task reads
        import importlib.util

        spec = importlib.util.spec_from_file_location("psa_synth_utils", tasks_dir / "psa_synth" / "utils.py")
        utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(utils)  # type: ignore[union-attr]
        jsonl = utils.ensure_data(task)
    else:
        root = Path.home() / ".cache" / "psa_vlm" / "synth" / task
        jsonl = make_dataset(root, name="test", render=False, **OFFLINE_TASKS[task])
    items = load_dataset(jsonl)[: limit if limit is not None else None]
    out = []
    for item in items:
        ensure_video(item)
        out.append(FidelityPrompt(item.id, item.video, item.prompt(), item.answer, item.kind, item.frames))
    return out


_VIDEO_EXT = (".mp4", ".mkv", ".avi", ".mov", ".webm")


def _folder_prompts(folder: Path, limit: Optional[int]) -> List[FidelityPrompt]:
    """A folder of the user's videos: ``questions.jsonl`` lines ``{"video", "question"[, "answer"]}``, or one
    ``<video stem>.txt`` holding the question beside each video."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--videos {str(folder)!r} is not a folder")
    out: List[FidelityPrompt] = []
    qfile = folder / "questions.jsonl"
    if qfile.is_file():
        for n, line in enumerate(qfile.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                video, question = rec["video"], rec["question"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{qfile}:{n}: expected {{\"video\": ..., \"question\": ...}}, got {line[:80]!r}") from None
            answer = rec.get("answer")
            if answer is not None and str(answer) not in "ABCD":
                raise ValueError(f"{qfile}:{n}: answer must be a letter A-D (or absent), got {answer!r}")
            out.append(FidelityPrompt(str(rec.get("id", Path(video).stem)), str(folder / video), str(question),
                                      None if answer is None else str(answer)))
    else:
        for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in _VIDEO_EXT):
            txt = video.with_suffix(".txt")
            if txt.is_file() and txt.read_text().strip():
                out.append(FidelityPrompt(video.stem, str(video), txt.read_text().strip()))
    if not out:
        raise ValueError(f"no prompts in {str(folder)!r}: give questions.jsonl or a <video>.txt question per video")
    missing = [p.video for p in out if not Path(p.video).is_file()]
    if missing:
        raise ValueError(f"video file(s) not found: {', '.join(missing[:3])}")
    return out[: limit if limit is not None else None]


def _lmms_prompts(task: str, include_path: Sequence[str], limit: Optional[int]) -> List[FidelityPrompt]:
    """Documents of an lmms-eval task: ``doc_to_visual`` (the first video path), ``doc_to_text`` (with the task's
    prompt kwargs) and ``doc_to_target`` (kept as the label when it is a letter A-D)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=list(include_path) or None, include_defaults=not include_path)
    if task not in tm.all_tasks:
        tm = TaskManager(include_path=list(include_path) or None)
    if task not in tm.all_tasks:
        raise ValueError(f"unknown lmms-eval task {task!r}")
    obj = get_task_dict([task], tm)[task]
    out: List[FidelityPrompt] = []
    for doc_id, doc in enumerate(obj.eval_docs):
        if limit is not None and len(out) >= limit:
            break
        visuals = obj.doc_to_visual(doc)
        videos = [v for v in (visuals or []) if isinstance(v, str)]
        if not videos:
            raise ValueError(f"lmms-eval task {task!r} document {doc_id} has no video path (doc_to_visual gave {visuals!r})")
        target = obj.doc_to_target(doc)
        label = str(target).strip() if isinstance(target, str) and str(target).strip() in ("A", "B", "C", "D") else None
        out.append(FidelityPrompt(f"{task}-{doc_id}", videos[0], str(obj.doc_to_text(doc)), label,
                                  doc.get("kind") if isinstance(doc, dict) else None))
    return out


def load_prompts(
    *,
    task: Optional[str] = None,
    videos: Optional[Path] = None,
    lmms_task: Optional[str] = None,
    include_path: Sequence[str] = (),
    limit: Optional[int] = None,
) -> List[FidelityPrompt]:
    """Prompts from one source: an offline task (default ``psa_synth_long``), a folder of videos, or an
    lmms-eval task; the first ``limit`` of them.

    Raises:
        ValueError: More than one source, an unknown task, or an empty / malformed folder.
    """
    if sum(x is not None for x in (task, videos, lmms_task)) > 1:
        raise ValueError("give one prompt source: --task, --videos or --lmms-task")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if videos is not None:
        return _folder_prompts(videos, limit)
    if lmms_task is not None:
        return _lmms_prompts(lmms_task, include_path, limit)
    return _offline_prompts(task or DEFAULT_TASK, limit)


# ---------------------------------------------------------------------------------------------- measures
def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """``KL(p || q)`` in nats between the softmax distributions of two logit vectors ``[V]`` (float64)."""
    lp = torch.log_softmax(logits_p.double().reshape(-1), dim=-1)
    lq = torch.log_softmax(logits_q.double().reshape(-1), dim=-1)
    kl = float(torch.sum(lp.exp() * (lp - lq)))
    return max(kl, 0.0)  # rounding can give -1e-17


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64 (0 when both are zero)."""
    a, e = approx.double(), exact.double()
    den = float(torch.linalg.vector_norm(e))
    num = float(torch.linalg.vector_norm(a - e))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _letter(text: str) -> str:
    m = _LETTER.search(text.strip())
    return m.group(1) if m else ""


@dataclass
class PromptResult:
    """One prompt under one setting (``runs/<setting>.jsonl`` holds one per line)."""

    setting: str
    prompt_id: str
    answer_text: str
    letter: str
    dense_text: str
    dense_letter: str
    agree: bool
    correct: Optional[bool]
    kl: float
    layer_err: Dict[int, float] = field(default_factory=dict)
    layer_density: Dict[int, float] = field(default_factory=dict)
    density: float = 1.0
    prefill_s: float = float("nan")
    prompt_tokens: int = 0
    video_tokens: int = 0
    label: Optional[str] = None
    kind: Optional[str] = None


@dataclass
class _Reference:
    inputs: Any  # the processor's inputs, or None once the cache budget is spent (rebuilt on use)
    logits: torch.Tensor  # [V] float32, next-token logits at the last prompt position
    text: str
    video_tokens: int
    prompt_tokens: int


def _nbytes(inputs: Any) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


class FidelityRunner:
    """Runs prompts through one model, dense (unpatched) and under PSA settings, and measures the difference.

    Args:
        model: A Qwen2.5-VL model (``load_qwen25vl``), unpatched.
        processor: Its processor.
        backend: PSA backend (``auto``, ``triton``, ``reference``).
        max_frames: Frames sampled per video when the prompt does not say (even sampling).
        min_pixels, max_pixels: Per-frame pixel range given to qwen-vl-utils.
        max_new_tokens: Greedy answer length.
        cache_bytes: Processor inputs (pixels) kept in host memory between settings, at most this many bytes
            in all (default 2 GiB); prompts beyond it decode their video again for each setting.
    """

    def __init__(self, model: Any, processor: Any, *, backend: str = "auto", max_frames: int = 128,
                 min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS, max_new_tokens: int = 8,
                 cache_bytes: int = 2 << 30) -> None:
        self.model = model
        self.processor = processor
        self.backend = backend
        self.max_frames = max_frames
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_new_tokens = max_new_tokens
        self.n_layers = int(model.config.get_text_config().num_hidden_layers)
        self.cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._refs: Dict[str, _Reference] = {}

    # ------------------------------------------------------------------ inputs and dense reference
    def inputs(self, prompt: FidelityPrompt) -> Any:
        """The processor's inputs for a prompt (frames through qwen-vl-utils with their metadata)."""
        from ..inference import frame_count, prepare_inputs, probe_video, video_messages

        info = probe_video(prompt.video)
        n = frame_count(info, max_frames=min(prompt.nframes or self.max_frames, self.max_frames))
        msgs = video_messages(info.path, prompt.prompt, nframes=n, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels)
        return prepare_inputs(self.processor, msgs)

    def reference(self, prompt: FidelityPrompt) -> _Reference:
        """Dense answer and answer-position logits of a prompt (unpatched model; cached per prompt id)."""
        ref = self._refs.get(prompt.id)
        if ref is None:
            from ..patches import is_patched, unpatch_qwen25vl

            if is_patched(self.model):
                unpatch_qwen25vl(self.model)
            inputs = self.inputs(prompt)
            text, logits, _ = self._generate(inputs)
            vid = getattr(self.model.config, "video_token_id", None)
            n_video = int((inputs["input_ids"] == vid).sum()) if vid is not None else 0
            size = _nbytes(inputs)
            keep = self._cached_bytes + size <= self.cache_bytes
            self._cached_bytes += size if keep else 0
            ref = self._refs[prompt.id] = _Reference(inputs if keep else None, logits, text, n_video,
                                                     int(inputs["input_ids"].shape[1]))
        return ref

    def inputs_of(self, prompt: FidelityPrompt) -> Any:
        """The prompt's processor inputs: cached with its reference, or built again."""
        ref = self.reference(prompt)
        return ref.inputs if ref.inputs is not None else self.inputs(prompt)

    def forget(self, prompt_id: Optional[str] = None) -> None:
        """Drop cached inputs and references (all, or one prompt's)."""
        if prompt_id is None:
            self._refs.clear()
            self._cached_bytes = 0
        else:
            ref = self._refs.pop(prompt_id, None)
            if ref is not None and ref.inputs is not None:
                self._cached_bytes -= _nbytes(ref.inputs)

    def _generate(self, inputs: Any) -> Tuple[str, torch.Tensor, float]:
        from ..inference import PrefillTimer

        device = next(self.model.parameters()).device
        inputs = inputs.to(device)
        with PrefillTimer(self.model) as timer, torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      output_logits=True, return_dict_in_generate=True)
        prompt_len = int(inputs["input_ids"].shape[1])
        text = self.processor.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)[0].strip()
        logits = out.logits[0][0].float().cpu()
        return text, logits, float(timer.prefill_s if timer.prefill_s is not None else float("nan"))

    # ------------------------------------------------------------------ one setting
    def apply(self, config: Optional[PSAConfig], layers: Optional[Sequence[int]] = None) -> None:
        """Patch the model with ``config`` (``None``: unpatch, the dense reference)."""
        from ..patches import is_patched, patch_qwen25vl, unpatch_qwen25vl

        if config is None:
            if is_patched(self.model):
                unpatch_qwen25vl(self.model)
        else:
            patch_qwen25vl(self.model, config, layers=layers, backend=self.backend)

    def run(self, prompt: FidelityPrompt, config: Optional[PSAConfig], setting: str,
            layers: Optional[Sequence[int]] = None) -> PromptResult:
        """Answer ``prompt`` under ``config`` (``None``: unpatched dense) and compare with the dense reference.

        Returns:
            A ``PromptResult`` (KL, agreement, correctness, per-layer attention error and density, prefill time).
        """
        from ..patches import observe, psa_stats

        ref = self.reference(prompt)
        inputs = self.inputs_of(prompt)
        self.apply(config, layers)
        errs: Dict[int, float] = {}

        def capture(layer_idx: int, psa_out: torch.Tensor, dense_out: Callable[[], torch.Tensor], plan: Any) -> None:
            errs[int(layer_idx)] = relative_error(psa_out, dense_out())

        if config is None:
            text, logits, prefill = self._generate(inputs)
            per_layer: Dict[int, float] = {}
        else:
            with observe(self.model, capture):
                text, logits, prefill = self._generate(inputs)
            stats = psa_stats(self.model)
            per_layer = {int(i): float(v["density"]) for i, v in stats["layers"].items()}
        dens = [per_layer.get(i, 1.0) for i in range(self.n_layers)]  # a layer that ran dense counts 1
        letter, dense_letter = _letter(text), _letter(ref.text)
        labelled = prompt.answer is not None
        agree = (letter == dense_letter) if labelled else (text == ref.text)
        return PromptResult(
            setting=setting, prompt_id=prompt.id, answer_text=text, letter=letter, dense_text=ref.text,
            dense_letter=dense_letter, agree=bool(agree), correct=(letter == prompt.answer) if labelled else None,
            kl=kl_divergence(ref.logits, logits), layer_err=errs, layer_density=per_layer,
            density=float(np.mean(dens)), prefill_s=prefill, prompt_tokens=ref.prompt_tokens,
            video_tokens=ref.video_tokens, label=prompt.answer, kind=prompt.kind,
        )


# ---------------------------------------------------------------------------------------------- summaries
def family_of_config(name: str, config: Optional[PSAConfig]) -> str:
    """``dense``, ``per-layer`` (a config with layer overrides), ``pyramid`` / ``binary`` (quota mode: a
    target density) or ``pyramid-threshold`` / ``binary-threshold`` (the threshold rule)."""
    if config is None or (config.dense and not config.layer_overrides):
        return "dense"
    if config.layer_overrides:
        return "per-layer"
    kind = "binary" if not config.pool_factors else "pyramid"
    return kind if config.mode == "quota" else f"{kind}-threshold"


def summarize(results: List[PromptResult], family: str, *, n_resamples: int = 2000) -> Dict[str, Any]:
    """One table row from one setting's per-prompt results (intervals at 95%)."""
    n = len(results)
    setting = results[0].setting
    kl = [r.kl for r in results]
    kl_lo, kl_hi = bootstrap_ci(kl, n_resamples=n_resamples)
    agree = sum(r.agree for r in results)
    ag_lo, ag_hi = wilson_interval(agree, n)
    lab = [r for r in results if r.correct is not None]
    acc = acc_lo = acc_hi = None
    if lab:
        k = sum(bool(r.correct) for r in lab)
        acc = k / len(lab)
        acc_lo, acc_hi = wilson_interval(k, len(lab))
    errs = [float(np.mean(list(r.layer_err.values()))) for r in results if r.layer_err]
    return {
        "setting": setting,
        "family": family,
        "n": n,
        "density": float(np.mean([r.density for r in results])),
        "kl": float(np.mean(kl)),
        "kl_lo": kl_lo,
        "kl_hi": kl_hi,
        "kl_median": float(np.median(kl)),
        "agreement": agree / n,
        "agreement_lo": ag_lo,
        "agreement_hi": ag_hi,
        "accuracy": acc,
        "accuracy_lo": acc_lo,
        "accuracy_hi": acc_hi,
        "labelled": len(lab),
        "attn_err": float(np.mean(errs)) if errs else None,
        "prefill_s": float(np.nanmean([r.prefill_s for r in results])) if n else None,
        "prompt_tokens": float(np.mean([r.prompt_tokens for r in results])),
        "video_tokens": float(np.mean([r.video_tokens for r in results])),
    }


def layer_rows(results: List[PromptResult], n_layers: int, *, n_resamples: int = 2000) -> List[Dict[str, Any]]:
    """Per-layer mean attention-output error (with a bootstrap interval) and density of one setting."""
    rows = []
    for i in range(n_layers):
        errs = [r.layer_err[i] for r in results if i in r.layer_err]
        dens = [r.layer_density.get(i, 1.0) for r in results]
        lo = hi = None
        if errs:
            lo, hi = bootstrap_ci(errs, n_resamples=n_resamples)
        rows.append({"setting": results[0].setting, "layer": i, "density": float(np.mean(dens)),
                     "attn_err": float(np.mean(errs)) if errs else None, "attn_err_lo": lo, "attn_err_hi": hi,
                     "n": len(errs)})
    return rows


def default_pairs(settings: Sequence[str]) -> List[Tuple[str, str]]:
    """``(quota-d, binary-d)`` for every ``d`` present in both, in the order given."""
    out = []
    for s in settings:
        if s.startswith("quota-") and f"binary-{s[len('quota-'):]}" in settings:
            out.append((s, f"binary-{s[len('quota-'):]}"))
    return out


def paired_comparisons(by_setting: Dict[str, List[PromptResult]], pairs: Sequence[Tuple[str, str]],
                       *, n_resamples: int = 2000) -> List[Dict[str, Any]]:
    """Paired differences ``A - B`` over the prompts both settings answered (matched by prompt id).

    KL: mean paired difference with a percentile-bootstrap interval. Accuracy and agreement: the difference,
    the discordant counts and McNemar's exact p-value.
    """
    rows = []
    for a, b in pairs:
        ra = {r.prompt_id: r for r in by_setting.get(a, [])}
        rb = {r.prompt_id: r for r in by_setting.get(b, [])}
        ids = [i for i in ra if i in rb]
        if not ids:
            continue
        xa, xb = [ra[i] for i in ids], [rb[i] for i in ids]
        d, lo, hi = paired_bootstrap_ci([r.kl for r in xa], [r.kl for r in xb], n_resamples=n_resamples)
        row: Dict[str, Any] = {
            "a": a, "b": b, "n": len(ids),
            "density_a": float(np.mean([r.density for r in xa])), "density_b": float(np.mean([r.density for r in xb])),
            "kl_a": float(np.mean([r.kl for r in xa])), "kl_b": float(np.mean([r.kl for r in xb])),
            "kl_diff": d, "kl_diff_lo": lo, "kl_diff_hi": hi,
            "kl_a_lower": sum(x.kl < y.kl for x, y in zip(xa, xb)),
        }
        ag_a, ag_b, p = mcnemar_exact([r.agree for r in xa], [r.agree for r in xb])
        row.update(agreement_a=float(np.mean([r.agree for r in xa])), agreement_b=float(np.mean([r.agree for r in xb])),
                   agree_only_a=ag_a, agree_only_b=ag_b, agree_p=p)
        lab = [(x, y) for x, y in zip(xa, xb) if x.correct is not None and y.correct is not None]
        if lab:
            ca, cb, p = mcnemar_exact([x.correct for x, _ in lab], [y.correct for _, y in lab])
            row.update(accuracy_a=float(np.mean([bool(x.correct) for x, _ in lab])),
                       accuracy_b=float(np.mean([bool(y.correct) for _, y in lab])),
                       correct_only_a=ca, correct_only_b=cb, accuracy_p=p)
        errs_a = [np.mean(list(r.layer_err.values())) for r in xa if r.layer_err]
        errs_b = [np.mean(list(r.layer_err.values())) for r in xb if r.layer_err]
        if errs_a and len(errs_a) == len(errs_b):
            d, lo, hi = paired_bootstrap_ci(errs_a, errs_b, n_resamples=n_resamples)
            row.update(attn_err_a=float(np.mean(errs_a)), attn_err_b=float(np.mean(errs_b)),
                       attn_err_diff=d, attn_err_diff_lo=lo, attn_err_diff_hi=hi)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- outputs
SUMMARY_COLUMNS = ["setting", "family", "n", "density", "kl", "kl_lo", "kl_hi", "kl_median", "agreement",
                   "agreement_lo", "agreement_hi", "accuracy", "accuracy_lo", "accuracy_hi", "attn_err",
                   "prefill_s", "prompt_tokens", "video_tokens"]
LAYER_COLUMNS = ["setting", "layer", "density", "attn_err", "attn_err_lo", "attn_err_hi", "n"]
PAIR_COLUMNS = ["a", "b", "n", "density_a", "density_b", "kl_a", "kl_b", "kl_diff", "kl_diff_lo", "kl_diff_hi",
                "kl_a_lower", "attn_err_a", "attn_err_b", "attn_err_diff", "attn_err_diff_lo", "attn_err_diff_hi",
                "accuracy_a", "accuracy_b", "correct_only_a", "correct_only_b", "accuracy_p", "agreement_a",
                "agreement_b", "agree_only_a", "agree_only_b", "agree_p"]


def _fmt(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.2e}"
        return round(v, digits)
    return "" if v is None else v


def _write_csv(path: Path, rows: List[Dict[str, Any]], columns: List[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in columns})


def _ci(v: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    f = (lambda x: f"{x:.{digits}g}") if abs(v) < 0.01 and v != 0 else (lambda x: f"{x:.{digits}f}")
    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def write_markdown(path: Path, summary: List[Dict[str, Any]], layers: List[Dict[str, Any]],
                   pairs: List[Dict[str, Any]], conditions: str) -> None:
    """``fidelity.md``: settings, per-layer and paired tables with 95% intervals."""
    lines = ["# PSA fidelity against dense attention", "", conditions, "",
             "| setting | family | n | density | KL(dense‖PSA) mean [95% CI] | KL median | agreement [95% CI] | "
             "accuracy [95% CI] | attn. error | prefill s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        err = "" if r["attn_err"] is None else f"{r['attn_err']:.3f}"
        prefill = "" if r["prefill_s"] is None else f"{r['prefill_s']:.3f}"
        lines.append(
            f"| {r['setting']} | {r['family']} | {r['n']} | {r['density']:.3f} | {_ci(r['kl'], r['kl_lo'], r['kl_hi'])} | "
            f"{r['kl_median']:.3g} | "
            f"{_ci(r['agreement'], r['agreement_lo'], r['agreement_hi'])} | "
            f"{_ci(r['accuracy'], r['accuracy_lo'], r['accuracy_hi'])} | {err} | {prefill} |")
    lines += ["", "Per layer: relative error of the attention output against dense attention on the same inputs "
              "(mean over prompts [95% bootstrap CI]) and density.", ""]
    settings = list(dict.fromkeys(r["setting"] for r in layers))
    n_layers = max((r["layer"] for r in layers), default=-1) + 1
    lines += ["| setting | " + " | ".join(f"layer {i} error | layer {i} density" for i in range(n_layers)) + " |",
              "|---|" + "---|---|" * n_layers]
    for s in settings:
        cells = []
        for i in range(n_layers):
            r = next((x for x in layers if x["setting"] == s and x["layer"] == i), None)
            if r is None or r["attn_err"] is None:
                cells += ["dense", f"{1.0 if r is None else r['density']:.3f}"]
            else:
                cells += [_ci(r["attn_err"], r["attn_err_lo"], r["attn_err_hi"]), f"{r['density']:.3f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "Paired comparisons (A - B over the same prompts): KL difference with a 95% bootstrap interval; "
                  "accuracy and agreement with McNemar's exact test (discordant counts: only A / only B right).", "",
                  "| A | B | density A / B | KL A / B | KL diff [95% CI] | prompts with lower KL under A | "
                  "attn. error A / B | accuracy A / B (only A, only B; p) | agreement A / B (only A, only B; p) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            acc = ""
            if p.get("accuracy_a") is not None:
                acc = (f"{p['accuracy_a']:.3f} / {p['accuracy_b']:.3f} ({p['correct_only_a']}, {p['correct_only_b']}; "
                       f"p={p['accuracy_p']:.3g})")
            err = "" if p.get("attn_err_a") is None else f"{p['attn_err_a']:.3f} / {p['attn_err_b']:.3f}"
            lines.append(
                f"| {p['a']} | {p['b']} | {p['density_a']:.3f} / {p['density_b']:.3f} | {p['kl_a']:.3g} / {p['kl_b']:.3g} | "
                f"{_ci(p['kl_diff'], p['kl_diff_lo'], p['kl_diff_hi'])} | {p['kl_a_lower']}/{p['n']} | {err} | {acc} | "
                f"{p['agreement_a']:.3f} / {p['agreement_b']:.3f} ({p['agree_only_a']}, {p['agree_only_b']}; "
                f"p={p['agree_p']:.3g}) |")
    path.write_text("\n".join(lines) + "\n")


_STYLES = {
    "pyramid": ("tab:blue", "o", "-", "pyramid (quota)"),
    "binary": ("tab:orange", "s", "-", "binary (quota)"),
    "pyramid-threshold": ("tab:cyan", "D", "", "pyramid (threshold rule)"),
    "binary-threshold": ("tab:red", "v", "", "binary (threshold rule)"),
    "per-layer": ("tab:green", "P", "", "per-layer config"),
    "dense": ("black", "*", "", "dense"),
}


def write_figure(summary: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """KL (log scale) and accuracy (or agreement) against density, one line per family, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(r["accuracy"] is not None for r in summary)
    key = "accuracy" if has_acc else "agreement"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for fam, (color, marker, ls, label) in _STYLES.items():
        rows = sorted((r for r in summary if r["family"] == fam), key=lambda r: r["density"])
        if not rows:
            continue
        x = [r["density"] for r in rows]
        for ax, (k, lo, hi) in zip(axes, (("kl", "kl_lo", "kl_hi"), (key, f"{key}_lo", f"{key}_hi"))):
            pts = [(xx, r[k], r[lo], r[hi]) for xx, r in zip(x, rows) if r[k] is not None]
            if not pts:
                continue
            xs, ys, los, his = (np.array(v, dtype=float) for v in zip(*pts))
            if k == "kl":
                if fam == "dense":
                    continue  # KL 0 has no place on a log axis
                ys, los = np.maximum(ys, 1e-6), np.maximum(los, 1e-6)
            yerr = np.vstack([ys - los, his - ys])
            ax.errorbar(xs, ys, yerr=yerr, color=color, marker=marker, linestyle=ls or "none", capsize=3, label=label,
                        markersize=9 if fam == "dense" else 6)
            for xx, r in zip(x, rows):
                if r[k] is not None:
                    ax.annotate(r["setting"], (xx, max(r[k], 1e-6) if k == "kl" else r[k]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(dense || PSA) at the answer position (nats)")
    axes[1].set_ylabel(f"{key} (95% Wilson interval)")
    for ax in axes:
        ax.set_xlim(0.0, 1.05)
        ax.set_xlabel("FLOP-equivalent density (mean over layers and prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- settings
def _cli_error(msg: str) -> Exception:
    from ..cli import CLIError

    return CLIError(msg)


def config_label(path: Path) -> str:
    """Setting name of a JSON config: its file stem."""
    return Path(path).stem


def resolve_settings(presets: Sequence[str], config_paths: Sequence[Path], *, block_size: Optional[int],
                     min_seq_len: Optional[int]) -> List[Tuple[str, Optional[PSAConfig]]]:
    """``(name, config)`` per setting: named presets (``dense`` -> ``None``: the unpatched model) with the block
    size and ``min_seq_len`` overrides, then JSON configs as written (named by file stem)."""
    out: List[Tuple[str, Optional[PSAConfig]]] = []
    for p in presets:
        if p not in PRESETS:
            raise ValueError(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
        if p == "dense":
            out.append((p, None))
            continue
        changes: Dict[str, Any] = {}
        if block_size is not None:
            changes.update(block_q=block_size, block_k=block_size)
        if min_seq_len is not None:
            changes["min_seq_len"] = min_seq_len
        out.append((p, PSAConfig.preset(p, **changes)))
    for path in config_paths:
        name = config_label(path)
        if name in (n for n, _ in out):
            raise ValueError(f"setting name {name!r} (from {path}) is used twice; rename the file")
        out.append((name, PSAConfig.load(path)))
    return out


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, prompt-source and frame options shared by ``eval-fidelity`` and ``calibrate``."""
    parser.add_argument("--model", default=None,
                        help="local Qwen2.5-VL checkpoint directory (default: the shipped tiny model)")
    src = parser.add_argument_group("prompts (one source; default: the offline task psa_synth_long)")
    src.add_argument("--task", default=None, help="offline synthetic task: psa_synth_long or psa_synth_short")
    src.add_argument("--videos", type=Path, default=None,
                     help="folder of videos with questions.jsonl ({video, question[, answer]} per line) or a "
                          "<video>.txt question beside each video")
    src.add_argument("--lmms-task", default=None, help="an lmms-eval task name (videos from doc_to_visual)")
    src.add_argument("--include-path", action="append", default=None, help="folder of extra lmms-eval task YAMLs")
    parser.add_argument("--max-frames", type=int, default=128, help="frames sampled evenly per video (default 128)")
    parser.add_argument("--min-pixels", type=int, default=None, help=f"per-frame pixel floor (tiny default {TINY_MIN_PIXELS})")
    parser.add_argument("--max-pixels", type=int, default=None, help=f"per-frame pixel cap (tiny default {TINY_MAX_PIXELS})")
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"block size for named presets (default: the preset's; {TINY_BLOCK} on the tiny model)")
    parser.add_argument("--min-seq-len", type=int, default=None,
                        help=f"min_seq_len for named presets (default: the preset's; {TINY_MIN_SEQ_LEN} on the tiny model)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="PSA kernels (default auto: Triton on CUDA, the PyTorch reference on the CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="greedy answer length (default 8)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psa-vlm eval-fidelity``."""
    add_common_arguments(parser)
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help=f"comma-separated presets (default {DEFAULT_PRESETS}); 'dense' is the unpatched "
                             f"model run again (KL 0, agreement 1); known: {', '.join(PRESETS)}")
    parser.add_argument("--psa-config", type=Path, action="append", default=[],
                        help="a JSON PSA config (PSAConfig.save, psa-vlm calibrate) to evaluate too, named by its "
                             "file stem (repeatable)")
    parser.add_argument("--limit", type=int, default=16, help="prompts (the first N of the source; default 16)")
    parser.add_argument("--pair", action="append", default=[],
                        help="paired comparison A:B (repeatable; default: every quota-d with binary-d)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default ./psa_fidelity/<model name>)")
    parser.add_argument("--redo", action="store_true", help="run every setting again, ignoring saved runs")


class Session:
    """A loaded model with its runner and prompts, as the ``eval-fidelity`` / ``calibrate`` options describe."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..inference import CheckpointError, default_device, load_qwen25vl, resolve_model_dir

        for name in ("max_frames", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise _cli_error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.block_size is not None and (args.block_size < 16 or args.block_size & (args.block_size - 1)):
            raise _cli_error(f"--block-size must be a power of two >= 16, got {args.block_size}")
        try:
            self.model_dir, tiny_info = resolve_model_dir(args.model)
        except CheckpointError as exc:
            raise _cli_error(str(exc)) from None
        self.tiny = tiny_info is not None
        if self.tiny and not tiny_info.get("trained", False):
            logger.warning("the tiny model is UNTRAINED (random weights): answers are meaningless, KL still measures")
        self.block_size = args.block_size if args.block_size is not None else (TINY_BLOCK if self.tiny else None)
        self.min_seq_len = args.min_seq_len if args.min_seq_len is not None else (TINY_MIN_SEQ_LEN if self.tiny else None)
        min_pixels = args.min_pixels if args.min_pixels is not None else TINY_MIN_PIXELS
        if args.max_pixels is not None:
            max_pixels = args.max_pixels
        else:
            from ..inference import DEFAULT_MAX_PIXELS

            max_pixels = TINY_MAX_PIXELS if self.tiny else DEFAULT_MAX_PIXELS
        try:
            self.prompts = load_prompts(task=args.task, videos=args.videos, lmms_task=args.lmms_task,
                                        include_path=args.include_path or [], limit=getattr(args, "limit", None))
        except ValueError as exc:
            raise _cli_error(str(exc)) from None
        device = torch.device(args.device) if args.device else default_device()
        t0 = time.perf_counter()
        try:
            model, processor = load_qwen25vl(self.model_dir, device=device)
        except CheckpointError as exc:
            raise _cli_error(str(exc)) from None
        logger.info("model %s loaded in %.1f s; %d prompts", self.model_dir, time.perf_counter() - t0, len(self.prompts))
        self.runner = FidelityRunner(model, processor, backend=args.backend, max_frames=args.max_frames,
                                     min_pixels=min_pixels, max_pixels=max_pixels, max_new_tokens=args.max_new_tokens)
        self.device = device

    def conditions(self) -> str:
        from ..bench.common import environment

        env = environment()
        dtype = str(next(self.runner.model.parameters()).dtype).replace("torch.", "")
        return (f"Model `{self.model_dir}` ({'tiny, ' if self.tiny else ''}{self.runner.n_layers} layers, {dtype}, "
                f"{self.device.type}); backend {self.runner.backend}; frames <= {self.runner.max_frames}, pixels "
                f"{self.runner.min_pixels}-{self.runner.max_pixels} per frame; named presets with block "
                f"{self.block_size or 'preset'} and min_seq_len {self.min_seq_len or 'preset'}; greedy answers of "
                f"<= {self.runner.max_new_tokens} tokens; torch {env['torch']}, transformers {env['transformers']}, "
                f"commit {env['commit']}. Prefill times include one extra dense attention per layer (the error "
                f"measurement){' and the PyTorch reference kernels: not a speed measurement' if self.device.type == 'cpu' else ''}.")


def _signature(session: Session, name: str, config: Optional[PSAConfig]) -> Dict[str, Any]:
    from .sweep import weights_fingerprint

    r = session.runner
    return {"model": str(session.model_dir), "weights": weights_fingerprint(session.model_dir),
            "prompts": hashlib.sha256("\n".join(f"{p.id}|{p.video}|{p.prompt}" for p in session.prompts).encode()).hexdigest()[:16],
            "frames": [r.max_frames, r.min_pixels, r.max_pixels, r.max_new_tokens], "backend": r.backend,
            "config": None if config is None else config.to_dict(), "setting": name}


def _load_run(path: Path, signature: Dict[str, Any]) -> Optional[List[PromptResult]]:
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0])
    except (ValueError, IndexError):
        return None
    if head.get("signature") != json.loads(json.dumps(signature)):
        logger.warning("%s was made with other settings; running it again", path)
        return None
    out = []
    for line in lines[1:]:
        d = json.loads(line)
        d["layer_err"] = {int(k): v for k, v in d["layer_err"].items()}
        d["layer_density"] = {int(k): v for k, v in d["layer_density"].items()}
        out.append(PromptResult(**d))
    return out


def _save_run(path: Path, signature: Dict[str, Any], results: List[PromptResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps({"signature": signature}) + "\n")
        for r in results:
            fh.write(json.dumps(asdict(r)) + "\n")
    tmp.replace(path)


def _parse_pairs(values: Sequence[str], names: Sequence[str]) -> List[Tuple[str, str]]:
    pairs = []
    for v in values:
        a, sep, b = v.partition(":")
        if not sep or a not in names or b not in names:
            raise _cli_error(f"--pair {v!r} must be A:B with two evaluated settings ({', '.join(names)})")
        pairs.append((a, b))
    return pairs


def main(args: argparse.Namespace) -> int:
    """``psa-vlm eval-fidelity``: see the module docstring."""
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if args.limit < 1:
        raise _cli_error(f"--limit must be >= 1, got {args.limit}")
    bad = [p for p in presets if p not in PRESETS]
    if bad:  # before anything slow
        raise _cli_error(f"unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}")
    try:
        for path in args.psa_config:
            PSAConfig.load(path)  # fail before the model loads
    except (OSError, ValueError) as exc:
        raise _cli_error(str(exc)) from None
    session = Session(args)
    try:
        settings = resolve_settings(presets, args.psa_config, block_size=session.block_size,
                                    min_seq_len=session.min_seq_len)
    except (OSError, ValueError) as exc:
        raise _cli_error(str(exc)) from None
    if not settings:
        raise _cli_error("nothing to evaluate: give --presets and/or --psa-config")
    names = [n for n, _ in settings]
    pairs = _parse_pairs(args.pair, names) if args.pair else default_pairs(names)
    out = args.out if args.out is not None else Path("psa_fidelity") / Path(session.model_dir).name
    runner = session.runner

    by_setting: Dict[str, List[PromptResult]] = {}
    t_start = time.perf_counter()
    for k, (name, config) in enumerate(settings, 1):
        sig = _signature(session, name, config)
        path = out / "runs" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jsonl"
        saved = None if args.redo else _load_run(path, sig)
        if saved is not None:
            by_setting[name] = saved
            logger.info("[%d/%d] %s: reusing %s", k, len(settings), name, path)
            continue
        results = []
        t0 = time.perf_counter()
        for j, prompt in enumerate(session.prompts, 1):
            try:
                results.append(runner.run(prompt, config, name))
            except ValueError as exc:  # e.g. a layer override beyond the model's layers
                raise _cli_error(f"{name}: {exc}") from None
            logger.debug("%s %s: kl %.3g agree %s", name, prompt.id, results[-1].kl, results[-1].agree)
        _save_run(path, sig, results)
        by_setting[name] = results
        row = summarize(results, family_of_config(name, config), n_resamples=args.bootstrap)
        logger.info("[%d/%d] %s: density %.3f, KL %.3g, agreement %.3f%s (%.0f s; %.0f s so far)", k, len(settings),
                    name, row["density"], row["kl"], row["agreement"],
                    "" if row["accuracy"] is None else f", accuracy {row['accuracy']:.3f}",
                    time.perf_counter() - t0, time.perf_counter() - t_start)
    runner.apply(None)

    summary = [summarize(by_setting[n], family_of_config(n, c), n_resamples=args.bootstrap) for n, c in settings]
    layers = [row for n, _ in settings for row in layer_rows(by_setting[n], runner.n_layers, n_resamples=args.bootstrap)
              if by_setting[n] and not (row["attn_err"] is None and n == "dense")]
    pair_rows = paired_comparisons(by_setting, pairs, n_resamples=args.bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "fidelity.csv", summary, SUMMARY_COLUMNS)
    _write_csv(out / "layers.csv", layers, LAYER_COLUMNS)
    _write_csv(out / "pairs.csv", pair_rows, PAIR_COLUMNS)
    conditions = session.conditions() + (f" {len(session.prompts)} prompts; intervals are 95% (Wilson for "
                                         f"proportions, percentile bootstrap with {args.bootstrap} resamples for means).")
    write_markdown(out / "fidelity.md", summary, layers, pair_rows, conditions)
    png = write_figure(summary, out / "fidelity.png", f"{Path(session.model_dir).name}: fidelity against dense "
                                                      f"({len(session.prompts)} prompts)")
    print(f"eval-fidelity: {len(summary)} settings x {len(session.prompts)} prompts in {out}")
    print(f"{'setting':<16} {'density':>7} {'KL [95% CI]':>30} {'agreement':>9} {'accuracy':>8} {'attn err':>8}")
    for r in summary:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        err = "" if r["attn_err"] is None else f"{r['attn_err']:.3f}"
        print(f"{r['setting']:<16} {r['density']:>7.3f} {_ci(r['kl'], r['kl_lo'], r['kl_hi']):>30} "
              f"{r['agreement']:>9.3f} {acc:>8} {err:>8}")
    print(f"tables: {out / 'fidelity.csv'}, {out / 'layers.csv'}, {out / 'pairs.csv'}, {out / 'fidelity.md'}\n"
          f"figure: {png}")
    return 0
