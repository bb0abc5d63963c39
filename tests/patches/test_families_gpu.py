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

from gpu_shapes import build_text_model, video_like_embeds  # pytest puts this directory on sys.path
from gpu_shapes import hidden_states as _hidden
from gpu_shapes import lm_head_logits as _logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set PSA_VLM_TEST_GPU=1 (no interpreter)"),
]

SEQ = 32 * 1024 + 1000  # not a multiple of the block size
N_LAYERS = 3
HIDDEN = 4096


@pytest.fixture(scope="module")
def text_model():
    return build_text_model("qwen3_vl", N_LAYERS)


@pytest.fixture(scope="module")
def embeds():
    return video_like_embeds(SEQ, HIDDEN, device="cuda")


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
    # random weights: a loose sanity bound, not an accuracy claim (H200, 2026-11-29: mean cosine 0.7005 with
    # both the fa4 and the Triton backend at quota-0.2 on this 3-layer model)
    cos = torch.nn.functional.cosine_similarity(out.float(), reference.float(), dim=-1)
    assert cos.mean() > 0.6, float(cos.mean())
    # the backends compute the same PSA: the auto choice (fa4 where installed) against the Triton kernels
    psa_vlm.patch(text_model, "quota-0.2", backend="triton")
    try:
        out_triton = _hidden(text_model, embeds)
    finally:
        psa_vlm.unpatch(text_model)
    rel = (out.float() - out_triton.float()).norm() / out_triton.float().norm()
    assert rel < 2e-2, float(rel)


def test_flash_attention_2_original(text_model, embeds):
    """Loaded with flash_attention_2 (if installed): PSA prefill matches FA2, short inputs are FA2 itself."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():  # FlashAttention-4 alone also provides a `flash_attn` namespace
        pytest.skip("flash-attn 2 is not installed")
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
