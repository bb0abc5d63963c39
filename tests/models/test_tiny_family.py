"""Tiny offline checkpoints of every supported family (``psa_vlm.models.tiny`` with ``family=``), each
with a real short video through its own processor."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

pytest.importorskip("transformers")

from psa_vlm.models import tiny  # noqa: E402
from psa_vlm.models.tiny_family import FAMILIES, family_spec  # noqa: E402

CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor"),
}


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_checkpoint_loads_and_takes_a_real_video(family, tiny_family_checkpoint, tiny_clip):
    import torch
    import transformers

    from psa_vlm.inference import prepare_inputs, video_messages

    path = tiny_family_checkpoint(family)
    assert json.loads((path / tiny.MARKER_FILE).read_text())["family"] == family
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    model, processor = _load(path)
    assert (type(model).__name__, type(processor).__name__) == CLASSES[family]
    # the family's own class loads it too
    assert type(getattr(transformers, CLASSES[family][0]).from_pretrained(path)) is type(model)
    tok, cfg = processor.tokenizer, model.config
    for attr, token in (("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert getattr(cfg, attr) == tok.convert_tokens_to_ids(token)
    text = cfg.get_text_config()
    assert (text.num_attention_heads, text.num_key_value_heads, getattr(text, "head_dim", 16)) == (4, 2, 16)
    assert text.hidden_size // text.num_attention_heads == 16
    assert cfg.vision_config.patch_size == processor.video_processor.patch_size == family_spec(family).patch_size
    if family == "qwen3_vl_moe":
        assert text.num_experts == 4 and text.num_experts_per_tok == 2

    nframes = 8
    msgs = video_messages(tiny_clip.video, "What colour is it?", nframes=nframes, min_pixels=64 * 64,
                          max_pixels=96 * 64)
    inputs = prepare_inputs(processor, msgs)
    ids = inputs["input_ids"][0].tolist()
    t, h, w = inputs["video_grid_thw"][0].tolist()
    merge = processor.video_processor.merge_size
    assert t == nframes // 2  # two frames per temporal patch
    per_frame = h * w // merge**2
    pad, start, end = cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    assert ids.count(pad) == t * per_frame
    prompt = tok.decode(ids)
    if family.startswith("qwen3"):
        # one "<t seconds>" + <|vision_start|> + pads + <|vision_end|> per temporal patch; t = mean time of the
        # two frames of the patch (qwen-vl-utils samples round(linspace(0, n - 1, nframes)))
        idx = np.linspace(0, tiny_clip.frames - 1, nframes).round()
        times = (idx[0::2] + idx[1::2]) / 2 / tiny_clip.fps
        frame = "<|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
        expected = "".join(f"<{x:.1f} seconds>{frame}" for x in times)
        assert expected in prompt
        assert len(re.findall(r"<\d+\.\d seconds>", prompt)) == t
        assert not prompt.startswith("<|im_start|>system")  # Qwen3-VL's template adds no system prompt
    else:
        first = ids.index(pad)
        assert ids[first - 1] == start and ids[first + t * per_frame] == end  # one contiguous run of pads
        assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    if family == "qwen2_5_vl":  # temporal patch = 2 frames at the sampled rate
        sampled_fps = nframes / (tiny_clip.frames / tiny_clip.fps)
        assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(2 / sampled_fps, rel=1e-3)
    assert prompt.endswith("What colour is it?<|im_end|>\n<|im_start|>assistant\n")

    with torch.inference_mode():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, len(ids), cfg.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    assert len(ids) < out.shape[1] <= len(ids) + 3 and out[0, : len(ids)].tolist() == ids


def test_families_differ_and_builds_are_deterministic(tiny_family_checkpoint, tmp_path):
    def digest(p):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())}

    built = tiny_family_checkpoint("qwen3_vl")
    again = tiny.build_tiny_checkpoint(tmp_path / "q3", family="qwen3_vl")
    assert digest(again) == digest(built)
    assert tiny.build_tiny_checkpoint(again, family="qwen3_vl") == again  # reused
    with pytest.raises(FileExistsError, match="another family"):
        tiny.build_tiny_checkpoint(again, family="qwen3_vl_moe")
    moe = tiny.build_tiny_checkpoint(again, family="qwen3_vl_moe", overwrite=True)
    assert json.loads((moe / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    with pytest.raises(ValueError, match="unknown model family 'qwen4_vl'.*qwen3_vl_moe"):
        tiny.build_tiny_checkpoint(tmp_path / "x", family="qwen4_vl")
    assert not (tmp_path / "x").exists()


def test_default_checkpoint_per_family_and_cli(tmp_path, monkeypatch, capsys):
    from psa_vlm.cli import main

    monkeypatch.setenv("PSA_VLM_CACHE", str(tmp_path / "cache"))
    q3 = tiny.default_tiny_checkpoint(family="qwen3_vl")
    q2 = tiny.default_tiny_checkpoint(family="qwen2_vl")
    assert q3 != q2 and q3.parent == q2.parent == tmp_path / "cache"
    assert tiny.default_tiny_checkpoint(family="qwen3_vl") == q3
    assert json.loads((q2 / "config.json").read_text())["model_type"] == "qwen2_vl"
    assert main(["build-tiny", "--family", "qwen3_vl_moe", "--out", str(tmp_path / "moe")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    capsys.readouterr()
    assert main(["build-tiny", "--family", "llava", "--out", str(tmp_path / "bad")]) == 2  # one line, exit 2
    err = capsys.readouterr().err.strip()
    assert "llava" in err and len(err.splitlines()) == 1
