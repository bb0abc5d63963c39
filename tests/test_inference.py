"""Option parsing and statistics helpers shared by ``psa-vlm run``, the lmms-eval model and the sweep."""

import pytest

from psa_vlm import PSAConfig
from psa_vlm.inference import VideoInfo, frame_count, parse_number_list, psa_config_from_options, summarize_psa_stats


def test_parse_number_list():
    assert parse_number_list("0.7/0.8/0.9/0.9", 4, "t") == (0.7, 0.8, 0.9, 0.9)
    assert parse_number_list("0.7 0.8;0.9:0.9", 4, "t") == (0.7, 0.8, 0.9, 0.9)
    assert parse_number_list([1, 2, 3], 3, "t") == (1.0, 2.0, 3.0)
    assert parse_number_list("none", 3, "t") is None and parse_number_list(None, 3, "t") is None
    with pytest.raises(ValueError, match="4 numbers"):
        parse_number_list("0.7/0.8", 4, "thresholds")
    with pytest.raises(ValueError, match="4 numbers"):
        parse_number_list("a/b/c/d", 4, "thresholds")


def test_psa_config_from_options():
    assert psa_config_from_options("paper") == PSAConfig.preset("paper")
    cfg = psa_config_from_options("paper", thresholds="0.6/0.7/0.8/0.9", block_size=64, min_seq_len="128")
    assert (cfg.mode, cfg.thresholds, cfg.block_q, cfg.block_k, cfg.min_seq_len) == (
        "threshold", (0.6, 0.7, 0.8, 0.9), 64, 64, 128)
    cfg = psa_config_from_options("paper", quotas="0.1/0.1/0.1/0.2", sim_thresholds="none", pool_factors="2/4/8")
    assert cfg.mode == "quota" and cfg.sim_thresholds is None and cfg.target_density() == pytest.approx(0.2)
    assert psa_config_from_options("paper", pool_factors="none", thresholds="0.9/0.9/0.9/0.9").pool_factors == ()
    for bad, match in [({"block_size": 12}, "stride"), ({"min_seq_len": "x"}, "integer"),
                       ({"thresholds": "0.9/0.8/0.7/0.6"}, "non-decreasing"), ({"pool_factors": "3"}, "pool_factors")]:
        with pytest.raises(ValueError, match=match):
            psa_config_from_options("paper", **bad)
    with pytest.raises(ValueError, match="unknown PSA preset"):
        psa_config_from_options("nope")


def test_summarize_psa_stats():
    stats = {"layers": {0: {"density": 0.5}, 2: {"density": 0.3}}, "density": 0.4,
             "histogram": {"full": 0.2, "pool2": 0.1, "pool4": 0.1, "pool8": 0.1, "skip": 0.5}}
    s = summarize_psa_stats(stats, n_layers=3)
    assert s["engaged"] and s["density"] == 0.4 and s["layers"] == [0.5, None, 0.3]
    assert s["histogram"]["skip"] == 0.5
    empty = summarize_psa_stats({"layers": {}, "density": None, "histogram": None}, n_layers=2)
    assert not empty["engaged"] and empty["density"] is None and empty["layers"] == [None, None]


def test_frame_count():
    info = VideoInfo("x.mp4", frames=129, fps=8.0, width=64, height=64)  # 16.1 s
    assert frame_count(info) == 128  # every frame, rounded down to even
    assert frame_count(info, max_frames=33) == 32
    assert frame_count(info, fps=1.0) == 16
    assert frame_count(info, fps=0.1) == 4  # at least 4 with fps sampling
    assert frame_count(info, fps=4.0, max_frames=20) == 20


def test_checkpoint_family(tmp_path):
    import json

    from psa_vlm.inference import (
        SUPPORTED_MODEL_TYPES,
        CheckpointError,
        check_checkpoint,
        check_qwen25vl_checkpoint,
        checkpoint_family,
    )

    for family in SUPPORTED_MODEL_TYPES:
        d = tmp_path / family
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": family}))
        assert checkpoint_family(d) == family and check_checkpoint(d) == d.resolve()
    assert check_qwen25vl_checkpoint(tmp_path / "qwen2_5_vl") == (tmp_path / "qwen2_5_vl").resolve()
    with pytest.raises(CheckpointError, match="'qwen3_vl' model, not a Qwen2.5-VL checkpoint"):
        check_qwen25vl_checkpoint(tmp_path / "qwen3_vl")
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(CheckpointError, match="'llava' model; psa_vlm supports .*qwen3_vl_moe"):
        checkpoint_family(tmp_path / "llava")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_family(tmp_path / "missing")


def test_load_model_passes_the_attention_through(tiny_family_checkpoint, monkeypatch):
    """Any family through the auto class; the attention name reaches transformers unchanged (a name registered
    in ``AttentionInterface`` loads; flash_attention_2 is handed over as is and its missing package is one
    clear ValueError)."""
    import torch
    from transformers import AttentionInterface, AutoModelForImageTextToText
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from psa_vlm.inference import load_model

    AttentionInterface.register("test_sdpa_copy", sdpa_attention_forward)
    model, processor = load_model(tiny_family_checkpoint("qwen3_vl"), device="cpu",
                                  attn_implementation="test_sdpa_copy")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and not model.training
    assert model.config.get_text_config()._attn_implementation == "test_sdpa_copy"
    assert next(model.parameters()).dtype == torch.float32 and type(processor).__name__ == "Qwen3VLProcessor"

    seen = {}
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*use attn_implementation='sdpa'"):
        load_model(tiny_family_checkpoint("qwen2_vl"), device="cpu", attn_implementation="flash_attention_2")
    assert seen["attn_implementation"] == "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation must be a name"):
        load_model(tiny_family_checkpoint("qwen2_vl"), device="cpu", attn_implementation="")
