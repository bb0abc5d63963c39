"""bench-prefill's checkpoint path: real processor inputs sized to a token budget (CPU, tiny checkpoint)."""

import torch

from psa_vlm.bench.prefill import checkpoint_video_inputs, prefill


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
