"""Synthetic video QA: generator -> mp4 -> decord -> qwen-vl-utils -> processor -> tiny Qwen2.5-VL.

Checks that the answers are in the frames the metadata names (decoded back with decord), that even sampling
sees every event, and that the processor gets the frame metadata: the expected number of video tokens and
``second_per_grid_ts`` (hence the temporal mRoPE positions) matching the sampled frame rate.
"""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from psa_vlm.video import synth
from psa_vlm.video.synth import COLORS, KINDS, LETTERS, _shape_mask, make_clip, make_dataset, plan_clip

decord = pytest.importorskip("decord")


def _decode(path):
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.int32), float(vr.get_avg_fps())


def _saturated_frames(frames):
    """Per frame: does it hold a visible patch of colour (the background is grey)?"""
    sat = frames.max(-1) - frames.min(-1)
    return (sat > 60).reshape(len(frames), -1).mean(1) > 0.01


def _nearest_color(rgb):
    return min(COLORS, key=lambda c: np.abs(np.asarray(COLORS[c]) - rgb).sum())


def _best_shape(frame, box):
    top, left, size = box
    region = frame[top : top + size, left : left + size]
    coloured = (region.max(-1) - region.min(-1)) > 60

    def iou(shape):
        m = _shape_mask(shape, size)
        return (m & coloured).sum() / max((m | coloured).sum(), 1)

    return max(synth.SHAPES, key=iou)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frames,seed", [(16, 0), (48, 5)])
def test_answer_is_in_the_named_frames(tmp_path, kind, frames, seed):
    item = make_clip(tmp_path / "c.mp4", kind, frames=frames, width=112, height=84, fps=8.0, seed=seed)
    assert len(item.choices) == 4 and item.answer in LETTERS and len(set(item.choices)) == 4
    video, fps = _decode(item.video)
    assert video.shape == (frames, 84, 112, 3) and fps == pytest.approx(8.0)

    expected = np.zeros(frames, bool)
    for e in item.events:
        expected[e.start : e.end] = True
        assert e.end - e.start == item.event_frames
    np.testing.assert_array_equal(_saturated_frames(video), expected)  # colour exactly in the event frames

    for e in item.events:  # each event shows its colour and shape
        top, left, size = e.box
        frame = video[(e.start + e.end) // 2]
        mask = _shape_mask(e.shape, size)
        assert _nearest_color(frame[top : top + size, left : left + size][mask].mean(0)) == e.color
        assert _best_shape(frame, e.box) == e.shape

    # the right choice is what the frames show
    if kind == "needle_color":
        assert item.answer_text == item.events[0].color
    elif kind == "needle_shape":
        assert item.answer_text == item.events[0].shape
    elif kind == "order":
        first, second = sorted(item.events, key=lambda e: e.start)
        assert first.end <= second.start
        assert item.answer_text == f"the {first.label}, then the {second.label}"
    else:  # count: number of separate runs of coloured frames
        on = _saturated_frames(video).astype(int)
        runs = int(np.sum(np.diff(np.concatenate([[0], on])) == 1))
        assert item.answer_text == str(runs) == str(len(item.events))


def test_plan_is_deterministic_and_validated():
    a = plan_clip("order", frames=64, seed=3)
    b = plan_clip("order", frames=64, seed=3)
    assert a.to_dict() == b.to_dict()
    assert plan_clip("order", frames=64, seed=4).to_dict() != a.to_dict()
    with pytest.raises(ValueError, match="unknown question kind"):
        plan_clip("nope")
    with pytest.raises(ValueError, match="even"):
        plan_clip("count", width=113)
    with pytest.raises(ValueError, match="frames"):
        plan_clip("order", frames=16, event_frames=8)


def test_dataset_roundtrip(tmp_path):
    jsonl = make_dataset(tmp_path / "ds", 5, frames=16, width=64, height=48, fps=4.0, seed=2)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["kind"] for r in lines] == [KINDS[i % 4] for i in range(5)]
    assert all(not Path(r["video"]).is_absolute() for r in lines)  # relocatable
    items = synth.load_dataset(jsonl)
    assert [it.id for it in items] == [f"test-{i:05d}" for i in range(5)]
    for it in items:
        assert Path(it.video).is_file() and it.answer in LETTERS
    before = jsonl.stat().st_mtime_ns
    assert make_dataset(tmp_path / "ds", 5, frames=16, width=64, height=48, fps=4.0, seed=2) == jsonl
    assert jsonl.stat().st_mtime_ns == before  # kept, not regenerated


def test_bundled_clip():
    item = synth.default_clip()
    path = Path(item.video)
    assert path.is_file() and path.stat().st_size < 1_000_000
    args = dict(synth.DEFAULT_CLIP_ARGS)
    plan = plan_clip(args.pop("kind"), **args)
    assert (item.question, item.choices, item.answer) == (plan.question, plan.choices, plan.answer)
    assert [e.box for e in item.events] == [e.box for e in plan.events]
    video, _ = _decode(path)
    assert len(video) == item.frames
    e = item.events[0]
    top, left, size = e.box
    patch = video[e.start, top : top + size, left : left + size].reshape(-1, 3)
    assert _nearest_color(patch.mean(0)) == item.answer_text


def test_sampling_sees_every_event(tmp_path):
    """qwen-vl-utils' even sampling of 16 frames from a 128-frame clip lands in every event."""
    from qwen_vl_utils import process_vision_info

    from psa_vlm.inference import video_messages

    for seed in range(4):
        item = make_clip(tmp_path / f"c{seed}.mp4", "count", frames=128, width=56, height=56, fps=8.0, seed=seed)
        msgs = video_messages(item.video, "q", nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
        _, videos, _ = process_vision_info(msgs, return_video_kwargs=True, return_video_metadata=True)
        (frames, meta), = videos
        idx = meta["frames_indices"]
        assert len(idx) == 16 and frames.shape[0] == 16
        for e in item.events:
            assert any(e.start <= i < e.end for i in idx), (seed, e, idx)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from psa_vlm.inference import load_qwen25vl

    return load_qwen25vl(tiny_checkpoint, device="cpu")


@pytest.mark.parametrize("sampling", ["all-frames", "fps"])
def test_processor_and_model(tmp_path, tiny_model, sampling):
    from psa_vlm.inference import prepare_inputs, video_messages

    model, processor = tiny_model
    item = make_clip(tmp_path / "c.mp4", "needle_color", frames=32, width=112, height=84, fps=8.0, seed=1)
    if sampling == "all-frames":
        msgs = video_messages(item.video, item.prompt(), nframes=32, min_pixels=3136, max_pixels=112 * 84)
        n_frames, sampled_fps = 32, 8.0
    else:  # 2 frames per second of a 4 s clip: 8 frames
        msgs = video_messages(item.video, item.prompt(), fps=2.0, min_pixels=3136, max_pixels=112 * 84)
        n_frames, sampled_fps = 8, 2.0
    inputs = prepare_inputs(processor, msgs)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert (t, h, w) == (n_frames // 2, 84 // 14, 112 // 14)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video == t * h * w // 4  # 2x2 spatial merge
    # frame metadata reached the processor: seconds per temporal patch = temporal_patch_size / sampled fps
    assert inputs["second_per_grid_ts"][0].item() == pytest.approx(2 / sampled_fps)

    # temporal mRoPE positions of the video tokens: temporal patch i sits at i * second_per_grid_ts *
    # tokens_per_second (truncated), i.e. at its time in the video
    rope = model.model.get_rope_index
    params = inspect.signature(rope).parameters
    kw = {k: inputs[k] for k in ("mm_token_type_ids", "video_grid_thw", "second_per_grid_ts", "attention_mask")
          if k in params and k in inputs}
    pos, _ = rope(inputs["input_ids"], **kw)
    is_video = inputs["input_ids"][0] == model.config.video_token_id
    temporal = pos[0, 0][is_video].view(t, -1)
    assert (temporal == temporal[:, :1]).all()  # one temporal position per temporal patch
    step = model.config.vision_config.tokens_per_second * 2 / sampled_fps
    expected = (torch.arange(t, dtype=torch.float64) * step).long()
    torch.testing.assert_close(temporal[:, 0] - temporal[0, 0], expected)

    with torch.inference_mode():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()
