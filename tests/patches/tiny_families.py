"""Tiny random Qwen VL models of every family the patch supports, with real processors, built offline.

Used by the session fixtures in ``conftest.py`` (imported by name: pytest puts this directory on sys.path).

Each family is built once per test run (session scope): a ~0.1-0.7 M-parameter model in float32 (text: hidden
64, 4 query / 2 KV heads, head_dim 16, mRoPE) and its processor over the tiny BPE tokenizer of
``psa_vlm.models.tiny`` (same special tokens and Qwen2-VL style chat template; Qwen3-VL's processor then adds
its per-frame timestamps and vision markers itself). Qwen2.5-VL comes from the shared tiny checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# frames of the test clip: 12 frames of 224 x 112 at 4 fps (6 temporal patches)
FRAMES, WIDTH, HEIGHT, FPS = 12, 224, 112, 4.0


@dataclass
class Tiny:
    """One family's tiny model and processor."""

    family: str
    model: Any
    processor: Any
    patch_size: int  # vision patch size (14 for Qwen2/2.5-VL, 16 for Qwen3-VL)


def _text_config(token_ids: Dict[str, int], vocab_size: int, layers: int = 2, **extra) -> Dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "tie_word_embeddings": False,
        **extra,
    }


def _special(token_ids: Dict[str, int]) -> Dict[str, int]:
    return {
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
    }


def _cap(cls) -> Dict[str, Any]:
    """transformers >= 5.2x: qwen-vl-utils' per-frame pixel cap (silences the deprecation warning)."""
    return {"cap_pixels_per_frame": True} if hasattr(cls, "cap_pixels_per_frame") else {}


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().to(torch.float32).eval()


def build_tiny(family: str, tiny_checkpoint=None) -> Tiny:
    """Build one family's tiny model (random weights, seed 0) and processor."""
    import transformers as tf

    from psa_vlm.models.tiny import CHAT_TEMPLATE, _build_tokenizer, generation_config, token_ids_and_vocab

    if family == "qwen2_5_vl":
        model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
        return Tiny(family, model, tf.AutoProcessor.from_pretrained(tiny_checkpoint), 14)
    tokenizer = _build_tokenizer()
    token_ids, vocab_size = token_ids_and_vocab(tokenizer)
    if family == "qwen2_vl":
        text = _text_config(token_ids, vocab_size)
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **_special(token_ids))
        model = _seeded(lambda: tf.Qwen2VLForConditionalGeneration(config))
        kw = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, patch_size=14, temporal_patch_size=2, merge_size=2)
        processor = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                                        video_processor=tf.Qwen2VLVideoProcessor(**kw, **_cap(tf.Qwen2VLVideoProcessor)),
                                        chat_template=CHAT_TEMPLATE)
        patch = 14
    else:
        rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
                  "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
        if family == "qwen3_vl":
            text = _text_config(token_ids, vocab_size, rope_parameters=rope)
            config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **_special(token_ids))
            model = _seeded(lambda: tf.Qwen3VLForConditionalGeneration(config))
        elif family == "qwen3_vl_moe":
            text = _text_config(token_ids, vocab_size, rope_parameters=rope, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, decoder_sparse_step=1)
            config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_special(token_ids))
            model = _seeded(lambda: tf.Qwen3VLMoeForConditionalGeneration(config))
        else:  # pragma: no cover - test bug
            raise ValueError(family)
        size = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
        image_processor = tf.Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                                   min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
        video_processor = tf.Qwen3VLVideoProcessor(size=size, patch_size=16, temporal_patch_size=2, merge_size=2,
                                                   **_cap(tf.Qwen3VLVideoProcessor))
        processor = tf.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, chat_template=CHAT_TEMPLATE)
        patch = 16
    model.generation_config = generation_config(token_ids)
    return Tiny(family, model, processor, patch)


