"""Frame reading for videos that decord cannot read: PyAV, behind qwen-vl-utils' own sampling.

qwen-vl-utils reads a video with decord and, when decord raises, falls back to ``torchvision.io.read_video``,
which torchvision removed (0.2x), so such a video fails with ``module 'torchvision.io' has no attribute
'read_video'``. decord 0.6 also returns frames with the wrong channel count, without raising, for small or
narrow frames (e.g. 16x16, 24x24, 16x512 H.264: 4 or 6 "channels"). PyAV, a dependency of psa_vlm, decodes
all of them.

``pyav_fallback()`` is a context manager around ``qwen_vl_utils.process_vision_info``: for its duration the
decord reader is checked (a frame tensor that is not ``[T, 3, H, W]`` counts as a failure) and the broken
torchvision fallback is replaced by ``read_video_pyav``, which samples the same frames as qwen-vl-utils'
decord reader (its own ``smart_nframes`` and frame-range rules) and returns the same
``(frames uint8 [T, 3, H, W], metadata, sample_fps)``. The override lives only inside the ``with`` block
(not thread-safe across threads that use qwen-vl-utils at the same time).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Tuple

import torch

__all__ = ["PyAVInfo", "probe_pyav", "read_video_pyav", "pyav_fallback", "decord_frames_ok"]

logger = logging.getLogger(__name__)


@dataclass
class PyAVInfo:
    """Frame count, average rate and size of the first video stream, as PyAV reports them."""

    frames: int
    fps: float
    width: int
    height: int


def _local_path(path: str) -> str:
    return path[7:] if path.startswith("file://") else path


def probe_pyav(path: str) -> PyAVInfo:
    """Frames, rate and size of ``path``'s first video stream (frames counted by demuxing if the container
    does not say).

    Raises:
        av.error.FFmpegError / ValueError: The file cannot be opened or has no video stream.
    """
    import av

    with av.open(_local_path(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path!r} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        n = int(stream.frames or 0)
        if n <= 0:
            n = sum(1 for packet in container.demux(stream) if packet.size)
        return PyAVInfo(n, fps, int(stream.codec_context.width), int(stream.codec_context.height))


def read_video_pyav(ele: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any], float]:
    """qwen-vl-utils video reader contract, with PyAV: ``ele`` is the message's video item.

    Samples the frames qwen-vl-utils' decord reader samples (``calculate_video_frame_range`` for
    ``video_start``/``video_end``, ``smart_nframes`` for ``nframes``/``fps``/``max_frames``, evenly spaced
    indices) and decodes only those, so memory stays at the sampled frames.

    Returns:
        ``(frames uint8 [T, 3, H, W], {"fps", "frames_indices", "total_num_frames", "video_backend"}, sample_fps)``.
    """
    import av
    from qwen_vl_utils import vision_process as vp

    path = _local_path(str(ele["video"]))
    info = probe_pyav(path)
    if info.frames < 1 or info.fps <= 0:
        raise ValueError(f"{path!r}: PyAV reports {info.frames} frames at {info.fps} fps")
    total, fps = info.frames, info.fps
    frame_range = getattr(vp, "calculate_video_frame_range", None)
    start, end = 0, total - 1
    if frame_range is not None:
        start, end, total = frame_range(ele, total, fps)
    nframes = vp.smart_nframes(ele, total_frames=total, video_fps=fps)
    idx = torch.linspace(start, end, nframes).round().long().tolist()
    wanted: Dict[int, int] = {}
    for pos, i in enumerate(idx):
        wanted.setdefault(i, pos)
    frames: Dict[int, torch.Tensor] = {}
    with av.open(path) as container:
        for n, frame in enumerate(container.decode(video=0)):
            if n in wanted:
                frames[n] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            if n >= idx[-1]:
                break
    missing = [i for i in idx if i not in frames]
    if missing:
        raise ValueError(f"{path!r}: PyAV decoded fewer frames than the {info.frames} it reported")
    video = torch.stack([frames[i] for i in idx])
    sample_fps = nframes / max(total, 1e-6) * fps
    meta = dict(fps=fps, frames_indices=idx, total_num_frames=total, video_backend="pyav")
    return video, meta, sample_fps


def decord_frames_ok(video: Any) -> bool:
    """Whether a decord-read frame tensor looks like RGB frames ``[T, 3, H, W]`` (decord 0.6 returns 4 or 6
    "channels" for some small widths without raising)."""
    return isinstance(video, torch.Tensor) and video.dim() == 4 and video.shape[1] == 3


@contextlib.contextmanager
def pyav_fallback() -> Iterator[None]:
    """Within the block, qwen-vl-utils reads with decord where decord works and with PyAV otherwise.

    No-op if qwen-vl-utils is not importable.
    """
    try:
        from qwen_vl_utils import vision_process as vp
    except ImportError:  # pragma: no cover - qwen-vl-utils is a dependency
        yield
        return
    backends = getattr(vp, "VIDEO_READER_BACKENDS", None)
    if not isinstance(backends, dict):  # pragma: no cover - another qwen-vl-utils layout
        yield
        return
    decord_reader = backends.get("decord")

    def checked_decord(ele: Dict[str, Any]):
        out = decord_reader(ele)
        if not decord_frames_ok(out[0]):
            raise ValueError(f"decord returned frames of shape {tuple(out[0].shape)} (not [T, 3, H, W])")
        return out

    def pyav_reader(ele: Dict[str, Any]):
        logger.info("reading %s with PyAV (decord cannot read it)", ele.get("video"))
        return read_video_pyav(ele)

    override = {"torchvision": pyav_reader}  # qwen-vl-utils' fallback after any reader error
    if decord_reader is not None:
        override["decord"] = checked_decord
    saved = {key: backends.get(key) for key in override}
    backends.update(override)
    try:
        yield
    finally:
        for key, fn in saved.items():
            if fn is None:
                backends.pop(key, None)
            else:
                backends[key] = fn
