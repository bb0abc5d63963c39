"""The tiny offline Qwen2.5-VL checkpoint builder (``psa_vlm.models.tiny``)."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("transformers")

from psa_vlm.models import tiny  # noqa: E402


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_checkpoint_loads_like_a_real_one(tiny_checkpoint):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert len(tok) <= cfg.text_config.vocab_size
    text = cfg.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads) == (4, 2, 16)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    for special in tiny.SPECIAL_TOKENS:  # each special token is one token, never split
        assert tok(special)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    msgs = [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}, {"type": "text", "text": "Why?"}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Why?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok("The red square moves.")["input_ids"]) == "The red square moves."
    assert json.loads((tiny_checkpoint / tiny.MARKER_FILE).read_text())["seed"] == 0


def test_build_is_deterministic_and_guards_directories(tiny_checkpoint, tmp_path):
    again = tiny.build_tiny_checkpoint(tmp_path / "again")
    assert _digest(again) == _digest(tiny_checkpoint)
    assert tiny.build_tiny_checkpoint(again) == again  # complete checkpoint of the same seed: reused
    with pytest.raises(FileExistsError, match="overwrite"):
        tiny.build_tiny_checkpoint(again, seed=1)
    other = tiny.build_tiny_checkpoint(again, seed=1, overwrite=True)
    assert _digest(other)["model.safetensors"] != _digest(tiny_checkpoint)["model.safetensors"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a psa_vlm tiny checkpoint"):
        tiny.build_tiny_checkpoint(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_default_checkpoint_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PSA_VLM_CACHE", str(tmp_path / "cache"))
    first = tiny.default_tiny_checkpoint()
    mtime = (first / tiny.MARKER_FILE).stat().st_mtime_ns
    assert first.parent == tmp_path / "cache"
    assert tiny.default_tiny_checkpoint() == first
    assert (first / tiny.MARKER_FILE).stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no staging leftovers


def test_cli_builds_into_out(tmp_path, capsys):
    from psa_vlm.cli import main

    assert main(["build-tiny", "--out", str(tmp_path / "ckpt")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / tiny.MARKER_FILE).is_file()
