"""bench-prefill's input paths on the CPU at tiny shapes: real processor inputs sized to a token budget for a
checkpoint of each family, and the random-weight ``--arch`` models (Qwen2.5-VL-7B / Qwen3-VL-8B shapes)."""

import pytest
import torch

from psa_vlm import PSAConfig
from psa_vlm.bench.prefill import ARCHS, arch_config, build_model, checkpoint_video_inputs, prefill
from psa_vlm.bench.synthetic import video_like_embeddings


def test_checkpoint_video_inputs_hit_the_budget_and_prefill(tiny_checkpoint, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    fps, side, budget = 4.0, 56, 300
    inputs = checkpoint_video_inputs(processor, budget, tmp_path, frame_size=side, fps=fps)
    per_pair = (side // 28) ** 2
    pairs = (budget - 64) // per_pair
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video == pairs * per_pair
    assert inputs["video_grid_thw"].tolist() == [[pairs, side // 14, side // 14]]
    # two frames per temporal patch at the clip's frame rate
    assert torch.allclose(torch.as_tensor(inputs["second_per_grid_ts"]).float(), torch.tensor([2 / fps]))
    assert budget - 64 <= inputs["input_ids"].shape[1] <= budget + 64
    logits = prefill(model, inputs)
    assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family,merged", [("qwen2_vl", 28), ("qwen3_vl", 32), ("qwen3_vl_moe", 32)])
def test_checkpoint_inputs_of_every_family(family, merged, tiny_family_checkpoint, tmp_path):
    """``--model DIR`` of any family: the budget holds with the family's patch size and, for Qwen3-VL, its
    per-frame timestamps; the whole-model prefill gives finite first-token logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_family_checkpoint(family)
    processor = AutoProcessor.from_pretrained(path)
    model = build_model(str(path), None, device="cpu", dtype=torch.float32)
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(model.config)])
    side, budget = 100, 331  # frame side rounds down to 84 (patch 14) / 96 (patch 16)
    inputs = checkpoint_video_inputs(processor, budget, tmp_path, frame_size=side, fps=4.0)
    s = side // merged * merged
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert (h, w) == (s * 2 // merged, s * 2 // merged)
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.video_token_id).sum()) == t * (s // merged) ** 2
    assert budget - 80 <= ids.shape[0] <= budget + 16, ids.shape
    if family.startswith("qwen3"):
        text = processor.tokenizer.decode(ids)
        assert text.count(" seconds>") == t
    logits = prefill(model, inputs)
    assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()


def test_arch_shapes_are_the_real_models():
    q3 = arch_config("qwen3_vl").get_text_config()
    assert (q3.num_hidden_layers, q3.num_attention_heads, q3.num_key_value_heads, q3.head_dim) == (36, 32, 8, 128)
    assert (q3.hidden_size, q3.intermediate_size, q3.vocab_size, q3.max_position_embeddings) == (
        4096, 12288, 151936, 262144)
    assert q3.rope_parameters["mrope_section"] == [24, 20, 20] and q3.rope_parameters["mrope_interleaved"]
    q25 = arch_config("qwen2_5_vl").get_text_config()
    assert (q25.num_hidden_layers, q25.num_attention_heads, q25.num_key_value_heads, q25.hidden_size) == (
        28, 28, 4, 3584)
    assert ARCHS["qwen3_vl"]["seq_lens"].split(",")[-1] == "262144"
    with pytest.raises(ValueError, match="unknown --arch 'llama'"):
        arch_config("llama")


_TINY = {
    "qwen2_5_vl": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=256, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [2, 3, 3]}),
    "qwen3_vl": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=256, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                      "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_random_arch_prefill_dense_preset_and_psa(arch):
    """The random-weight path of each ``--arch`` at a tiny width: the dense preset through ``psa_vlm.patch``
    reproduces unpatched logits (the benchmark's check) and a sparse preset runs below full density."""
    from psa_vlm import patch, psa_stats, unpatch

    model = build_model(None, 2, arch, device="cpu", dtype=torch.float32, **_TINY[arch])
    assert type(model).__name__ == ARCHS[arch]["config_class"].replace("Config", "ForConditionalGeneration")
    L = 301
    embeds = video_like_embeddings(L, 64, tokens_per_frame=24, text_tokens=20, std=1.0, seed=L)
    dense = prefill(model, embeds)
    assert dense.shape == (1, 1, 256) and torch.isfinite(dense).all()
    small = dict(min_seq_len=64, block_q=16, block_k=16, text_tail=20)
    patch(model, PSAConfig.preset("dense", **small), backend="reference")
    same = prefill(model, embeds)
    assert torch.allclose(same, dense, rtol=1e-4, atol=1e-5)
    patch(model, PSAConfig.preset("quota-0.2", **small), backend="reference")
    sparse = prefill(model, embeds)
    density = psa_stats(model)["density"]
    assert torch.isfinite(sparse).all() and 0.0 < density < 0.6
    unpatch(model)
    assert torch.equal(prefill(model, embeds), dense)
