"""The shipped trained tiny Qwen2.5-VL answers the bundled clip through the normal inference path.

Dense (SDPA) attention; frames decoded by qwen-vl-utils + decord, the processor given ``video_metadata``,
``model.generate`` answering. A few seconds on a CPU.
"""

import json

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained_dir():
    from psa_vlm.models.trained import trained_tiny_checkpoint

    try:
        return trained_tiny_checkpoint()
    except FileNotFoundError as exc:  # no weights shipped yet (see psa_vlm/models/train_tiny.py)
        pytest.skip(str(exc))


def test_trained_checkpoint_is_marked_trained(trained_dir):
    from psa_vlm.inference import tiny_checkpoint_info

    path = trained_dir
    info = tiny_checkpoint_info(path)
    assert info is not None and info.get("trained") is True
    training = json.loads((path / "training.json").read_text())
    assert training["steps"] > 0 and "held_out" in training


def test_trained_tiny_answers_bundled_clip(trained_dir):
    import torch

    from psa_vlm.inference import frame_count, load_qwen25vl, prepare_inputs, probe_video, video_messages
    from psa_vlm.video.synth import default_clip

    item = default_clip()
    model, processor = load_qwen25vl(trained_dir, device="cpu", dtype=torch.float32)
    info = probe_video(item.video)
    messages = video_messages(item.video, item.prompt(), nframes=frame_count(info, max_frames=64))
    inputs = prepare_inputs(processor, messages)
    # the metadata reached the processor: temporal patch 2 / sampled fps (not the 24 fps default)
    assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(2 / info.fps, rel=1e-3)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert answer[:1] == item.answer, f"answered {answer!r}, expected {item.answer} ({item.answer_text})"


def test_missing_checkpoint_error_is_clear(monkeypatch, tmp_path):
    from psa_vlm.models import trained

    monkeypatch.setattr(trained, "__file__", str(tmp_path / "models" / "trained.py"))
    with pytest.raises(FileNotFoundError, match="train_tiny"):
        trained.trained_tiny_checkpoint()
