"""Per-family parts of the tiny offline checkpoints: config, model class, processor and chat template.

``psa_vlm.models.tiny.build_tiny_checkpoint(out_dir, family=...)`` builds a tiny random-weight checkpoint of
any supported Qwen VL family; this module says what differs between the families. Every family shares the
tokenizer of ``psa_vlm.models.tiny`` (a byte-level BPE with Qwen's special tokens at the same positions) and
the text geometry (hidden 64, 3 layers, 4 query / 2 KV heads, head_dim 16, mRoPE), so that one test can run
the same prompt through each. What follows the real checkpoints of each family (transformers 5.x configs,
the processor classes ``AutoProcessor`` picks for them, the chat templates they ship):

============== ============================ ===================== ============ ========================
family         model class                  processor             vision patch video prompt per video
============== ============================ ===================== ============ ========================
qwen2_vl       Qwen2VLForConditionalGen.    Qwen2VLProcessor      14 px        ``<|vision_start|>`` +
                                                                               pads + ``<|vision_end|>``
qwen2_5_vl     Qwen2_5_VLForConditionalGen. Qwen2_5_VLProcessor   14 px        same; ``second_per_grid_ts``
qwen3_vl       Qwen3VLForConditionalGen.    Qwen3VLProcessor      16 px        per temporal patch:
                                                                               ``<t seconds>`` + start +
                                                                               pads + end
qwen3_vl_moe   Qwen3VLMoeForConditionalGen. Qwen3VLProcessor      16 px        as qwen3_vl
============== ============================ ===================== ============ ========================

Qwen3-VL's chat template has no default system prompt (Qwen2-VL's and Qwen2.5-VL's add "You are a helpful
assistant."); its video processor (``Qwen3VLVideoProcessor``) budgets pixels over the whole clip
(``size["longest_edge"]`` is ``T x H x W``), and its vision tower adds learned position embeddings
(``num_position_embeddings``, a square) and DeepStack features from ``deepstack_visual_indexes``.
Qwen3-VL uses interleaved mRoPE (``mrope_interleaved``); the tiny text config keeps the real ratio of its
sections as far as head_dim 16 allows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from ..inference import SUPPORTED_MODEL_TYPES

__all__ = [
    "FAMILIES",
    "DEFAULT_FAMILY",
    "FamilySpec",
    "family_spec",
    "check_family",
    "QWEN3_CHAT_TEMPLATE",
]

#: Supported families, by their ``config.json`` ``model_type`` (``psa_vlm.inference.SUPPORTED_MODEL_TYPES``).
FAMILIES: Tuple[str, ...] = SUPPORTED_MODEL_TYPES
#: The family built when none is named (the project's original model).
DEFAULT_FAMILY = "qwen2_5_vl"

#: Qwen3-VL-Instruct's chat template without tool calls and reasoning: a system turn only when given,
#: ``<|vision_start|><|video_pad|><|vision_end|>`` per video (the processor expands it into per-frame
#: timestamps and pads), ``<|vision_start|><|image_pad|><|vision_end|>`` per image.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}{{ 'Picture ' + image_count.value|string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}{{ 'Video ' + video_count.value|string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

# Qwen3-VL pixel budgets at patch 16 (32 px per merged token): a 64x64 frame is 4 merged tokens.
_QWEN3_MIN_PIXELS = 32 * 32 * 4
_QWEN3_MAX_PIXELS = 32 * 32 * 64
# Qwen3VLVideoProcessor budgets the whole clip (T x H x W): 16 merged tokens per frame for up to 32 frames
_QWEN3_VIDEO_MAX_PIXELS = 32 * 32 * 16 * 32


@dataclass(frozen=True)
class FamilySpec:
    """What the tiny builder needs to know about one family.

    Attributes:
        family: ``model_type`` of the family's ``config.json``.
        config_class: Name of the ``transformers`` config class.
        model_class: Name of the ``transformers`` conditional-generation class.
        patch_size: Vision patch size in pixels (merged tokens are ``2 * patch_size`` wide).
        chat_template: The Jinja chat template saved with the processor.
        config_kwargs: ``(vocab_size, token_ids) -> kwargs`` of the config class.
        processor: ``(tokenizer) -> processor`` (image + video processors + tokenizer + template).
    """

    family: str
    config_class: str
    model_class: str
    patch_size: int
    chat_template: str
    config_kwargs: Callable[[int, Dict[str, int]], Dict[str, Any]]
    processor: Callable[[Any], Any]


def check_family(family: str) -> str:
    """Return ``family`` if supported.

    Raises:
        ValueError: Unknown family (the message lists the supported ones).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


# ---------------------------------------------------------------------------------------------- configs
def _qwen2_vl_config(vocab_size: int, token_ids: Dict[str, int]) -> Dict[str, Any]:
    """Qwen2-VL: Qwen2.5-VL's text config; the older vision tower (``embed_dim``, ``mlp_ratio``, no window
    attention) whose ``hidden_size`` is the text hidden size."""
    from .tiny import tiny_config_kwargs

    kw = copy.deepcopy(tiny_config_kwargs(vocab_size, token_ids))
    kw["vision_config"] = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": kw["text_config"]["hidden_size"],
        "mlp_ratio": 2,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
    }
    return kw


def _qwen3_vision_config(out_hidden_size: int) -> Dict[str, Any]:
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": out_hidden_size,
        "num_position_embeddings": 64,  # an 8x8 grid of learned positions, interpolated per frame
        "deepstack_visual_indexes": [0, 1],
        "hidden_act": "gelu_pytorch_tanh",
    }


def _qwen3_text_config(vocab_size: int, token_ids: Dict[str, int]) -> Dict[str, Any]:
    head_dim = 16
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # Qwen3-VL-8B: mrope_section [24, 20, 20] of 64, interleaved; here 8 = head_dim / 2
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True},
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    return text


def _special_ids(token_ids: Dict[str, int]) -> Dict[str, int]:
    return {
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
    }


def _qwen3_vl_config(vocab_size: int, token_ids: Dict[str, int]) -> Dict[str, Any]:
    text = _qwen3_text_config(vocab_size, token_ids)
    return {"text_config": text, "vision_config": _qwen3_vision_config(text["hidden_size"]),
            **_special_ids(token_ids), "tie_word_embeddings": False}


def _qwen3_vl_moe_config(vocab_size: int, token_ids: Dict[str, int]) -> Dict[str, Any]:
    """Qwen3-VL-MoE: every decoder layer's MLP is a top-2 router over 4 small experts (the real 30B-A3B has
    top-8 of 128); the attention is Qwen3-VL's."""
    text = _qwen3_text_config(vocab_size, token_ids)
    text.update({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True})
    return {"text_config": text, "vision_config": _qwen3_vision_config(text["hidden_size"]),
            **_special_ids(token_ids), "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------------- processors
def _qwen2_processor(processor_class: str) -> Callable[[Any], Any]:
    def build(tokenizer: Any) -> Any:
        import transformers
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        from .tiny import _MAX_PIXELS, _MIN_PIXELS, CHAT_TEMPLATE

        kw = dict(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2)
        video_kw: Dict[str, Any] = dict(kw)
        if hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame"):  # transformers >= 5.2x: qwen-vl-utils' cap
            video_kw["cap_pixels_per_frame"] = True
        cls = getattr(transformers, processor_class)
        return cls(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                   video_processor=Qwen2VLVideoProcessor(**video_kw), chat_template=CHAT_TEMPLATE)

    return build


def _qwen3_processor(tokenizer: Any) -> Any:
    """``Qwen3VLProcessor`` as Qwen3-VL checkpoints configure it (patch 16, mean/std 0.5, 2 fps sampling)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image = Qwen2VLImageProcessor(min_pixels=_QWEN3_MIN_PIXELS, max_pixels=_QWEN3_MAX_PIXELS, patch_size=16,
                                  temporal_patch_size=2, merge_size=2, **norm)
    video_kw: Dict[str, Any] = dict(
        size={"shortest_edge": _QWEN3_MIN_PIXELS, "longest_edge": _QWEN3_VIDEO_MAX_PIXELS},
        patch_size=16, temporal_patch_size=2, merge_size=2, fps=2, min_frames=4, max_frames=64, **norm,
    )
    if hasattr(Qwen3VLVideoProcessor, "cap_pixels_per_frame"):  # transformers >= 5.2x: qwen-vl-utils' cap
        video_kw["cap_pixels_per_frame"] = True
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(**video_kw), chat_template=QWEN3_CHAT_TEMPLATE)


def family_spec(family: str) -> FamilySpec:
    """The ``FamilySpec`` of ``family`` (one of ``FAMILIES``).

    Raises:
        ValueError: Unknown family.
    """
    from .tiny import CHAT_TEMPLATE, tiny_config_kwargs

    check_family(family)
    if family == "qwen2_vl":
        return FamilySpec(family, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", 14, CHAT_TEMPLATE,
                          _qwen2_vl_config, _qwen2_processor("Qwen2VLProcessor"))
    if family == "qwen2_5_vl":
        return FamilySpec(family, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", 14, CHAT_TEMPLATE,
                          tiny_config_kwargs, _qwen2_processor("Qwen2_5_VLProcessor"))
    if family == "qwen3_vl":
        return FamilySpec(family, "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", 16, QWEN3_CHAT_TEMPLATE,
                          _qwen3_vl_config, _qwen3_processor)
    return FamilySpec(family, "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", 16, QWEN3_CHAT_TEMPLATE,
                      _qwen3_vl_moe_config, _qwen3_processor)
