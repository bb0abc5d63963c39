"""Synthetic long-video QA: short mp4 clips whose answers are tied to particular frames.

Every clip is a grey, slowly moving background (a vertical gradient, a bright scan bar and a bouncing
grey ball: all colourless, so the only saturated pixels are the ones a question is about) with one or
more *events*: a coloured shape drawn over a run of consecutive frames. Four kinds of question:

- ``needle_color``: one coloured square appears once; which colour is it?
- ``needle_shape``: one coloured shape appears once; which shape is it?
- ``order``: two different coloured shapes appear one after the other; in which order?
- ``count``: a coloured square flashes 1-4 times; how many times?

Each item is a multiple-choice question with four choices (letters A-D) and one right answer. The
frames that carry the answer are recorded in ``VideoQA.events`` (``[start, end)`` frame ranges), so
tests can check the decoded video against the answer.

Sampling guarantee: every event lasts ``event_frames`` frames and events are separated by at least
``event_frames`` frames, so any sampler that takes frames at most ``event_frames`` apart (for example
qwen-vl-utils' even sampling of 16 or more frames with the default ``event_frames``) sees every event
and never merges two flashes.

Example:
    >>> from psa_vlm.video.synth import make_clip
    >>> item = make_clip("/tmp/clip.mp4", "needle_color", frames=32, seed=3)  # doctest: +SKIP
    >>> item.prompt()  # doctest: +SKIP
    'A coloured square appears briefly in the video. What colour is it?\\nA. red\\nB. ...'

A dataset (one jsonl line per item, video paths relative to the jsonl)::

    python -m psa_vlm.video.synth --out /tmp/synth --n 32 --frames 64 --fps 8

(the lmms-eval tasks in ``eval/tasks/psa_synth`` generate their own data with fixed seeds:
``python eval/tasks/psa_synth/utils.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "KINDS",
    "COLORS",
    "SHAPES",
    "LETTERS",
    "ANSWER_INSTRUCTION",
    "Event",
    "VideoQA",
    "plan_clip",
    "render_frames",
    "write_video",
    "make_clip",
    "make_dataset",
    "ensure_video",
    "load_dataset",
    "OFFLINE_TASKS",
    "default_clip",
    "default_event_frames",
]

logger = logging.getLogger(__name__)

#: Question kinds.
KINDS: Tuple[str, ...] = ("needle_color", "needle_shape", "order", "count")

#: Needle colours (saturated RGB, far apart after yuv420p compression).
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 20),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}

#: Needle shapes.
SHAPES: Tuple[str, ...] = ("square", "circle", "triangle", "cross")

#: Choice letters.
LETTERS: Tuple[str, ...] = ("A", "B", "C", "D")

#: The instruction appended to every prompt (the same wording lmms-eval's Video-MME task uses).
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------- items
@dataclass
class Event:
    """A coloured shape drawn over frames ``[start, end)``.

    Attributes:
        start: First frame index of the event.
        end: One past its last frame index.
        color: Key of ``COLORS``.
        shape: One of ``SHAPES``.
        box: ``(top, left, size)`` of the square the shape is drawn in, in pixels.
    """

    start: int
    end: int
    color: str
    shape: str
    box: Tuple[int, int, int]

    @property
    def label(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"

    @property
    def frames(self) -> range:
        return range(self.start, self.end)


@dataclass
class VideoQA:
    """One synthetic multiple-choice video question.

    Attributes:
        id: Unique id (``"<kind>-<seed>"``).
        video: Path of the mp4 (relative to the dataset's jsonl inside a dataset; ``""`` before rendering).
        kind: One of ``KINDS``.
        question: Question text (without the choices).
        choices: Four answer texts, in letter order A-D.
        answer: The right letter.
        frames: Number of frames in the clip.
        fps: Frames per second of the clip.
        width: Frame width in pixels.
        height: Frame height in pixels.
        seed: Seed the clip was generated from (same seed, same clip).
        event_frames: Length of every event in frames.
        events: The events in time order; their frames carry the answer.
    """

    id: str
    video: str
    kind: str
    question: str
    choices: List[str]
    answer: str
    frames: int
    fps: float
    width: int
    height: int
    seed: int
    event_frames: int
    events: List[Event] = field(default_factory=list)

    @property
    def answer_text(self) -> str:
        """The text of the right choice."""
        return self.choices[LETTERS.index(self.answer)]

    @property
    def duration(self) -> float:
        """Clip length in seconds."""
        return self.frames / self.fps

    def options(self) -> List[str]:
        """``["A. red", "B. blue", ...]``."""
        return [f"{letter}. {text}" for letter, text in zip(LETTERS, self.choices)]

    def prompt(self, instruction: str = ANSWER_INSTRUCTION) -> str:
        """Question, one choice per line, then ``instruction``."""
        lines = [self.question, *self.options()]
        if instruction:
            lines.append(instruction)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict (the jsonl record)."""
        d = dataclasses.asdict(self)
        d["events"] = [
            {"start": e.start, "end": e.end, "color": e.color, "shape": e.shape, "box": list(e.box)}
            for e in self.events
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VideoQA":
        """Inverse of ``to_dict`` (extra keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["events"] = [
            Event(int(e["start"]), int(e["end"]), e["color"], e["shape"], tuple(int(x) for x in e["box"]))
            for e in d.get("events", [])
        ]
        kw["choices"] = list(kw["choices"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------- planning
def default_event_frames(frames: int) -> int:
    """Event length such that even sampling of 16 or more frames sees every event.

    ``linspace(0, frames - 1, 16)`` rounded leaves gaps of at most ``ceil((frames - 1) / 15)`` frames; one
    more frame absorbs the rounding. At least 2 (one temporal patch of Qwen2.5-VL).
    """
    return max(2, math.ceil((frames - 1) / 15) + 1)


def _validate_geometry(frames: int, width: int, height: int, fps: float) -> None:
    for name, val in (("frames", frames), ("width", width), ("height", height)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if frames < 8:
        raise ValueError(f"frames must be at least 8 (room for an event and its gaps), got {frames}")
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and at least 32 (yuv420p), got {width}x{height}")
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def _place_events(rng: np.random.Generator, n: int, length: int, frames: int) -> List[int]:
    """Start frames of ``n`` events of ``length`` frames, gaps of at least ``length`` between them and
    at least one frame before the first and after the last."""
    slack = frames - 2 - (2 * n - 1) * length
    if slack < 0:
        raise ValueError(
            f"{n} events of {length} frames need at least {(2 * n - 1) * length + 2} frames, got {frames}; "
            "use more frames or a smaller event_frames"
        )
    # distribute the slack over n + 1 gaps uniformly at random (stars and bars)
    cuts = np.sort(rng.integers(0, slack + 1, size=n))
    extra = np.diff(np.concatenate([[0], cuts]))
    starts, pos = [], 1
    for i in range(n):
        pos += int(extra[i])
        starts.append(pos)
        pos += 2 * length
    return starts


def _random_box(rng: np.random.Generator, width: int, height: int) -> Tuple[int, int, int]:
    size = max(8, int(0.45 * min(width, height)))
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left, size


def _shuffled_choices(rng: np.random.Generator, right: str, wrong: Sequence[str]) -> Tuple[List[str], str]:
    options = [right, *wrong[:3]]
    order = rng.permutation(4)
    choices = [options[i] for i in order]
    return choices, LETTERS[choices.index(right)]


def plan_clip(
    kind: str,
    *,
    frames: int = 64,
    width: int = 224,
    height: int = 168,
    fps: float = 8.0,
    seed: int = 0,
    event_frames: Optional[int] = None,
) -> VideoQA:
    """Draw the question, choices, answer and event timeline of one clip (nothing is rendered).

    Args:
        kind: One of ``KINDS``.
        frames: Number of frames.
        width: Frame width (even, >= 32).
        height: Frame height (even, >= 32).
        fps: Frames per second.
        seed: Random seed; the same arguments give the same item.
        event_frames: Length of each event in frames (default ``default_event_frames(frames)``).

    Returns:
        A ``VideoQA`` with ``video == ""``.

    Raises:
        ValueError: Unknown kind, bad geometry, or too few frames for the events.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {', '.join(KINDS)}")
    _validate_geometry(frames, width, height, fps)
    length = default_event_frames(frames) if event_frames is None else int(event_frames)
    if length < 1:
        raise ValueError(f"event_frames must be >= 1, got {event_frames!r}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    colors = list(COLORS)

    def event(start: int, color: str, shape: str) -> Event:
        return Event(start, start + length, color, shape, _random_box(rng, width, height))

    if kind == "needle_color":
        pick = [colors[i] for i in rng.permutation(len(colors))[:4]]
        (start,) = _place_events(rng, 1, length, frames)
        events = [event(start, pick[0], "square")]
        question = "A coloured square appears briefly in the video. What colour is it?"
        choices, answer = _shuffled_choices(rng, pick[0], pick[1:])
    elif kind == "needle_shape":
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
        color = colors[int(rng.integers(len(colors)))]
        (start,) = _place_events(rng, 1, length, frames)
        events = [event(start, color, shapes[0])]
        question = "A coloured shape appears briefly in the video. What shape is it?"
        choices, answer = _shuffled_choices(rng, shapes[0], shapes[1:])
    elif kind == "order":
        c = [colors[i] for i in rng.permutation(len(colors))[:3]]
        s = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:3]]
        first, second, other = f"{c[0]} {s[0]}", f"{c[1]} {s[1]}", f"{c[2]} {s[2]}"
        starts = _place_events(rng, 2, length, frames)
        events = [event(starts[0], c[0], s[0]), event(starts[1], c[1], s[1])]
        question = "Two coloured shapes appear one after the other in the video. In which order do they appear?"
        right = f"the {first}, then the {second}"
        wrong = [f"the {second}, then the {first}", f"the {first}, then the {other}", f"the {other}, then the {second}"]
        choices, answer = _shuffled_choices(rng, right, wrong)
    else:  # count
        max_count = 4
        while max_count > 1 and (2 * max_count - 1) * length + 2 > frames:
            max_count -= 1
        count = int(rng.integers(1, max_count + 1))
        color = colors[int(rng.integers(len(colors)))]
        starts = _place_events(rng, count, length, frames)
        box = _random_box(rng, width, height)
        events = [Event(st, st + length, color, "square", box) for st in starts]
        question = f"A {color} square flashes on and off during the video. How many times does it appear?"
        choices = [str(i) for i in range(1, 5)]
        answer = LETTERS[count - 1]
    return VideoQA(
        id=f"{kind}-{seed}",
        video="",
        kind=kind,
        question=question,
        choices=choices,
        answer=answer,
        frames=frames,
        fps=float(fps),
        width=width,
        height=height,
        seed=seed,
        event_frames=length,
        events=events,
    )


# ---------------------------------------------------------------------------------------------- rendering
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape filling its square."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2.0
    if shape == "square":
        m = 0.1 * size
        return (yy > m) & (yy < size - m) & (xx > m) & (xx < size - m)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (0.45 * size) ** 2
    if shape == "triangle":
        top, bottom = 0.08 * size, 0.92 * size
        frac = (yy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - c) <= frac * 0.46 * size)
    if shape == "cross":
        half = size / 6.0
        m = 0.05 * size
        inside = (yy > m) & (yy < size - m) & (xx > m) & (xx < size - m)
        return inside & ((np.abs(yy - c) <= half) | (np.abs(xx - c) <= half))
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _background(t: int, frames: int, width: int, height: int, seed: int) -> np.ndarray:
    """Grey ``[H, W, 3]`` uint8 frame ``t``: gradient, moving scan bar and bouncing ball (no colour)."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = (seed % 97) / 97.0
    u = t / max(frames - 1, 1)
    img = 55.0 + 40.0 * y + 15.0 * np.sin(2 * np.pi * (x + 0.5 * u + phase))
    bar_y = ((u * 1.7 + phase) % 1.0) * height
    img = img + 45.0 * np.exp(-(((y * height) - bar_y) ** 2) / (2 * (0.04 * height) ** 2))
    # bouncing ball
    r = 0.08 * min(width, height)
    bx = r + abs(((u * 2.3 + phase) % 2.0) - 1.0) * (width - 2 * r)
    by = r + abs(((u * 1.3 + 0.5 * phase) % 2.0) - 1.0) * (height - 2 * r)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.where((yy - by) ** 2 + (xx - bx) ** 2 <= r * r, 175.0, img)
    g = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def render_frames(item: VideoQA) -> Iterator[np.ndarray]:
    """Yield the clip's frames as uint8 RGB ``[height, width, 3]`` arrays."""
    masks = {id(e): _shape_mask(e.shape, e.box[2]) for e in item.events}
    for t in range(item.frames):
        img = _background(t, item.frames, item.width, item.height, item.seed)
        for e in item.events:
            if e.start <= t < e.end:
                top, left, size = e.box
                region = img[top : top + size, left : left + size]
                region[masks[id(e)]] = COLORS[e.color]
        yield img


def write_video(
    frames: Union[Iterator[np.ndarray], Sequence[np.ndarray]],
    path: PathLike,
    fps: float,
    *,
    crf: int = 20,
) -> Path:
    """Encode uint8 RGB frames ``[H, W, 3]`` as an H.264 mp4 (yuv420p) with PyAV.

    Args:
        frames: Frames, all the same even size.
        path: Output file; its directory must exist. Written atomically (temporary file, then rename).
        fps: Frame rate (a non-integer rate is stored as the nearest fraction).
        crf: x264 constant rate factor (lower: larger, sharper).

    Returns:
        ``path`` as a ``Path``.
    """
    import av  # PyAV: imported here so that importing this module stays cheap

    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix=f".{path.stem}-", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = None
            for img in frames:
                if stream is None:
                    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    stream.height, stream.width = int(img.shape[0]), int(img.shape[1])
                    stream.pix_fmt = "yuv420p"
                    stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "stillimage"}
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            if stream is None:
                raise ValueError("write_video got no frames")
            for packet in stream.encode():
                container.mux(packet)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def make_clip(
    path: PathLike,
    kind: str = "needle_color",
    *,
    frames: int = 64,
    width: int = 224,
    height: int = 168,
    fps: float = 8.0,
    seed: int = 0,
    event_frames: Optional[int] = None,
    crf: int = 20,
) -> VideoQA:
    """Plan one question (``plan_clip``) and write its video to ``path``.

    Returns:
        The ``VideoQA`` with ``video`` set to ``str(path)``.
    """
    item = plan_clip(kind, frames=frames, width=width, height=height, fps=fps, seed=seed, event_frames=event_frames)
    write_video(render_frames(item), path, fps, crf=crf)
    item.video = str(path)
    return item


# ---------------------------------------------------------------------------------------------- datasets
def make_dataset(
    out_dir: PathLike,
    n: int,
    *,
    kind: str = "mixed",
    frames: int = 64,
    width: int = 224,
    height: int = 168,
    fps: float = 8.0,
    seed: int = 0,
    event_frames: Optional[int] = None,
    name: str = "test",
    overwrite: bool = False,
    render: bool = True,
) -> Path:
    """Write ``n`` clips to ``out_dir/videos/`` and their questions to ``out_dir/<name>.jsonl``.

    Each jsonl line is ``VideoQA.to_dict()`` with ``video`` relative to ``out_dir`` (the dataset can be
    moved as a folder). Item ``i`` uses seed ``seed * 100003 + i``; with ``kind="mixed"`` the kinds cycle
    through ``KINDS``. The jsonl is written last and atomically, so its presence means the dataset is
    complete (or, with ``render=False``, planned); an existing one is kept unless ``overwrite``.

    Args:
        out_dir: Dataset folder (created).
        n: Number of items (> 0).
        kind: One of ``KINDS`` or ``"mixed"``.
        frames: Frames per clip.
        width: Frame width.
        height: Frame height.
        fps: Frames per second.
        seed: Dataset seed.
        event_frames: Event length in frames (default ``default_event_frames(frames)``).
        name: Stem of the jsonl file.
        overwrite: Regenerate even if the jsonl exists.
        render: Write the videos now; with ``False`` only the questions are planned (milliseconds) and each
            video is rendered on first use by ``ensure_video`` (the clip depends only on its record, so it is
            the same video either way).

    Returns:
        Path of the jsonl file.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if kind != "mixed" and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose 'mixed' or one of {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    jsonl = out_dir / f"{name}.jsonl"
    if jsonl.exists() and not overwrite:
        logger.info("dataset %s exists; keeping it (overwrite=True regenerates)", jsonl)
        return jsonl
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    kinds = KINDS if kind == "mixed" else (kind,)
    records = []
    for i in range(n):
        k = kinds[i % len(kinds)]
        item_seed = seed * 100003 + i
        rel = f"videos/{name}-{i:05d}-{k}.mp4"
        geometry = dict(frames=frames, width=width, height=height, fps=fps, seed=item_seed, event_frames=event_frames)
        if render:
            item = make_clip(out_dir / rel, k, **geometry)
        else:
            item = plan_clip(k, **geometry)
        item.id = f"{name}-{i:05d}"
        item.video = rel
        records.append(item.to_dict())
        if render and ((i + 1) % 16 == 0 or i + 1 == n):
            logger.info("synthetic videos: %d/%d written to %s", i + 1, n, video_dir)
    fd, tmp = tempfile.mkstemp(suffix=".jsonl", prefix=f".{name}-", dir=out_dir)
    with os.fdopen(fd, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, jsonl)
    return jsonl


def ensure_video(item: VideoQA, *, crf: int = 20) -> Path:
    """Render ``item.video`` (an absolute path) from the item's record unless the file exists.

    Safe under several processes: ``write_video`` writes a temporary file and renames it.
    """
    path = Path(item.video)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(render_frames(item), path, item.fps, crf=crf)
    return path


def load_dataset(jsonl: PathLike) -> List[VideoQA]:
    """Read a jsonl written by ``make_dataset``; ``video`` paths come back absolute."""
    jsonl = Path(jsonl)
    items = []
    with open(jsonl) as fh:
        for line in fh:
            if line.strip():
                item = VideoQA.from_dict(json.loads(line))
                item.video = str((jsonl.parent / item.video).resolve())
                items.append(item)
    return items


def default_clip() -> VideoQA:
    """The clip bundled with the package (``psa_vlm/data/default_clip.mp4`` and its ``.json``).

    It is ``plan_clip("needle_color", frames=32, width=112, height=112, fps=8.0, seed=7)``: 32 frames give
    256 video tokens at the bundled resolution (16 temporal groups of 4 x 4 merged patches).
    """
    from importlib import resources

    data = resources.files("psa_vlm") / "data"
    with resources.as_file(data / "default_clip.json") as p:
        item = VideoQA.from_dict(json.loads(Path(p).read_text()))
    with resources.as_file(data / "default_clip.mp4") as p:
        item.video = str(p)
    return item


#: The offline lmms-eval tasks of ``eval/tasks/psa_synth`` (``make_dataset`` arguments). 256 questions each (64
#: per kind), so that one question moves accuracy by less than 0.4 points. The first 64 (long) / 32 (short)
#: items are the questions of the earlier, smaller versions of the tasks (same seeds).
OFFLINE_TASKS: Dict[str, Dict[str, object]] = {
    # 16-frame clips (4 s at 4 fps): every frame can be given to the model.
    "psa_synth_short": dict(n=256, kind="mixed", frames=16, fps=4.0, width=224, height=168, seed=1),
    # 128-frame clips (16 s at 8 fps): needles last 10 frames, visible to any even sampling of >= 16 frames.
    "psa_synth_long": dict(n=256, kind="mixed", frames=128, fps=8.0, width=224, height=168, seed=2),
}


# Parameters of the bundled clip (regenerate with `python -m psa_vlm.video.synth --bundled`).
DEFAULT_CLIP_ARGS = dict(kind="needle_color", frames=32, width=112, height=112, fps=8.0, seed=7)


def _write_bundled(data_dir: Path) -> VideoQA:
    data_dir.mkdir(parents=True, exist_ok=True)
    args = dict(DEFAULT_CLIP_ARGS)
    item = make_clip(data_dir / "default_clip.mp4", args.pop("kind"), **args)
    item.id = "default_clip"
    item.video = "default_clip.mp4"
    (data_dir / "default_clip.json").write_text(json.dumps(item.to_dict(), indent=1) + "\n")
    return item


# ---------------------------------------------------------------------------------------------- command line
def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m psa_vlm.video.synth", description="write a synthetic video QA dataset (mp4 + jsonl)"
    )
    parser.add_argument("--out", type=Path, help="dataset folder (videos/ and <name>.jsonl go there)")
    parser.add_argument("--n", type=int, default=32, help="number of items (default 32)")
    parser.add_argument("--kind", default="mixed", choices=("mixed",) + KINDS)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--height", type=int, default=168)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--event-frames", type=int, default=None)
    parser.add_argument("--name", default="test", help="jsonl stem (default test)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--bundled", action="store_true", help="regenerate the clip bundled in psa_vlm/data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.bundled:
        item = _write_bundled(Path(__file__).resolve().parents[1] / "data")
        print(f"wrote psa_vlm/data/default_clip.mp4: {item.kind}, answer {item.answer} ({item.answer_text})")
        return 0
    if args.out is None:
        parser.error("--out is required (or --bundled)")
    try:
        path = make_dataset(
            args.out,
            args.n,
            kind=args.kind,
            frames=args.frames,
            width=args.width,
            height=args.height,
            fps=args.fps,
            seed=args.seed,
            event_frames=args.event_frames,
            name=args.name,
            overwrite=args.overwrite,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
