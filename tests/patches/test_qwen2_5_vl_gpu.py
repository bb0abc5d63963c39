"""GPU tier of the Qwen2.5-VL patch: a Qwen2.5-VL-7B-shaped language model, random bf16 weights, 32k tokens.

Run on an H100/H200 with ``PSA_VLM_TEST_GPU=1 pytest -m gpu tests/patches/test_qwen2_5_vl_gpu.py`` (the variable
keeps the Triton interpreter off). The text model has the 7B's attention and MLP shapes (hidden 3584, 28 query /
4 KV heads, head_dim 128, intermediate 18944, mRoPE sections 16/24/24) but only a few decoder layers and a
small vocabulary, so that a 32k-token prefill takes seconds. The input is video-like embeddings: frames of
256 tokens that change slowly over time (adjacent tokens similar, as the similarity cap expects), followed by
a text tail; without input ids the patch uses the ``text_tail`` rule for token types.
"""

from __future__ import annotations

import os

import pytest
import torch

import psa_vlm
from psa_vlm import PSAConfig

from gpu_shapes import build_text_model, video_like_embeds  # pytest puts this directory on sys.path
from gpu_shapes import hidden_states as _hidden
from gpu_shapes import lm_head_logits as _logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set PSA_VLM_TEST_GPU=1 (no interpreter)"),
]

SEQ = 32 * 1024
N_LAYERS = 3


@pytest.fixture(scope="module")
def text_model():
    return build_text_model("qwen2_5_vl", N_LAYERS)


@pytest.fixture(scope="module")
def embeds():
    """``[1, SEQ, 3584]`` bf16: slowly drifting video frames, then 512 text-like tokens."""
    return video_like_embeds(SEQ, 3584, device="cuda")


@pytest.fixture(scope="module")
def reference(text_model, embeds):
    assert not psa_vlm.is_patched(text_model)
    return _hidden(text_model, embeds)


def test_paper_preset_triton_32k(text_model, embeds, reference):
    # the sparse path itself: on these random weights the paper rule keeps ~90% of the blocks, where the dense
    # guard would run dense attention instead (tested below)
    psa_vlm.patch_qwen25vl(text_model, PSAConfig.preset("paper", dense_guard=False), backend="triton")
    try:
        out = _hidden(text_model, embeds)
        torch.cuda.synchronize()
        stats = psa_vlm.psa_stats(text_model)
    finally:
        psa_vlm.unpatch_qwen25vl(text_model)
    assert out.shape == reference.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert sorted(stats["layers"]) == list(range(N_LAYERS))
    assert all(layer["lq"] == layer["lk"] == SEQ for layer in stats["layers"].values())
    assert 0.0 < stats["density"] < 1.0, stats
    # sparse, yet close to dense in direction (random weights: a loose sanity bound, not an accuracy claim)
    cos = torch.nn.functional.cosine_similarity(out.float(), reference.float(), dim=-1)
    assert cos.mean() > 0.8, float(cos.mean())


def test_dense_guard_runs_dense_for_a_dense_plan(text_model, embeds, reference):
    """Guarded layers report density 1.0 with the plan's density beside it, and compute dense attention."""
    from psa_vlm.cost import attend_cost_ratio

    psa_vlm.patch_qwen25vl(text_model, PSAConfig.preset("paper"), backend="triton")
    try:
        out = _hidden(text_model, embeds)
        stats = psa_vlm.psa_stats(text_model)
    finally:
        psa_vlm.unpatch_qwen25vl(text_model)

    def crossing(mix, dense):  # lowest density of this mix shape at which the triton stage is predicted >= dense
        lo, hi = 0.0, 1.0 / sum(mix)  # all visible pairs at the mix's factors; density = sum(mix) * mid / factor
        for _ in range(40):
            mid = (lo + hi) / 2
            r = attend_cost_ratio("triton", [x * mid for x in mix] + [1.0 - mid * sum(mix)], 1, 28, 128, SEQ, SEQ,
                                  dense=dense)
            lo, hi = (mid, hi) if r < 1.0 else (lo, mid)
        return lo * sum(x / p for x, p in zip(mix, (1, 2, 4, 8)))

    # the lowest density at which the guard can trip here: all full resolution or all at factor 2 (the dearer per
    # unit of density), against either dense path
    break_even = min(crossing(mix, d) for mix in ([1, 0, 0, 0], [0, 1, 0, 0]) for d in ("fa4", "cudnn"))
    guarded = [v for v in stats["layers"].values() if v["dense_guard"]]
    assert stats["dense_guard_layers"] == len(guarded)
    assert stats["attend_backends"] == {"triton": N_LAYERS}
    for v in stats["layers"].values():
        if v["dense_guard"]:
            assert v["density"] == 1.0 and break_even * 0.9 < v["planned_density"] <= 1.0, v
        else:
            assert v["density"] == v["planned_density"] < 1.0
    if len(guarded) == N_LAYERS:  # every layer dense: the output is dense attention's
        rel = (out.float() - reference.float()).norm() / reference.float().norm()
        assert rel < 2e-2, float(rel)


def test_dense_preset_triton_matches_sdpa(text_model, embeds, reference):
    psa_vlm.patch_qwen25vl(text_model, PSAConfig.preset("dense"), backend="triton")
    try:
        out = _hidden(text_model, embeds)
        assert psa_vlm.psa_stats(text_model)["density"] == pytest.approx(1.0)
    finally:
        psa_vlm.unpatch_qwen25vl(text_model)
    # bf16: both paths round P to bf16 before P @ V and accumulate in fp32, in different orders; relative norm
    # of the difference of the final hidden states and logits stays at the 1e-2 level through the layers.
    rel = (out.float() - reference.float()).norm() / reference.float().norm()
    assert rel < 2e-2, float(rel)
    ref_logits, logits = _logits(reference).float(), _logits(out).float()
    rel_logits = (logits - ref_logits).norm() / ref_logits.norm()
    assert rel_logits < 2e-2, float(rel_logits)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.95


def test_short_prefill_is_bit_identical(text_model, embeds, reference):
    """Below min_seq_len (default 4096) the original sdpa function runs: identical numerics."""
    short = embeds[:, :2048]
    ref = _hidden(text_model, short)
    psa_vlm.patch_qwen25vl(text_model, "paper", backend="triton")
    try:
        assert torch.equal(_hidden(text_model, short), ref)
    finally:
        psa_vlm.unpatch_qwen25vl(text_model)
