"""Issue #11 at the product's edges: one-line CLI argument errors in every subcommand, the PSA config checked
against its backend at parse time, videos decord cannot read (PyAV), prompts longer than the model."""

import json
import shutil

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # PyAV writes the test clips (a runtime dependency; absent on some GPU images)

from psa_vlm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _one_line_error(capsys, argv, prog, *needles):
    rc = main(argv)
    captured = capsys.readouterr()
    # transformers' weight-loading progress bar is not an error line
    err = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert rc == 2, captured.err
    assert len(err) == 1, captured.err
    assert err[0].startswith(f"{prog}: error:"), err[0]
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------------------------------------- item 11
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["demo", "--head-dim", "0"], ["--head-dim", "positive integer, got 0"]),
        (["demo", "--head-dim", "-4"], ["--head-dim", "got -4"]),
        (["demo", "--tokens-per-frame", "0"], ["--tokens-per-frame"]),
        (["demo", "--seq-len", "x"], ["--seq-len", "'x'"]),
        (["demo", "--heads", "3"], ["--heads (3) must be a multiple of --kv-heads (2)"]),
        (["demo", "--block", "20"], ["block_q=20"]),
        (["demo", "--preset", "nope"], ["--preset", "unknown PSA preset 'nope'"]),
        (["demo", "--device", "cuda:x"], ["--device"]),
        (["build-tiny", "--out", "/proc/psa_tiny"], ["--out", "/proc/psa_tiny"]),
        (["build-tiny", "--seed", "-1"], ["--seed"]),
        (["bench-attention", "--seq-lens", "0,16"], ["--seq-lens"]),
        (["bench-attention", "--presets", "paper,nope"], ["unknown presets: nope"]),
        (["bench-attention", "--presets", "binary@paper"], ["list preset 'paper' before it"]),
        (["bench-attention", "--head-dim", "512"], ["head_dim=512"]),
        (["bench-attention", "--presets", "quota-0.2/s24"], ["PSAConfig.stride=24 must divide"]),
        (["bench-attention", "--out", "/proc/x/a.csv"], ["--out"]),
        (["bench-prefill", "--reps", "0"], ["--reps"]),
        (["bench-prefill", "--methods", "dense,foo"], ["unknown methods: foo"]),
        (["bench-prefill", "--methods", "dense,quota-0.2/s24"], ["PSAConfig.stride=24 must divide"]),
        (["bench-prefill", "--methods", "dense/s16"], ["'dense' has no estimator", "stride"]),
        (["bench-prefill", "--methods", "dense/kv"], ["'dense' has no estimator", "'/kv'"]),
        (["bench-prefill", "--methods", "quota-0.2/kv/kv"], ["unknown methods: quota-0.2/kv/kv"]),
        (["bench-attention", "--presets", "quota-0.2/s16/x"], ["quota-0.2/s16/x"]),
        (["bench-attention", "--presets", "dense/kv"], ["'dense' has no estimator"]),
        (["bench-prefill", "--model", "/nonexistent/dir"], ["--model"]),
        (["eval-sweep", "--limit", "-1"], ["--limit"]),
        (["eval-sweep", "--bootstrap-iters", "-2"], ["--bootstrap-iters"]),
        (["eval-sweep", "--out", "/proc/sweep"], ["--out"]),
        (["eval-sweep", "--include-path", "/nonexistent/tasks"], ["--include-path"]),
        (["eval-sweep", "--presets", "dense,paper", "--model-args", "block_size=24,backend=triton"],
         ["preset paper", "block_q=24", "powers of two"]),
        (["run", "--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["run", "--block-size", "abc"], ["--block-size"]),
        (["run", "--stride", "24"], ["PSAConfig.stride=24 must divide", "e.g. 4, 8, 16, 32"]),
        (["run", "--estimate-heads", "KV"], ["--estimate-heads", "'KV'"]),
        (["run", "--min-pixels", "-5"], ["--min-pixels"]),
        (["run", "--unknown-flag"], ["unrecognized arguments: --unknown-flag"]),
    ],
)
def test_every_argument_error_is_one_line_exit_2(capsys, argv, needles):
    _one_line_error(capsys, argv, f"psa-vlm {argv[0]}", *needles)


def test_unknown_command_is_one_line(capsys):
    _one_line_error(capsys, ["frobnicate"], "psa-vlm", "unknown command 'frobnicate'")


# ---------------------------------------------------------------------------------------------- item 7
def test_run_block_size_24_fails_at_parse_time(capsys, monkeypatch):
    """``psa-vlm run --block-size 24`` with the Triton kernels: one line, exit 2, before loading anything."""
    import psa_vlm.run as run

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "load_model", never)
    monkeypatch.setattr(run, "probe_video", never)
    assert torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"
    _one_line_error(capsys, ["run", "--block-size", "24", "--backend", "triton"], "psa-vlm run",
                    "block_q=24, block_k=24", "powers of two >= 16", "--block-size")
    # the reference backend runs such blocks, so that combination passes the check
    args = run.argparse.Namespace(
        video=None, prompt=None, model=None, preset="paper", max_frames=None, fps=None, max_pixels=None,
        min_pixels=None, compare_dense=False, backend="reference", min_seq_len=None, block_size=24,
        max_new_tokens=4, device="cpu",
    )
    run.check_arguments(args)


def test_lmms_model_checks_block_size_before_loading(tiny_checkpoint):
    pytest.importorskip("lmms_eval")
    from psa_vlm.eval.lmms_model import Qwen2_5_VL_PSA

    with pytest.raises(ValueError, match="block_q=24, block_k=24.*powers of two"):
        Qwen2_5_VL_PSA(pretrained="/nonexistent/not/loaded", device="cpu", device_map="cpu", block_size=24,
                       backend="triton")


# ---------------------------------------------------------------------------------------------- item 9
def _write_h264(path, width, height, frames=8, fps=8):
    """An H.264 clip whose frame ``i`` is a known colour ramp (PyAV writes it)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = 30 * i
            img[..., 1] = 255 - 30 * i
            img[..., 2] = 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("size", [(16, 16), (8, 8), (24, 24), (16, 512), (48, 48)])
def test_videos_decord_cannot_read_are_read_with_pyav(tmp_path, size):
    from psa_vlm.inference import probe_video
    from psa_vlm.video.decode import read_video_pyav

    w, h = size
    path = _write_h264(tmp_path / f"clip_{w}x{h}.mp4", w, h)
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (8, w, h, 8.0)
    video, meta, sample_fps = read_video_pyav({"video": str(path), "nframes": 4})
    assert video.shape == (4, 3, h, w) and video.dtype == torch.uint8
    assert meta["frames_indices"] == [0, 2, 5, 7] and meta["total_num_frames"] == 8 and meta["fps"] == 8.0
    assert sample_fps == pytest.approx(4.0)
    # the frames are the written ones (red channel 30 * i, up to H.264 rounding)
    red = video[:, 0].float().mean((1, 2))
    assert torch.allclose(red, torch.tensor([0.0, 60.0, 150.0, 210.0]), atol=6)


def test_run_answers_on_a_16x16_h264_clip(tiny_checkpoint, tmp_path, capsys):
    """The issue's clip: 8 frames of 16x16 H.264 (decord fails, qwen-vl-utils' torchvision fallback is gone)."""
    path = _write_h264(tmp_path / "tiny16.mp4", 16, 16)
    rc = main(["run", "--model", str(tiny_checkpoint), "--video", str(path), "--prompt", "What colour?",
               "--max-new-tokens", "2", "--min-seq-len", "16", "--block-size", "16", "--backend", "reference"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "(8 frames, 16x16, 8 fps, 1.0 s)" in out
    assert "8 frames sampled -> grid 4x" in out  # 4 temporal patches of the upsampled frames
    assert "answer    : '" in out and "video," in out


# ---------------------------------------------------------------------------------------------- item 10
@pytest.fixture()
def short_context_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny checkpoint with a 40-token maximum (max_position_embeddings)."""
    d = tmp_path / "tiny40"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_run_rejects_a_prompt_longer_than_the_model_before_prefill(short_context_checkpoint, capsys, monkeypatch):
    import psa_vlm.run as run

    def never(*a, **k):
        raise AssertionError("prefill ran")

    monkeypatch.setattr(run, "generate_timed", never)
    _one_line_error(capsys, ["run", "--model", str(short_context_checkpoint), "--max-frames", "8"], "psa-vlm run",
                    "more than this model's maximum of 40 (max_position_embeddings)",
                    "lower --fps, --max-frames or --max-pixels")


def test_model_hook_rejects_long_prompts_before_prefill(short_context_checkpoint):
    """The lmms-eval model's forward pre-hook: prompt length checked before the first forward runs."""
    pytest.importorskip("lmms_eval")
    from psa_vlm.eval.lmms_model import LENGTH_OPTIONS, _prompt_length_hook
    from psa_vlm.inference import PromptTooLongError, load_qwen25vl

    model, _ = load_qwen25vl(short_context_checkpoint, device="cpu")
    ran = []
    model.model.language_model.register_forward_pre_hook(lambda *a: ran.append(1))
    handle = model.register_forward_pre_hook(_prompt_length_hook, with_kwargs=True)
    with pytest.raises(PromptTooLongError, match=f"41 tokens.*maximum of 40.*{LENGTH_OPTIONS}"):
        model(input_ids=torch.ones(1, 41, dtype=torch.long))
    assert not ran
    model(input_ids=torch.ones(1, 40, dtype=torch.long))  # at the limit: runs
    assert ran
    handle.remove()
