"""``psa-vlm run``: answer a question about a video with a PSA-patched Qwen VL model.

With no arguments it runs the embedded default: the tiny offline Qwen2.5-VL (the trained one shipped in
``psa_vlm/data/tiny_trained`` when the package has it, else random weights built once into the cache by
``psa_vlm.models.tiny.default_tiny_checkpoint``), the clip bundled in ``psa_vlm/data`` and its question. For
that demo the block size and ``min_seq_len`` are lowered (32 and 64 instead of 128 and 4096) so that PSA
really runs on the ~280-token prompt; the output says so. With ``--model DIR`` a local checkpoint of any
supported family is loaded (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE: the ``model_type`` in its
``config.json`` decides), bf16 on CUDA, fp32 on the CPU, with ``--attn-implementation`` (default ``sdpa``;
``flash_attention_2`` as the model cards recommend for video, on a GPU with flash-attn installed), and patched
with ``psa_vlm.patch``: PSA runs the long prefill, the loaded attention everything else.

Frames are read by qwen-vl-utils with decord (with PyAV for videos decord cannot read) and handed to the
processor with their metadata, so the temporal positions match the sampled frame rate. Argument errors,
including a PSA config the chosen backend cannot run (``--block-size 24`` with the Triton kernels), fail at
parse time with one line and exit status 2; a prompt longer than the model's ``max_position_embeddings`` fails
before prefill, naming ``--fps``, ``--max-frames`` and ``--max-pixels``. Without ``--fps`` the video is sampled
evenly to ``--max-frames`` frames (lmms-eval's rule); with ``--fps`` one frame every ``1/fps`` seconds, capped
at ``--max-frames``.

Output (stdout): the answer, prompt tokens, prefill time, PSA density and level histogram from
``psa_stats``; ``--compare-dense`` also runs the unpatched model and prints the speed-up and whether the
answers agree. Progress goes to stderr as log lines.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .config import PRESETS, PSAConfig
from .api import BACKENDS, check_config_for_backend
from .inference import (
    DEFAULT_ATTN_IMPLEMENTATION,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    FAMILY_NAMES,
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    GenerationTiming,
    PromptTooLongError,
    VideoError,
    check_prompt_length,
    checkpoint_family,
    default_device,
    frame_count,
    generate_timed,
    load_model,
    prepare_inputs,
    probe_video,
    psa_config_from_options,
    resolve_model_dir,
    summarize_psa_stats,
    tiny_checkpoint_info,
    video_messages,
)

__all__ = ["add_arguments", "main", "TINY_DEMO_BLOCK", "TINY_DEMO_MIN_SEQ_LEN"]

logger = logging.getLogger(__name__)

#: Block size used on the tiny demo model (its prompts are a few hundred tokens).
TINY_DEMO_BLOCK = 32
#: ``min_seq_len`` used on the tiny demo model.
TINY_DEMO_MIN_SEQ_LEN = 64
#: ``text_tail`` used on the tiny demo model (only matters where token types are unknown).
TINY_DEMO_TEXT_TAIL = 32
#: Frames sampled when neither ``--max-frames`` nor ``--fps`` is given.
DEFAULT_MAX_FRAMES = 64
#: Prompt when a video is given without one.
DEFAULT_PROMPT = "Describe what happens in this video."
#: What to lower when the prompt is longer than the model's maximum.
RUN_LENGTH_OPTIONS = "--fps, --max-frames or --max-pixels (or --max-new-tokens)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psa-vlm run``."""
    from .cli import nonnegative_int, positive_float, positive_int

    parser.add_argument("--video", default=None, help="video file (default: the bundled synthetic clip)")
    parser.add_argument("--prompt", default=None,
                        help="question (default: the bundled clip's question, or a generic one for --video)")
    parser.add_argument("--model", default=None,
                        help="local checkpoint directory of a supported family "
                             f"({', '.join(SUPPORTED_MODEL_TYPES)}; default: the tiny offline Qwen2.5-VL)")
    parser.add_argument("--attn-implementation", default=DEFAULT_ATTN_IMPLEMENTATION,
                        help="attention the model is loaded with, which PSA falls back to for decode and short "
                             "inputs: sdpa (default), eager, flash_attention_2, flash_attention_3, ...")
    parser.add_argument("--preset", default="paper", help=f"PSA preset: {', '.join(PRESETS)} (default paper)")
    parser.add_argument("--psa-config", default=None,
                        help="JSON PSA config (PSAConfig.save, psa-vlm calibrate; per-layer overrides included) used "
                             "instead of --preset; --block-size / --min-seq-len still override its base fields")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help=f"frames to sample (default {DEFAULT_MAX_FRAMES}; the cap with --fps, default 768)")
    parser.add_argument("--fps", type=positive_float, default=None, help="sample this many frames per second instead")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help=f"per-frame pixel cap (default {DEFAULT_MAX_PIXELS} = 360x420)")
    parser.add_argument("--min-pixels", type=positive_int, default=None,
                        help=f"per-frame pixel floor (default {DEFAULT_MIN_PIXELS})")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also run unpatched dense attention: speed-up and answer agreement")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="PSA kernels: auto (FlashAttention-4 attend stage where installed, else Triton, on CUDA; "
                             "the PyTorch reference on the CPU), fa4, triton or reference")
    parser.add_argument("--min-seq-len", type=nonnegative_int, default=None,
                        help="prefills shorter than this run dense (default: the preset's, 4096; 64 on the tiny demo)")
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help="PSA query/KV block size (default: the preset's, 128; 32 on the tiny demo)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="importance estimator stride (default: the preset's, 8; 16 and 32 are cheaper, coarser "
                             "estimates; must divide the block size)")
    parser.add_argument("--estimate-heads", default=None, choices=("query", "kv"),
                        help="query (default): one importance estimate per query head; kv: one per KV head from its "
                             "query group's mean, shared by the group (cheaper, less faithful on large groups)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer length cap (default 16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


# ---------------------------------------------------------------------------------------------- helpers
def _cli_error(msg: str) -> Exception:
    from .cli import CLIError

    return CLIError(msg)


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model and no video, at parse time (``psa_vlm.cli``): one line, exit status 2.

    Includes the PSA config against the backend that will run it (``check_config_for_backend``: the Triton
    kernels need power-of-two block sizes >= 16), so that ``--block-size 24`` on a GPU fails here and not inside
    ``generate``.
    """
    _validate(args)
    tiny = args.model is None or tiny_checkpoint_info(args.model) is not None
    cfg, _ = _psa_config(args, tiny)
    device = torch.device(args.device) if args.device else default_device()
    head_dim = None if args.model is None else _head_dim(args.model)
    try:
        check_config_for_backend(cfg, args.backend, device=device, head_dim=head_dim)
    except (TypeError, ValueError) as exc:
        raise _cli_error(f"{exc} (--block-size, --backend)") from None


def _head_dim(model_dir: str) -> Optional[int]:
    """The language model's head dimension from ``config.json`` (``None`` if it cannot be read)."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the checkpoint check reports it later
    text = cfg.get("text_config") or cfg
    if text.get("head_dim"):
        return int(text["head_dim"])
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    return int(hidden) // int(heads) if heads and hidden else None


def _validate(args: argparse.Namespace) -> None:
    if args.preset not in PRESETS:
        raise _cli_error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.max_frames is not None and args.max_frames < 2:
        raise _cli_error(f"--max-frames must be at least 2, got {args.max_frames}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise _cli_error(f"--fps must be a positive number, got {args.fps}")
    if args.max_pixels is not None and args.max_pixels < 28 * 28:
        raise _cli_error(f"--max-pixels must be at least {28 * 28} (one 28x28 patch), got {args.max_pixels}")
    if args.min_pixels is not None and args.min_pixels < 1:
        raise _cli_error(f"--min-pixels must be positive, got {args.min_pixels}")
    if args.min_seq_len is not None and args.min_seq_len < 0:
        raise _cli_error(f"--min-seq-len must be >= 0, got {args.min_seq_len}")
    if args.block_size is not None and (args.block_size < 8 or args.block_size % 8):
        raise _cli_error(f"--block-size must be a positive multiple of 8, got {args.block_size}")
    if args.max_new_tokens < 1:
        raise _cli_error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.prompt is not None and not args.prompt.strip():
        raise _cli_error("--prompt is empty")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise _cli_error(f"--device {args.device!r} is not a torch device (cuda or cpu)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise _cli_error("--device cuda requested but no CUDA GPU is visible")


def _psa_config(args: argparse.Namespace, tiny: bool) -> Tuple[PSAConfig, Optional[str]]:
    """The PSA config and, for the tiny demo, a note on what was lowered."""
    if getattr(args, "psa_config", None) is not None:  # a saved config is used as written, bar explicit options
        try:
            base = PSAConfig.load(args.psa_config)
            return psa_config_from_options(base=base, block_size=args.block_size, min_seq_len=args.min_seq_len,
                                           stride=getattr(args, "stride", None),
                                           estimate_heads=getattr(args, "estimate_heads", None)), None
        except (OSError, ValueError) as exc:
            raise _cli_error(str(exc)) from None
    block = args.block_size
    min_seq = args.min_seq_len
    text_tail = None
    note = None
    if tiny:
        lowered = []
        base = PSAConfig.preset(args.preset)
        if block is None:
            block = TINY_DEMO_BLOCK
            lowered.append(f"blocks {base.block_q} -> {block}")
        if min_seq is None:
            min_seq = TINY_DEMO_MIN_SEQ_LEN
            lowered.append(f"min_seq_len {base.min_seq_len} -> {min_seq}")
        text_tail = min(base.text_tail, TINY_DEMO_TEXT_TAIL)
        if lowered:
            note = "tiny demo: " + ", ".join(lowered) + " so that PSA engages on this short prompt"
    try:
        cfg = psa_config_from_options(args.preset, block_size=block, min_seq_len=min_seq, text_tail=text_tail,
                                      stride=getattr(args, "stride", None),
                                      estimate_heads=getattr(args, "estimate_heads", None))
    except ValueError as exc:
        raise _cli_error(str(exc)) from None
    return cfg, note


def _patch(model: Any, config: PSAConfig, backend: str) -> None:
    from .patches import patch

    try:
        patch(model, config, backend=backend)
    except ValueError as exc:  # e.g. a JSON config naming layers the model lacks
        raise _cli_error(str(exc)) from None


def _unpatch(model: Any) -> None:
    from .patches import unpatch

    unpatch(model)


def _visual_tokens(model: Any, input_ids: torch.Tensor) -> int:
    """Prompt tokens inside image / video spans (what PSA treats as visual), ``psa_vlm.patch``'s rule."""
    from .patches.core import VisionIds, token_types_from_ids

    types, _ = token_types_from_ids(input_ids, VisionIds.from_config(model.config))
    return int(types.ne(0).sum())


def _stats(model: Any) -> Dict[str, Any]:
    from .patches import psa_stats

    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    return summarize_psa_stats(psa_stats(model), n_layers)


def _answer(
    model: Any, processor: Any, inputs: Any, max_new_tokens: int, warmup: bool
) -> Tuple[str, torch.Tensor, GenerationTiming]:
    if warmup:
        generate_timed(model, inputs, max_new_tokens=1)
    ids, timing = generate_timed(model, inputs, max_new_tokens=max_new_tokens)
    text = processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return text.strip(), ids, timing


def _fmt_s(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


# ---------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    """``psa-vlm run``: see the module docstring."""
    check_arguments(args)
    bundled = None
    if args.video is None:
        from .video.synth import default_clip

        bundled = default_clip()
        video_path = bundled.video
        prompt = args.prompt if args.prompt is not None else bundled.prompt()
    else:
        video_path = args.video
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    try:
        info = probe_video(video_path)
    except VideoError as exc:
        raise _cli_error(str(exc)) from None

    try:
        model_dir, tiny_info = resolve_model_dir(args.model)
    except CheckpointError as exc:
        raise _cli_error(str(exc)) from None
    tiny = tiny_info is not None
    untrained = tiny and not tiny_info.get("trained", False)
    cfg, note = _psa_config(args, tiny)

    nframes = None
    if args.fps is None:
        nframes = frame_count(info, max_frames=args.max_frames or DEFAULT_MAX_FRAMES)
    sampled = nframes if nframes is not None else frame_count(info, max_frames=args.max_frames, fps=args.fps)
    min_pixels = args.min_pixels if args.min_pixels is not None else DEFAULT_MIN_PIXELS
    max_pixels = args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS
    if max_pixels < min_pixels:
        raise _cli_error(f"--max-pixels ({max_pixels}) is below --min-pixels ({min_pixels})")

    device = torch.device(args.device) if args.device else default_device()
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise _cli_error("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels on the CPU, "
                         "slowly); use --backend reference or auto on the CPU")
    t0 = time.perf_counter()
    logger.info("loading %s", model_dir)
    try:
        model, processor = load_model(model_dir, device=device, attn_implementation=args.attn_implementation)
    except (CheckpointError, ValueError) as exc:  # a bad checkpoint, or an attention its machine lacks
        raise _cli_error(str(exc)) from None
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    logger.info("model loaded in %.1f s on %s (%s)", time.perf_counter() - t0, device, str(dtype).replace("torch.", ""))

    logger.info("decoding %d frames of %s with qwen-vl-utils + decord", sampled, Path(info.path).name)
    messages = video_messages(info.path, prompt, nframes=nframes, fps=args.fps, max_frames=args.max_frames,
                              min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        inputs = prepare_inputs(processor, messages)
    except Exception as exc:  # decoding/processing failures are the user's input, reported on one line
        msg = str(exc).strip().splitlines()
        raise _cli_error(f"cannot process video {video_path!r}: {msg[0] if msg else type(exc).__name__}") from None
    video_token_id = getattr(model.config, "video_token_id", None)
    n_prompt = int(inputs["input_ids"].shape[1])
    try:  # before any prefill: a prompt longer than the model ran for many minutes before failing
        check_prompt_length(model, n_prompt, new_tokens=args.max_new_tokens, options=RUN_LENGTH_OPTIONS)
    except PromptTooLongError as exc:
        raise _cli_error(str(exc)) from None
    n_video = int((inputs["input_ids"] == video_token_id).sum()) if video_token_id is not None else 0
    n_visual = _visual_tokens(model, inputs["input_ids"])
    grid = inputs["video_grid_thw"][0].tolist() if "video_grid_thw" in inputs else None
    spg = inputs.get("second_per_grid_ts")
    if spg is not None:  # Qwen2.5-VL's processor output
        spg_v = float(spg[0])
    else:  # the same quantity for the other families: temporal_patch_size frames at qwen-vl-utils' sampled rate
        tps = getattr(getattr(processor, "video_processor", None), "temporal_patch_size", 2)
        spg_v = tps * info.frames / (sampled * info.fps) if sampled and info.fps > 0 else float("nan")
    # one untimed 1-token generate per mode first: always on CUDA (kernel compilation, allocator), and on the
    # CPU when comparing, so that neither mode pays the first call's overhead
    warmup = device.type == "cuda" or args.compare_dense

    logger.info("prefill + generation with PSA (preset %s, %d prompt tokens)", args.preset, n_prompt)
    _patch(model, cfg, args.backend)
    psa_text, psa_ids, psa_t = _answer(model, processor, inputs, args.max_new_tokens, warmup)
    stats = _stats(model)

    dense = None
    if args.compare_dense:
        logger.info("prefill + generation with dense attention (unpatched) for comparison")
        _unpatch(model)
        dense = _answer(model, processor, inputs, args.max_new_tokens, warmup)

    # ------------------------------------------------------------------ report (stdout)
    w = 10
    out = print
    out("psa-vlm run")
    desc = f"{model_dir}"
    family = checkpoint_family(model_dir)
    if tiny:
        desc = f"tiny {'trained' if not untrained else 'random-weight'} {FAMILY_NAMES[family]} ({model_dir})"
    else:
        desc = f"{type(model).__name__} ({model_dir})"
    out(f"{'model':<{w}}: {desc}; {device.type}, {str(dtype).replace('torch.', '')}, "
        f"attention {args.attn_implementation}")
    if untrained:
        out(f"{'':<{w}}  NOTE: the default model is UNTRAINED (random weights): its answer is meaningless; this run")
        out(f"{'':<{w}}  shows the video pipeline and PSA's statistics. Pass --model DIR for a real checkpoint.")
    out(f"{'video':<{w}}: {info.path} ({info.frames} frames, {info.width}x{info.height}, {info.fps:g} fps, "
        f"{info.duration:.1f} s)")
    if grid is not None:
        t_, h_, w_ = grid
        out(f"{'':<{w}}  {sampled} frames sampled -> grid {t_}x{h_}x{w_} (T x H x W patches), {n_video} video tokens, "
            f"{spg_v:g} s per temporal patch")
    out(f"{'question':<{w}}: " + prompt.replace("\n", "\n" + " " * (w + 2)))
    source = f"config {args.psa_config}" if getattr(args, "psa_config", None) else f"preset {args.preset}"
    layers_note = f", per-layer overrides on layers {list(cfg.overridden_layers())}" if cfg.layer_overrides else ""
    estimator = f"stride {cfg.stride}" + (", one estimate per KV head" if cfg.estimate_heads == "kv" else "")
    out(f"{'PSA':<{w}}: {source}, blocks {cfg.block_q}x{cfg.block_k}, min_seq_len {cfg.min_seq_len}, "
        f"estimator {estimator}, backend {args.backend}{layers_note}")
    if note:
        out(f"{'':<{w}}  ({note})")
    out(f"{'answer':<{w}}: {psa_text!r}")
    if bundled is not None and args.prompt is None:
        m = re.search(r"\b([A-D])\b", psa_text)
        verdict = "no choice letter in the answer" if m is None else (
            "the answer is right" if m.group(1) == bundled.answer else "the answer is wrong")
        out(f"{'expected':<{w}}: {bundled.answer} ({bundled.answer_text}), shown in frames {bundled.events[0].start}-"
            f"{bundled.events[-1].end - 1} of the bundled clip; {verdict}")
    extra = f", {n_visual - n_video} more inside the video spans" if n_visual > n_video else ""
    out(f"{'prompt':<{w}}: {n_prompt} tokens ({n_video} video{extra}, {n_prompt - n_visual} text)")
    out(f"{'prefill':<{w}}: {_fmt_s(psa_t.prefill_s)} language model (vision encoder {_fmt_s(psa_t.vision_s)}, "
        f"first token after {_fmt_s(psa_t.ttft_s)}; generate {_fmt_s(psa_t.total_s)} for {psa_t.new_tokens} tokens)")
    if stats["engaged"]:
        d = stats["density"]
        per_layer = " ".join("dense" if x is None else f"{x:.2f}" for x in stats["layers"])
        out(f"{'density':<{w}}: {d:.3f} (sparsity {1 - d:.3f}), mean over the layers that ran PSA; "
            f"per layer: {per_layer}")
        h = stats["histogram"]
        if h is not None:
            out(f"{'levels':<{w}}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in h.items()))
    else:
        out(f"{'density':<{w}}: PSA did not engage: the prompt has {n_prompt} tokens, below min_seq_len "
            f"{cfg.min_seq_len}, so dense attention ran (lower --min-seq-len to force PSA)")
    if dense is not None:
        d_text, d_ids, d_t = dense
        agree = d_text == psa_text
        out(f"{'dense':<{w}}: answer {d_text!r}; prefill {_fmt_s(d_t.prefill_s)} language model, "
            f"first token after {_fmt_s(d_t.ttft_s)}")
        if math.isfinite(d_t.prefill_s) and math.isfinite(psa_t.prefill_s) and psa_t.prefill_s > 0:
            timing_note = "" if device.type == "cuda" else " (CPU, one run each: indicative only)"
            out(f"{'speed-up':<{w}}: {d_t.prefill_s / psa_t.prefill_s:.2f}x language-model prefill, "
                f"{d_t.ttft_s / psa_t.ttft_s:.2f}x time to first token{timing_note}")
        out(f"{'agree':<{w}}: {'yes' if agree else 'no'} (PSA and dense answers are "
            f"{'identical' if agree else 'different'})")
    return 0
