"""Shared parts of the GPU-tier patch tests: real-model text shapes and video-like input embeddings.

Imported by name from the ``*_gpu.py`` / ``test_multi_gpu.py`` modules (pytest puts this directory on
``sys.path``, as for ``tiny_families``). Nothing here needs a GPU to import; the builders take a device.

* ``qwen2_5_vl_7b_text_config`` / ``qwen3_vl_8b_text_config``: the text configs of Qwen2.5-VL-7B
  (hidden 3584, 28 query / 4 KV heads, head_dim 128, intermediate 18944, mRoPE 16/24/24) and Qwen3-VL-8B
  (hidden 4096, 32 query / 8 KV heads, head_dim 128, q/k norms, interleaved mRoPE 24/20/20, intermediate
  12288) with a few decoder layers and a small vocabulary, so that a long prefill takes seconds.
* ``video_like_embeds``: frames of 256 tokens that change slowly over time (adjacent tokens similar, as the
  similarity cap expects), then a text tail; without input ids the patch uses the ``text_tail`` rule.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

FRAME_TOKENS = 256
TEXT_TOKENS = 512
VOCAB = 4096

#: Text hidden size of each family's real model.
HIDDEN: Dict[str, int] = {"qwen2_5_vl": 3584, "qwen3_vl": 4096}


def qwen2_5_vl_7b_text_config(n_layers: int) -> Any:
    """``Qwen2_5_VLTextConfig`` with Qwen2.5-VL-7B's attention and MLP shapes and ``n_layers`` layers."""
    from transformers import Qwen2_5_VLTextConfig

    return Qwen2_5_VLTextConfig(
        vocab_size=VOCAB,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=n_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )


def qwen3_vl_8b_text_config(n_layers: int) -> Any:
    """``Qwen3VLTextConfig`` with Qwen3-VL-8B's attention and MLP shapes and ``n_layers`` layers."""
    from transformers import Qwen3VLTextConfig

    return Qwen3VLTextConfig(
        vocab_size=VOCAB, hidden_size=4096, intermediate_size=12288, num_hidden_layers=n_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )


def build_text_model(family: str, n_layers: int, device: Any = "cuda") -> torch.nn.Module:
    """The text model of ``family`` (``qwen2_5_vl`` / ``qwen3_vl``) at its real shapes: random bf16 weights
    (seed 0), eval mode, sdpa attention, built on ``device``."""
    from transformers import Qwen2_5_VLTextModel, Qwen3VLTextModel

    if family == "qwen2_5_vl":
        cls, make = Qwen2_5_VLTextModel, qwen2_5_vl_7b_text_config
    elif family == "qwen3_vl":
        cls, make = Qwen3VLTextModel, qwen3_vl_8b_text_config
    else:  # pragma: no cover - test bug
        raise ValueError(family)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(make(n_layers)).to(torch.bfloat16).eval()
    model.config._attn_implementation_internal = "sdpa"
    return model


def video_like_embeds(seq: int, hidden: int, device: Any = "cuda", seed: int = 1, scale: float = 0.05,
                      frame_tokens: int = FRAME_TOKENS, text_tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """``[1, seq, hidden]`` bf16 on ``device``: slowly drifting video frames of ``frame_tokens`` tokens (the
    last one cut at ``seq``), neighbouring tokens alike, then ``text_tokens`` text-like random tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    frame = torch.randn(1, frame_tokens, hidden, device=device, generator=g)
    frames = []
    for _ in range(-(-seq // frame_tokens)):
        frame = 0.95 * frame + 0.3 * torch.randn(1, frame_tokens, hidden, device=device, generator=g)
        frames.append(frame)
    x = torch.cat(frames, dim=1)[:, :seq]
    x = 0.5 * (x + torch.roll(x, 1, dims=1))  # neighbouring tokens alike (patches of one frame)
    x[:, -text_tokens:] = torch.randn(1, text_tokens, hidden, device=device, generator=g)
    return (scale * x).to(torch.bfloat16)


def hidden_states(model: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """The last hidden state of a prefill of ``embeds`` (no cache)."""
    with torch.no_grad():
        return model(inputs_embeds=embeds, use_cache=False).last_hidden_state


def lm_head_logits(hidden: torch.Tensor, seed: int = 2, vocab: int = VOCAB, last: int = 1024) -> torch.Tensor:
    """Logits of a fixed random LM head (``vocab`` rows, seeded on ``hidden``'s device) for the last ``last``
    positions of ``hidden`` (a real model's head would not fit beside a 32k-token prefill)."""
    g = torch.Generator(device=hidden.device).manual_seed(seed)
    head = torch.randn(vocab, hidden.shape[-1], device=hidden.device, generator=g).to(hidden.dtype)
    return hidden[:, -last:] @ (head * hidden.shape[-1] ** -0.5).T
