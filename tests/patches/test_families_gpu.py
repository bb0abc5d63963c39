"""GPU tier of ``psa_vlm.patch`` on other families: a Qwen3-VL-8B-shaped language model, random bf16 weights.

Run on an H100/H200 with ``PSA_VLM_TEST_GPU=1 pytest -m gpu tests/patches/test_families_gpu.py``. The text model
has Qwen3-VL-8B's attention and MLP shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128, q/k norms,
interleaved mRoPE 24/20/20, intermediate 12288) but 3 decoder layers (of 36) and a small vocabulary, so a
32k-token prefill takes seconds. Input: slowly drifting video-like frames of 256 tokens, then a text tail
(no input ids: the ``text_tail`` rule gives the token types).
"""

from __future__ import annotations

import os

import pytest
import torch

import psa_vlm
from psa_vlm import PSAConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set PSA_VLM_TEST_GPU=1 (no interpreter)"),
]

SEQ = 32 * 1024 + 1000  # not a multiple of the block size
N_LAYERS = 3
HIDDEN = 4096
FRAME_TOKENS = 256


@pytest.fixture(scope="module")
def text_model():
    from transformers import Qwen3VLTextConfig, Qwen3VLTextModel

    config = Qwen3VLTextConfig(
        vocab_size=4096, hidden_size=HIDDEN, intermediate_size=12288, num_hidden_layers=N_LAYERS,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3VLTextModel(config).to(torch.bfloat16).eval()
    model.config._attn_implementation_internal = "sdpa"
    return model


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator(device="cuda").manual_seed(1)
    frame = torch.randn(1, FRAME_TOKENS, HIDDEN, device="cuda", generator=g)
    frames = []
    for _ in range(-(-SEQ // FRAME_TOKENS)):
        frame = 0.95 * frame + 0.3 * torch.randn(1, FRAME_TOKENS, HIDDEN, device="cuda", generator=g)
        frames.append(frame)
    x = torch.cat(frames, dim=1)[:, :SEQ]
    x = 0.5 * (x + torch.roll(x, 1, dims=1))
    x[:, -512:] = torch.randn(1, 512, HIDDEN, device="cuda", generator=g)
    return (0.05 * x).to(torch.bfloat16)


def _hidden(model, embeds):
    with torch.no_grad():
        return model(inputs_embeds=embeds, use_cache=False).last_hidden_state


def _logits(hidden, seed=2, vocab=4096):
    """Logits of a fixed random LM head for the last 1024 positions."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    head = torch.randn(vocab, hidden.shape[-1], device="cuda", generator=g).to(hidden.dtype) * hidden.shape[-1] ** -0.5
    return hidden[:, -1024:] @ head.T


@pytest.fixture(scope="module")
def reference(text_model, embeds):
    assert not psa_vlm.is_patched(text_model)
    return _hidden(text_model, embeds)


def test_qwen3_vl_dense_preset_auto_matches_sdpa(text_model, embeds, reference):
    psa_vlm.patch(text_model, PSAConfig.preset("dense"), backend="auto")
    try:
        assert text_model.config._attn_implementation == "psa"
        out = _hidden(text_model, embeds)
        stats = psa_vlm.psa_stats(text_model)
    finally:
        psa_vlm.unpatch(text_model)
    assert sorted(stats["layers"]) == list(range(N_LAYERS)) and stats["density"] == pytest.approx(1.0)
    assert all(layer["lq"] == layer["lk"] == SEQ for layer in stats["layers"].values())
    # bf16: both paths round P to bf16 before P @ V and accumulate in fp32, in different orders
    rel = (out.float() - reference.float()).norm() / reference.float().norm()
    assert rel < 2e-2, float(rel)
    ref_logits, logits = _logits(reference).float(), _logits(out).float()
    assert (logits - ref_logits).norm() / ref_logits.norm() < 2e-2
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.95


def test_qwen3_vl_quota_preset_auto_32k(text_model, embeds, reference):
    psa_vlm.patch(text_model, "quota-0.2", backend="auto")
    try:
        out = _hidden(text_model, embeds)
        torch.cuda.synchronize()
        stats = psa_vlm.psa_stats(text_model)
    finally:
        psa_vlm.unpatch(text_model)
    assert torch.isfinite(out).all()
    assert 0.1 < stats["density"] < 0.35, stats["density"]
    cos = torch.nn.functional.cosine_similarity(out.float(), reference.float(), dim=-1)
    assert cos.mean() > 0.8, float(cos.mean())


def test_flash_attention_2_original(text_model, embeds):
    """Loaded with flash_attention_2 (if installed): PSA prefill matches FA2, short inputs are FA2 itself."""
    pytest.importorskip("flash_attn")
    text_model.set_attn_implementation("flash_attention_2")
    try:
        ref = _hidden(text_model, embeds)
        short_ref = _hidden(text_model, embeds[:, :2048])
        psa_vlm.patch(text_model, PSAConfig.preset("dense"))
        assert text_model.config._attn_implementation == "psa_flash_attention_2"
        out = _hidden(text_model, embeds)
        assert torch.equal(_hidden(text_model, embeds[:, :2048]), short_ref)  # below min_seq_len: FA2 itself
        psa_vlm.unpatch(text_model)
        assert text_model.config._attn_implementation == "flash_attention_2"
    finally:
        psa_vlm.unpatch(text_model)
        text_model.config._attn_implementation_internal = "sdpa"
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 2e-2, float(rel)
