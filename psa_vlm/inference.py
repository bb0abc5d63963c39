"""Shared plumbing for answering questions about videos with a (PSA-patched) Qwen VL model.

Used by ``psa-vlm run``, the lmms-eval model and the evaluation sweep:

- ``psa_config_from_options``: a ``PSAConfig`` from a preset name plus string/number overrides (the form
  they take on a command line or in lmms-eval's ``--model_args``);
- ``check_checkpoint`` / ``checkpoint_family`` / ``load_model``: validate and load a local checkpoint directory
  of any supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) with any attention implementation;
- ``probe_video`` / ``video_messages`` / ``prepare_inputs``: frames through qwen-vl-utils (decord) and the
  processor, *with* ``video_metadata`` so that the temporal mRoPE positions are right;
- ``PrefillTimer`` / ``generate_timed``: the wall time of the prefill (the first forward of ``generate``).

Importing this module imports torch only; transformers, qwen-vl-utils and decord load on first use.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .config import PRESETS, PSAConfig

__all__ = [
    "DEFAULT_MIN_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "CheckpointError",
    "VideoError",
    "PromptTooLongError",
    "max_prompt_length",
    "check_prompt_length",
    "parse_number_list",
    "psa_config_from_options",
    "SUPPORTED_MODEL_TYPES",
    "FAMILY_NAMES",
    "DEFAULT_ATTN_IMPLEMENTATION",
    "checkpoint_family",
    "check_checkpoint",
    "check_qwen25vl_checkpoint",
    "tiny_checkpoint_info",
    "default_model_dir",
    "default_device",
    "load_model",
    "load_qwen25vl",
    "VideoInfo",
    "probe_video",
    "frame_count",
    "video_messages",
    "prepare_inputs",
    "PrefillTimer",
    "GenerationTiming",
    "generate_timed",
    "summarize_psa_stats",
]

logger = logging.getLogger(__name__)

#: ``config.json`` model types psa_vlm loads and patches (the families of ``psa_vlm.patch``).
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
#: Display name of each supported model type.
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL",
                "qwen3_vl_moe": "Qwen3-VL-MoE"}
#: Attention a checkpoint is loaded with unless told otherwise.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"

#: Per-frame pixel floor (4 merged tokens): small frames are never upsampled past this.
DEFAULT_MIN_PIXELS = 4 * 28 * 28
#: Per-frame pixel cap (the Qwen2.5-VL model card's video example: 360 x 420).
DEFAULT_MAX_PIXELS = 360 * 420

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A directory that is not a loadable checkpoint of a supported Qwen VL family."""


class VideoError(ValueError):
    """A video file that is missing or cannot be decoded."""


class PromptTooLongError(ValueError):
    """A prompt with more tokens than the model's maximum (``max_position_embeddings``)."""


def max_prompt_length(model: Any) -> Optional[int]:
    """The language model's ``max_position_embeddings`` (``None`` if the config does not say)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_prompt_length(model: Any, n_tokens: int, *, new_tokens: int = 0, options: str = "the number of frames "
                        "or the pixels per frame") -> None:
    """Raise ``PromptTooLongError`` before prefill if ``n_tokens + new_tokens`` exceeds the model's maximum.

    The maximum is the text config's ``max_position_embeddings``, the context the checkpoint was made for. A
    longer prompt is not rejected by transformers: a 60,153-token prompt for a 32,768-token model ran in
    prefill for over 15 minutes before it was killed (issue #11).

    Args:
        model: A model with a transformers config.
        n_tokens: Prompt tokens.
        new_tokens: Tokens to be generated after the prompt.
        options: What the caller can lower, named in the message (e.g. ``--fps, --max-frames or --max-pixels``).
    """
    limit = max_prompt_length(model)
    if limit is not None and n_tokens + new_tokens > limit:
        extra = f" + {new_tokens} new" if new_tokens else ""
        raise PromptTooLongError(
            f"the prompt has {n_tokens} tokens{extra}, more than this model's maximum of {limit} "
            f"(max_position_embeddings); lower {options}"
        )


# ---------------------------------------------------------------------------------------------- options
def parse_number_list(value: Any, n: int, name: str) -> Optional[Tuple[float, ...]]:
    """``"0.7/0.8/0.9/0.9"`` (also ``;``, space or ``:`` separated), a sequence, or ``"none"`` -> floats.

    Commas are lmms-eval's ``--model_args`` separator, so lists use ``/`` there.

    Args:
        value: String, number sequence, or ``None`` / ``"none"``.
        n: Required length.
        name: Option name for the error message.

    Returns:
        A tuple of ``n`` floats, or ``None`` for ``None`` / ``"none"`` / ``"off"``.

    Raises:
        ValueError: Wrong length or not numbers.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "off", "null", ""):
            return None
        for sep in (";", ":", " ", ","):
            text = text.replace(sep, "/")
        parts = [p for p in text.split("/") if p]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        nums = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers separated by '/', got {value!r}") from None
    if len(nums) != n:
        raise ValueError(f"{name} must be {n} numbers separated by '/', got {value!r}")
    return nums


def _as_int(value: Any, name: str, minimum: int = 0) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def psa_config_from_options(
    preset: str = "paper",
    *,
    base: Optional[PSAConfig] = None,
    thresholds: Any = None,
    quotas: Any = None,
    block_size: Any = None,
    block_q: Any = None,
    block_k: Any = None,
    stride: Any = None,
    estimate_heads: Any = None,
    min_seq_len: Any = None,
    text_tail: Any = None,
    sim_thresholds: Any = "preset",
    pool_factors: Any = "preset",
) -> PSAConfig:
    """A ``PSAConfig``: the named preset with the given fields overridden (``None`` keeps the preset's).

    Args:
        preset: Name in ``PRESETS`` (``dense``, ``paper``, ``binary``, ``quota-0.2``, ``binary-0.2``, ...).
        base: A config to start from instead of the preset (e.g. ``PSAConfig.load(path)``; its per-layer
            overrides are kept and the options below change the base fields).
        thresholds: ``tau`` for factors (1, 2, 4, 8), e.g. ``"0.7/0.8/0.9/0.9"`` (selects threshold mode).
        quotas: Fractions for factors (1, 2, 4, 8), e.g. ``"0.1/0.1/0.1/0.2"`` (selects quota mode).
        block_size: Sets both ``block_q`` and ``block_k``.
        block_q: Query block size.
        block_k: KV block size.
        stride: Antidiagonal stride of the estimator.
        estimate_heads: ``"query"`` or ``"kv"`` (GQA-shared estimator, ``PSAConfig.estimate_heads``).
        min_seq_len: Prefills shorter than this run dense.
        text_tail: Tokens counted as text when token types are unknown.
        sim_thresholds: Similarity-cap thresholds for factors (2, 4, 8), ``"none"`` to disable,
            ``"preset"`` (default) to keep the preset's.
        pool_factors: ``"2/4/8"``, ``"none"`` (binary), or ``"preset"``.

    Returns:
        The validated config.

    Raises:
        ValueError: Unknown preset or an invalid value (the message names it).
    """
    if base is None and preset not in PRESETS:
        raise ValueError(f"unknown PSA preset {preset!r}; choose one of {', '.join(PRESETS)}")
    changes: Dict[str, Any] = {}
    if thresholds is not None:
        changes["thresholds"] = parse_number_list(thresholds, 4, "thresholds")
        changes["mode"] = "threshold"
    if quotas is not None:
        changes["quotas"] = parse_number_list(quotas, 4, "quotas")
        changes["mode"] = "quota"
    if block_size is not None:
        changes["block_q"] = changes["block_k"] = _as_int(block_size, "block_size", 1)
    if block_q is not None:
        changes["block_q"] = _as_int(block_q, "block_q", 1)
    if block_k is not None:
        changes["block_k"] = _as_int(block_k, "block_k", 1)
    if stride is not None:
        changes["stride"] = _as_int(stride, "stride", 1)
    if estimate_heads is not None:
        changes["estimate_heads"] = str(estimate_heads).strip()
    if min_seq_len is not None:
        changes["min_seq_len"] = _as_int(min_seq_len, "min_seq_len", 0)
    if text_tail is not None:
        changes["text_tail"] = _as_int(text_tail, "text_tail", 0)
    if not (isinstance(sim_thresholds, str) and sim_thresholds == "preset"):
        changes["sim_thresholds"] = parse_number_list(sim_thresholds, 3, "sim_thresholds")
    if not (isinstance(pool_factors, str) and pool_factors == "preset"):
        if pool_factors is None or (isinstance(pool_factors, str) and pool_factors.strip().lower() in ("none", "")):
            changes["pool_factors"] = ()
        else:
            if isinstance(pool_factors, (int, float)):
                pf = (pool_factors,)
            else:
                text = str(pool_factors) if isinstance(pool_factors, str) else None
                pf = tuple(text.replace(",", "/").split("/")) if text is not None else tuple(pool_factors)
            changes["pool_factors"] = tuple(_as_int(p, "pool_factors", 2) for p in pf if str(p).strip())
    try:
        if base is not None:
            return base.replace(**changes) if changes else base
        return PSAConfig.preset(preset, **changes)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_family(path: PathLike) -> str:
    """The model family of a local checkpoint directory: its ``config.json`` ``model_type`` (no weights read).

    Returns:
        One of ``SUPPORTED_MODEL_TYPES`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe``).

    Raises:
        CheckpointError: Missing, not a directory, no readable ``config.json``, or an unsupported model type
            (the message lists the supported ones).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory; pass a Qwen VL checkpoint directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {cfg}: {exc}") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{str(path)!r} holds a {model_type!r} model; psa_vlm supports the model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE)"
        )
    return str(model_type)


def check_checkpoint(path: PathLike) -> Path:
    """Check that ``path`` is a local checkpoint directory of a supported family (no weights are read).

    Returns:
        The resolved directory.

    Raises:
        CheckpointError: See ``checkpoint_family``.
    """
    checkpoint_family(path)
    return Path(path).expanduser().resolve()


def check_qwen25vl_checkpoint(path: PathLike) -> Path:
    """``check_checkpoint`` restricted to Qwen2.5-VL (``model_type`` ``qwen2_5_vl``).

    Raises:
        CheckpointError: As ``check_checkpoint``, or a checkpoint of another family.
    """
    family = checkpoint_family(path)
    if family != "qwen2_5_vl":
        raise CheckpointError(
            f"{str(path)!r} holds a {family!r} model, not a Qwen2.5-VL checkpoint (model_type 'qwen2_5_vl')"
        )
    return Path(path).expanduser().resolve()


def tiny_checkpoint_info(path: PathLike) -> Optional[Dict[str, Any]]:
    """The marker dict of a psa_vlm tiny checkpoint (``None`` for any other checkpoint).

    A marker without ``"trained": true`` means random weights.
    """
    try:
        from .models.tiny import MARKER_FILE
    except ImportError:  # pragma: no cover - the tiny builder is part of the package
        return None
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}


def default_model_dir() -> Path:
    """The model used when none is named: the shipped trained tiny checkpoint if the package has one
    (``psa_vlm.models.trained``), else the random-weight tiny checkpoint built into the cache.

    Check ``tiny_checkpoint_info(path).get("trained")`` to tell which one it is.
    """
    try:
        from .models.trained import trained_tiny_checkpoint

        return trained_tiny_checkpoint()
    except (ImportError, FileNotFoundError):
        pass
    from .models.tiny import default_tiny_checkpoint

    logger.info("preparing the tiny offline Qwen2.5-VL checkpoint (built once into the cache)")
    return default_tiny_checkpoint()


def resolve_model_dir(model: Optional[PathLike]) -> Tuple[Path, Optional[Dict[str, Any]]]:
    """The checkpoint to use and its tiny-checkpoint info (``None`` for a real checkpoint).

    ``model=None`` means the default tiny checkpoint (``default_model_dir``); otherwise the directory is checked
    with ``check_checkpoint`` (raises ``CheckpointError``).
    """
    model_dir = default_model_dir() if model is None else check_checkpoint(model)
    return model_dir, tiny_checkpoint_info(model_dir)


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    path: PathLike,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
) -> Tuple[Any, Any]:
    """Load a Qwen VL checkpoint of any supported family and its processor from a local directory.

    The class is the one ``transformers.AutoModelForImageTextToText`` maps the checkpoint's ``model_type`` to
    (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
    ``Qwen3VLForConditionalGeneration`` or ``Qwen3VLMoeForConditionalGeneration``); the processor is
    ``AutoProcessor``'s.

    Args:
        path: Checkpoint directory (checked with ``check_checkpoint``).
        device: Target device (default: CUDA if available, else CPU).
        dtype: Weights dtype (default: bfloat16 on CUDA, float32 on CPU).
        attn_implementation: Attention the model is loaded with, for the language model and the vision tower
            (``sdpa`` (default), ``eager``, ``flash_attention_2``, ``flash_attention_3``, or a ``kernels`` hub
            name where transformers knows it). ``psa_vlm.patch`` later replaces the language model's and
            falls back to this one where PSA does not run. ``flash_attention_*`` needs its package and a
            CUDA GPU with fp16/bf16 weights (the Qwen2.5-VL and Qwen3-VL model cards' setting for video).

    Returns:
        ``(model, processor)``, the model in eval mode on ``device``.

    Raises:
        CheckpointError: Not a supported checkpoint, or its files fail to load.
        ValueError: ``attn_implementation`` is unknown to transformers or its package is missing (the message
            names the value and the remedy).
    """
    p = check_checkpoint(path)
    if not isinstance(attn_implementation, str) or not attn_implementation.strip():
        raise ValueError(f"attn_implementation must be a name such as 'sdpa', got {attn_implementation!r}")
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(p, dtype=dtype, attn_implementation=attn_implementation)
    except ImportError as exc:  # transformers: the flash-attn / kernels package is missing or unusable
        raise ValueError(
            f"cannot load with attn_implementation={attn_implementation!r}: {_first_line(exc)} "
            f"(install that package on a CUDA machine, or use attn_implementation='sdpa')"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        msg = _first_line(exc)
        if "attn_implementation" in msg or "attention implementation" in msg:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not usable for {str(path)!r}: {msg}"
            ) from None
        raise CheckpointError(f"cannot load the checkpoint in {str(path)!r}: {msg}") from None
    try:
        processor = AutoProcessor.from_pretrained(p)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the processor in {str(path)!r}: {_first_line(exc)}") from None
    return model.to(device).eval(), processor


def load_qwen25vl(
    path: PathLike,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
) -> Tuple[Any, Any]:
    """``load_model`` restricted to Qwen2.5-VL checkpoints (raises ``CheckpointError`` for other families)."""
    check_qwen25vl_checkpoint(path)
    return load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- video inputs
@dataclass
class VideoInfo:
    """What decord reports about a video file."""

    path: str
    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps > 0 else float("nan")


def probe_video(path: PathLike) -> VideoInfo:
    """Open a video with decord (the reader qwen-vl-utils uses) and read its size, length and rate; a video
    decord cannot read (or reads wrongly: small or narrow frames) is probed with PyAV, which then reads its
    frames (``prepare_inputs``).

    Raises:
        VideoError: Missing file, a directory, a file neither decoder can read, or fewer than 2 frames.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VideoError(f"video file {str(path)!r} does not exist")
    if not p.is_file():
        raise VideoError(f"{str(path)!r} is not a file")
    # PyAV first: it reports a broken file as a Python exception, where decord's bundled FFmpeg also writes
    # its own error lines to stderr
    try:
        import av

        with av.open(str(p)) as container:
            has_video = bool(container.streams.video)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise VideoError(f"cannot decode video {str(path)!r}: {msg[0] if msg else type(exc).__name__}") from None
    if not has_video:
        raise VideoError(f"{str(path)!r} has no video stream")
    try:
        import decord

        vr = decord.VideoReader(str(p))
        n = len(vr)
        fps = float(vr.get_avg_fps())
        first = vr[0]
        h, w = first.shape[:2]
        decord_ok = first.shape[-1] == 3  # decord 0.6 gives 4 or 6 "channels" for some small widths
    except Exception:  # decord raises its own DECORDError and RuntimeErrors
        decord_ok = False
    if not decord_ok:  # frames are read with PyAV then (psa_vlm.video.decode)
        from .video.decode import probe_pyav

        try:
            pinfo = probe_pyav(str(p))
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            raise VideoError(f"cannot decode video {str(path)!r}: {msg[0] if msg else type(exc).__name__}") from None
        n, fps, w, h = pinfo.frames, pinfo.fps, pinfo.width, pinfo.height
        logger.info("decord cannot read %s; its frames are read with PyAV", p.name)
    if n < 2:
        raise VideoError(f"video {str(path)!r} has {n} frame(s); at least 2 are needed")
    return VideoInfo(str(p.resolve()), int(n), fps, int(w), int(h))


def frame_count(info: VideoInfo, *, max_frames: Optional[int] = None, fps: Optional[float] = None) -> int:
    """Frames qwen-vl-utils will sample (even, at least 2, at most the video's).

    Without ``fps``: ``min(max_frames, frames)`` rounded down to even (lmms-eval's rule). With ``fps``: one
    frame every ``1/fps`` seconds, at least 4, at most ``max_frames`` (default 768), rounded down to even.
    """
    if fps is None:
        n = info.frames if max_frames is None else min(max_frames, info.frames)
        return max(2, (n // 2) * 2)
    cap = min(768 if max_frames is None else max_frames, info.frames)
    n = min(max(info.duration * fps, 4), cap)
    return max(2, int(n // 2) * 2)


def video_messages(
    video: PathLike,
    prompt: str,
    *,
    nframes: Optional[int] = None,
    fps: Optional[float] = None,
    max_frames: Optional[int] = None,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> List[Dict[str, Any]]:
    """A one-turn chat with a video and a question, in qwen-vl-utils' message format.

    Give either ``nframes`` (exact count) or ``fps`` (with optional ``max_frames`` cap). The pixel budget is
    per frame; ``min_pixels`` stops qwen-vl-utils from upsampling small frames.
    """
    if nframes is not None and fps is not None:
        raise ValueError("give either nframes or fps, not both")
    item: Dict[str, Any] = {
        "type": "video",
        "video": str(video),
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
    }
    if nframes is not None:
        item["nframes"] = int(nframes)
    elif fps is not None:
        item["fps"] = float(fps)
        if max_frames is not None:
            item["max_frames"] = int(max_frames)
    return [{"role": "user", "content": [item, {"type": "text", "text": prompt}]}]


def _is_qwen3_processor(processor: Any) -> bool:
    """Whether ``processor`` is Qwen3-VL's (also Qwen3-VL-MoE's): per-frame timestamps, patch 16."""
    try:
        from transformers import Qwen3VLProcessor
    except ImportError:  # pragma: no cover - transformers < 4.57 has no Qwen3-VL
        return False
    return isinstance(processor, Qwen3VLProcessor)


def prepare_inputs(processor: Any, messages: List[Dict[str, Any]]) -> Any:
    """Tokenise a chat with videos: chat template, qwen-vl-utils frame loading, processor.

    Frames are read by qwen-vl-utils (decord), or with PyAV for videos decord cannot read
    (``psa_vlm.video.decode.pyav_fallback``). Works for the processor of every supported family, each called
    the way its model card does:

    - Qwen2-VL / Qwen2.5-VL (patch 14): the frames' ``video_metadata`` goes to the processor (otherwise
      transformers 5.x assumes 24 fps and Qwen2.5-VL's temporal positions ``second_per_grid_ts`` are wrong),
      and the video processor's per-frame pixel range is set to the messages' so that it does not resize the
      frames a second time;
    - Qwen3-VL / Qwen3-VL-MoE (patch 16): qwen-vl-utils resizes to multiples of 32 px
      (``image_patch_size=16``) and the processor gets ``do_resize=False`` and the ``video_metadata``, from
      which it writes a ``<t seconds>`` timestamp before every temporal patch (Qwen3-VL model card;
      lmms-eval's ``qwen3_vl`` does the same).

    Returns:
        The processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values_videos``,
        ``video_grid_thw``, and ``second_per_grid_ts`` for Qwen2.5-VL) on the CPU.
    """
    from qwen_vl_utils import process_vision_info

    from .video.decode import pyav_fallback

    qwen3 = _is_qwen3_processor(processor)
    patch = int(getattr(getattr(processor, "image_processor", None), "patch_size", None) or (16 if qwen3 else 14))
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pyav_fallback():  # videos decord cannot read are read with PyAV (qwen-vl-utils' fallback is broken)
        images, videos, video_kwargs = process_vision_info(
            messages, return_video_kwargs=True, return_video_metadata=True, image_patch_size=patch
        )
    kwargs: Dict[str, Any] = dict(video_kwargs or {})
    metadata = None
    if videos is not None:
        videos, metadata = (list(x) for x in zip(*videos))
        pix = [
            (c.get("min_pixels", DEFAULT_MIN_PIXELS), c.get("max_pixels", DEFAULT_MAX_PIXELS))
            for m in messages
            if isinstance(m.get("content"), list)
            for c in m["content"]
            if isinstance(c, dict) and c.get("type") == "video"
        ]
        if qwen3:
            kwargs["do_resize"] = False
        elif pix:
            lo = min(p[0] for p in pix)
            hi = max(p[1] for p in pix)
            kwargs["videos_kwargs"] = {"size": {"shortest_edge": int(lo), "longest_edge": int(max(hi, lo))}}
    return processor(
        text=[text],
        images=images,
        videos=videos,
        video_metadata=metadata,
        padding=True,
        return_tensors="pt",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- timing
def _language_model(model: Any) -> Any:
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        lm = getattr(model, "language_model", None)
    if lm is None:
        raise TypeError(f"{type(model).__name__} has no language_model; expected a Qwen VL model")
    return lm


def _vision_model(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None) or getattr(model, "visual", None)


class PrefillTimer:
    """Times the prefill of a ``generate``: the first forward calls after ``reset()``.

    Forward hooks (CUDA synchronised) give ``prefill_s`` (the language model's first forward: the part PSA
    changes), ``vision_s`` (the vision encoder's first forward) and ``first_forward_s`` (the whole model's first
    forward, which includes the vision encoder only in transformers versions that run it there; newer ones
    encode the video before the first forward). ``first_forward_end`` is the ``time.perf_counter()`` value at
    the end of the first forward, so that a caller who noted the start of ``generate`` gets the time to the
    first token's logits.

    Example:
        >>> with PrefillTimer(model) as timer:  # doctest: +SKIP
        ...     model.generate(**inputs, max_new_tokens=8)
        ...     print(timer.prefill_s, timer.vision_s, timer.prompt_tokens)
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.language_model = _language_model(model)
        self.vision_model = _vision_model(model)
        self._handles: List[Any] = []
        self.reset()

    def reset(self) -> None:
        """Forget the last measurement; the next forward calls are timed."""
        self.prefill_s: Optional[float] = None
        self.vision_s: Optional[float] = None
        self.first_forward_s: Optional[float] = None
        self.first_forward_end: Optional[float] = None
        self.prompt_tokens: Optional[int] = None
        self._start: Dict[str, float] = {}

    @staticmethod
    def now() -> float:
        """``time.perf_counter()`` after a CUDA synchronisation (when CUDA is in use)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, key: str) -> Any:
        def hook(module, args, kwargs) -> None:
            if getattr(self, key) is None and key not in self._start:
                if key == "prefill_s":
                    emb = kwargs.get("inputs_embeds")
                    ids = kwargs.get("input_ids")
                    ref = emb if emb is not None else (ids if ids is not None else (args[0] if args else None))
                    if ref is not None and hasattr(ref, "shape") and len(ref.shape) >= 2:
                        self.prompt_tokens = int(ref.shape[1])
                self._start[key] = self.now()

        return hook

    def _post(self, key: str) -> Any:
        def hook(module, args, kwargs, output) -> None:
            if getattr(self, key) is None and key in self._start:
                end = self.now()
                setattr(self, key, end - self._start[key])
                if key == "first_forward_s":
                    self.first_forward_end = end

        return hook

    def attach(self) -> "PrefillTimer":
        """Register the hooks (idempotent)."""
        if not self._handles:
            targets = [("first_forward_s", self.model), ("prefill_s", self.language_model)]
            if self.vision_model is not None:
                targets.append(("vision_s", self.vision_model))
            for key, module in targets:
                self._handles.append(module.register_forward_pre_hook(self._pre(key), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post(key), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PrefillTimer":
        self.reset()
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


@dataclass
class GenerationTiming:
    """Timings of one ``generate`` call (seconds; ``nan`` where a hook did not fire).

    Attributes:
        prefill_s: Language-model prefill (the first forward of the language model).
        vision_s: Vision encoder.
        ttft_s: From the start of ``generate`` to the first token's logits (preprocessing inside
            ``generate``, vision encoder and prefill).
        total_s: The whole ``generate``.
        prompt_tokens: Prompt length in tokens.
        new_tokens: Generated tokens.
    """

    prefill_s: float
    vision_s: float
    ttft_s: float
    total_s: float
    prompt_tokens: int
    new_tokens: int


def generate_timed(
    model: Any, inputs: Any, *, max_new_tokens: int = 16, **gen_kwargs: Any
) -> Tuple[torch.Tensor, GenerationTiming]:
    """Greedy ``model.generate`` on ``inputs`` (moved to the model's device) with prefill timing.

    Returns:
        ``(new_token_ids [B, T], timing)``.
    """
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens)
    kwargs.update(gen_kwargs)
    nan = float("nan")
    with PrefillTimer(model) as timer, torch.inference_mode():
        t0 = timer.now()
        out = model.generate(**inputs, **kwargs)
        total = timer.now() - t0
    prompt_len = int(inputs["input_ids"].shape[1])
    new = out[:, prompt_len:]
    timing = GenerationTiming(
        prefill_s=float(timer.prefill_s if timer.prefill_s is not None else nan),
        vision_s=float(timer.vision_s if timer.vision_s is not None else nan),
        ttft_s=float(timer.first_forward_end - t0 if timer.first_forward_end is not None else nan),
        total_s=float(total),
        prompt_tokens=int(timer.prompt_tokens or prompt_len),
        new_tokens=int(new.shape[1]),
    )
    return new, timing


# ---------------------------------------------------------------------------------------------- statistics
def summarize_psa_stats(stats: Optional[Dict[str, Any]], n_layers: Optional[int] = None) -> Dict[str, Any]:
    """Reduce ``psa_vlm.psa_stats(model)`` to ``{"density", "histogram", "layers", "engaged"}``.

    Args:
        stats: What ``psa_stats`` returns: ``{"layers": {idx: {"density", "histogram", ...}}, "density",
            "histogram"}``, listing only the layers that ran PSA in the last prefill.
        n_layers: Decoder layers of the model; with it ``layers`` has one entry per layer.

    Returns:
        ``density``: mean over the layers that ran PSA (``None`` if none did, e.g. a prompt shorter than
        ``min_seq_len``); ``histogram``: level fractions (``full``/``pool2``/``pool4``/``pool8``/``skip``) or
        ``None``; ``layers``: per-layer densities in layer order, ``None`` for a layer that ran dense;
        ``engaged``: whether any layer ran PSA.
    """
    stats = stats or {}
    per = stats.get("layers") or {}
    if n_layers is None:
        layers = [per[k].get("density") for k in sorted(per)]
    else:
        layers = [per[i].get("density") if i in per else None for i in range(n_layers)]
    density = stats.get("density")
    return {
        "density": None if density is None else float(density),
        "histogram": stats.get("histogram"),
        "layers": layers,
        "engaged": density is not None,
    }
