"""``psa-vlm run`` end to end on the CPU (in-process through ``psa_vlm.cli.main``), and its input errors."""

import re

import pytest

from psa_vlm.cli import main
from psa_vlm.video.synth import make_clip


def _field(out: str, name: str) -> str:
    m = re.search(rf"^{name}\s*: (.*)$", out, re.M)
    assert m, f"no {name!r} line in:\n{out}"
    return m.group(1)


def _trained_shipped() -> bool:
    try:
        from psa_vlm.models.trained import trained_tiny_checkpoint

        trained_tiny_checkpoint()
        return True
    except (ImportError, FileNotFoundError):
        return False


def test_default_run(tmp_path_factory, monkeypatch, capsys):
    """Bare ``psa-vlm``: tiny model (the shipped trained one, else random weights built into the cache),
    bundled clip and question, PSA engaged."""
    monkeypatch.setenv("PSA_VLM_CACHE", str(tmp_path_factory.mktemp("cache")))
    assert main([]) == 0
    out = capsys.readouterr().out
    if _trained_shipped():
        assert "UNTRAINED" not in out and "tiny trained Qwen2.5-VL" in out
    else:
        assert "UNTRAINED" in out and "meaningless" in out
    assert "blocks 32x32, min_seq_len 64" in _field(out, "PSA") and "(tiny demo: blocks 128 -> 32" in out
    assert "estimator stride 8," in _field(out, "PSA") and "per KV head" not in _field(out, "PSA")
    assert _field(out, "expected").startswith(("A (", "B (", "C (", "D ("))
    n_prompt, n_video = map(int, re.match(r"(\d+) tokens \((\d+) video", _field(out, "prompt")).groups())
    assert n_video == 256 and n_prompt > n_video
    density = float(re.match(r"([0-9.]+) \(sparsity", _field(out, "density")).group(1))
    assert 0.0 < density <= 1.0
    levels = _field(out, "levels")
    assert all(k in levels for k in ("full", "pool2", "pool4", "pool8", "skip"))
    assert re.search(r"\d+(\.\d+)? (ms|s) language model", _field(out, "prefill"))


def test_explicit_arguments(tiny_checkpoint, tmp_path, capsys):
    clip = make_clip(tmp_path / "clip.mp4", "count", frames=64, width=112, height=84, fps=8.0, seed=3)
    rc = main([
        "run", "--model", str(tiny_checkpoint), "--video", clip.video, "--prompt", clip.prompt(),
        "--preset", "quota-0.2", "--max-frames", "16", "--max-pixels", str(112 * 84), "--compare-dense",
        "--backend", "reference", "--min-seq-len", "32", "--block-size", "16", "--max-new-tokens", "3",
        "--stride", "8", "--estimate-heads", "kv",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "16 frames sampled" in out and "8x6x8" in out  # 8 temporal patches of 6 x 8 patches
    assert _field(out, "prompt").startswith(f"{_prompt_tokens(out)} tokens (96 video")
    assert "blocks 16x16, min_seq_len 32" in _field(out, "PSA") and "tiny demo" not in out
    assert "estimator stride 8, one estimate per KV head" in _field(out, "PSA")
    density = float(re.match(r"([0-9.]+) \(sparsity", _field(out, "density")).group(1))
    assert density < 0.9  # quota-0.2 really skips and pools blocks
    assert "x language-model prefill" in _field(out, "speed-up")
    assert _field(out, "agree").startswith(("yes", "no"))


@pytest.mark.parametrize("family,attn", [("qwen2_vl", "sdpa"), ("qwen3_vl", "eager"), ("qwen3_vl_moe", "sdpa")])
def test_run_every_family(family, attn, tiny_family_checkpoint, tmp_path, capsys):
    """``--model DIR`` of each family: loaded with the given attention, patched by ``psa_vlm.patch``, PSA runs;
    the prompt line counts what lies inside the video spans (Qwen3-VL: timestamps and per-frame markers)."""
    from transformers import AutoProcessor

    from psa_vlm.inference import prepare_inputs, video_messages

    clip = make_clip(tmp_path / "clip.mp4", "needle_color", frames=24, width=112, height=84, fps=6.0, seed=5)
    path = tiny_family_checkpoint(family)
    rc = main(["run", "--model", str(path), "--video", clip.video, "--prompt", clip.prompt(),
               "--preset", "quota-0.2", "--max-frames", "16", "--max-pixels", str(112 * 84), "--min-seq-len", "16",
               "--block-size", "16", "--max-new-tokens", "2", "--attn-implementation", attn])
    assert rc == 0
    out = capsys.readouterr().out
    name = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}[family]
    assert _field(out, "model") == f"tiny random-weight {name} ({path}); cpu, float32, attention {attn}"
    assert "16 frames sampled" in out and "0.5 s per temporal patch" in out  # 2 frames at 4 sampled fps
    # the same prompt, tokenised here: pads, tokens inside <|vision_start|> ... <|vision_end|>, the rest text
    processor = AutoProcessor.from_pretrained(path)
    msgs = video_messages(clip.video, clip.prompt(), nframes=16, min_pixels=28 * 28 * 4, max_pixels=112 * 84)
    ids = prepare_inputs(processor, msgs)["input_ids"][0].tolist()
    tok = processor.tokenizer
    pad, start, end = (tok.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    first, last = ids.index(start), len(ids) - 1 - ids[::-1].index(end)
    n_pad, n_span = ids.count(pad), last - first + 1
    extra = f", {n_span - n_pad} more inside the video spans" if n_span > n_pad else ""
    assert _field(out, "prompt") == f"{len(ids)} tokens ({n_pad} video{extra}, {len(ids) - n_span} text)"
    if family.startswith("qwen3"):
        assert n_span - n_pad > 3 * 8  # 8 temporal patches: a timestamp and two markers each, plus the outer pair
    density = float(re.match(r"([0-9.]+) \(sparsity", _field(out, "density")).group(1))
    assert 0.0 < density < 0.9


def _prompt_tokens(out: str) -> int:
    return int(_field(out, "prompt").split()[0])


def test_fps_sampling_and_short_prompt(tiny_checkpoint, tmp_path, capsys):
    """--fps: 2 frames per second of an 8 s clip; min_seq_len above the prompt: PSA reports it ran dense."""
    clip = make_clip(tmp_path / "clip.mp4", "order", frames=64, width=56, height=56, fps=8.0, seed=1)
    rc = main(["run", "--model", str(tiny_checkpoint), "--video", clip.video, "--fps", "2", "--min-seq-len",
               "100000", "--max-new-tokens", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "16 frames sampled" in out and "1 s per temporal patch" in out
    assert "PSA did not engage" in _field(out, "density")


@pytest.fixture()
def bad_inputs(tmp_path, tiny_checkpoint):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing video": (["--video", str(tmp_path / "nope.mp4")], "does not exist"),
        "unreadable video": (["--video", str(not_video)], "cannot decode video"),
        "video is a directory": (["--video", str(tmp_path)], "is not a file"),
        "missing model dir": (["--model", str(tmp_path / "nope")], "does not exist"),
        "not a checkpoint": (["--model", str(empty)], "no config.json"),
        "another model type": (["--model", str(other)], "psa_vlm supports the model types qwen2_vl, qwen2_5_vl"),
        "attention not installed": (["--model", str(tiny_checkpoint), "--attn-implementation", "flash_attention_2"],
                                    "attn_implementation='flash_attention_2'"),
        "unknown attention": (["--model", str(tiny_checkpoint), "--attn-implementation", "bogus"],
                              "attn_implementation='bogus'"),
        "unknown preset": (["--model", str(tiny_checkpoint), "--preset", "sparse-9000"], "unknown preset"),
        "too few frames": (["--max-frames", "1"], "--max-frames"),
        "bad fps": (["--fps", "0"], "--fps"),
        "empty prompt": (["--prompt", "  "], "--prompt"),
    }


@pytest.mark.parametrize("case", [
    "missing video", "unreadable video", "video is a directory", "missing model dir", "not a checkpoint",
    "another model type", "unknown preset", "too few frames", "bad fps", "empty prompt", "attention not installed",
    "unknown attention",
])
@pytest.mark.parametrize("prefix", [["run"], []], ids=["run", "bare"])
def test_bad_input_is_one_line(bad_inputs, case, prefix, capsys):
    argv, message = bad_inputs[case]
    rc = main(prefix + argv)
    captured = capsys.readouterr()
    assert rc != 0
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, captured.err
    assert err[0].startswith("psa-vlm run: error:") and message in err[0]
    assert "Traceback" not in captured.err + captured.out
