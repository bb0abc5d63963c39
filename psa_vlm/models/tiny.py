"""Tiny random-weight Qwen VL checkpoints with their processors, built offline in seconds.

Tests, the CLI demo and the lmms-eval smoke runs need a real checkpoint directory (model, tokenizer, image
and video processors, chat template) without the Hugging Face hub. This module builds one from scratch for
each supported family (``family=``: ``qwen2_vl``, ``qwen2_5_vl`` (the default), ``qwen3_vl``,
``qwen3_vl_moe``; what differs per family is in ``psa_vlm.models.tiny_family``). For Qwen2.5-VL:

* a small ``Qwen2_5_VLConfig`` (text: hidden 64, 3 layers, 4 query / 2 KV heads, head_dim 16, mRoPE;
  vision: 2 blocks of width 32, the real patch / merge geometry, ``out_hidden_size`` = text hidden size);
* a byte-level BPE trained on a built-in corpus and wrapped as ``Qwen2Tokenizer`` with Qwen's special
  tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ``<|vision_start|>``, ``<|image_pad|>``,
  ``<|video_pad|>``, ...) and a Qwen2-VL style chat template;
* ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` with small pixel budgets.

The config's ``image_token_id`` / ``video_token_id`` / ``vision_start_token_id`` / ``vision_end_token_id``
and the text config's ``bos/eos/pad`` ids are the tokenizer's. The directory then loads exactly like a
real checkpoint::

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    path = build_tiny_checkpoint("/tmp/tiny")          # or default_tiny_checkpoint()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

Any family loads the same way through the auto classes::

    from transformers import AutoModelForImageTextToText
    path = build_tiny_checkpoint("/tmp/tiny3", family="qwen3_vl")   # psa-vlm build-tiny --family qwen3_vl
    model = AutoModelForImageTextToText.from_pretrained(path)         # Qwen3VLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(path)                   # Qwen3VLProcessor

Builds are deterministic for a given ``family`` and ``seed`` (same weights, same tokenizer files).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .tiny_family import DEFAULT_FAMILY, FAMILIES, check_family, family_spec

__all__ = [
    "FAMILIES",
    "BUILDER_VERSION",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "tiny_config_kwargs",
    "token_ids_and_vocab",
    "generation_config",
    "build_tiny_checkpoint",
    "default_tiny_checkpoint",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the built checkpoint changes; part of the cache directory name.
BUILDER_VERSION = 2

#: Name of the marker file written last: its presence means the directory is a complete tiny checkpoint.
MARKER_FILE = "psa_vlm_tiny.json"

#: Qwen2.5-VL's special tokens, in Qwen's order (ids follow the BPE vocabulary in this order).
SPECIAL_TOKENS: Tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2-VL style chat template: system prompt by default, ``<|vision_start|><|video_pad|><|vision_end|>``
#: for each video item (``<|image_pad|>`` for images); the processor expands the pad tokens.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
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

# Pixel budgets: a 112x112 frame is 8x8 patches of 14 px -> 16 merged tokens per temporal patch.
_MIN_PIXELS = 28 * 28 * 4
_MAX_PIXELS = 28 * 28 * 64

_BPE_VOCAB_SIZE = 640

_CORPUS_LINES = (
    "You are a helpful assistant.",
    "Describe the video in detail.",
    "What is happening in this video? Answer with a single word.",
    "The red square moves from the left to the right while the blue circle stays still.",
    "How many objects appear in the first second of the clip?",
    "A person walks across the room, opens the door and leaves.",
    "The camera pans slowly over a green field under a cloudy sky.",
    "Question: which colour is the ball at the end? Options: A. red B. green C. blue D. yellow.",
    "Answer: A. The answer is B. I think it is C. It must be D.",
    "Pyramid sparse attention keeps important blocks sharp and sees the rest coarsely.",
    "Long videos produce tens of thousands of visual tokens before the question is asked.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Please watch the video carefully and then answer the question below.",
    "system user assistant image video frame second minute hour count colour shape motion",
    # the synthetic video QA's wording (psa_vlm.video.synth): every colour, shape and option word is one token
    "A coloured square appears briefly in the video. What colour is it?",
    "A coloured shape appears briefly in the video. What shape is it?",
    "Two coloured shapes appear one after the other in the video. In which order do they appear?",
    "A cyan square flashes on and off during the video. How many times does it appear?",
    "Answer with the option's letter from the given choices directly.",
    "Answer with a word or a short phrase.",
    "red green blue yellow magenta cyan square circle triangle cross",
    "the magenta triangle, then the cyan cross the yellow circle, then the green square",
)


# ---------------------------------------------------------------------------------------------- config
def tiny_config_kwargs(vocab_size: int, token_ids: Dict[str, int]) -> Dict[str, Any]:
    """Keyword arguments of the tiny ``Qwen2_5_VLConfig``.

    Args:
        vocab_size: Embedding rows (at least the tokenizer's length).
        token_ids: Ids of ``<|endoftext|>``, ``<|im_end|>``, ``<|image_pad|>``, ``<|video_pad|>``,
            ``<|vision_start|>`` and ``<|vision_end|>`` keyed by token string.

    Returns:
        A dict for ``Qwen2_5_VLConfig(**kwargs)``.
    """
    head_dim = 16
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        # mRoPE: temporal / height / width sections of the rotary half-dimension (sum = head_dim / 2).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    assert sum(text_config["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 56,
        "out_hidden_size": text_config["hidden_size"],
        "fullatt_block_indexes": [1],
        "hidden_act": "silu",
    }
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def token_ids_and_vocab(tokenizer: Any) -> Tuple[Dict[str, int], int]:
    """Ids of ``SPECIAL_TOKENS`` in ``tokenizer`` and the embedding rows for it (its length rounded up to 64)."""
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return token_ids, -(-len(tokenizer) // 64) * 64


def generation_config(token_ids: Dict[str, int]) -> Any:
    """Greedy ``GenerationConfig`` that stops at ``<|im_end|>`` or ``<|endoftext|>`` (also the pad token)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        pad_token_id=token_ids["<|endoftext|>"],
        do_sample=False,
    )


# ---------------------------------------------------------------------------------------------- tokenizer
def _corpus() -> List[str]:
    """Deterministic training text for the BPE (a few sentences, repeated with small variations)."""
    lines = list(_CORPUS_LINES)
    words = " ".join(_CORPUS_LINES).split()
    for i in range(200):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
    return lines


def _train_bpe() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Train a byte-level BPE with Qwen2's pre-tokenisation; return ``(vocab, merges)``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {str(k): int(v) for k, v in model["vocab"].items()}
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((a, b))
    return vocab, merges


def _build_tokenizer():
    """``Qwen2Tokenizer`` over the trained BPE, Qwen's special tokens appended after the BPE ids."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe()
    n = len(vocab)
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = n + i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    for tok in SPECIAL_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid != vocab[tok]:  # internal invariant: the special tokens keep their vocabulary ids
            raise RuntimeError(f"tiny tokenizer: {tok} got id {tid}, expected {vocab[tok]}")
    return tokenizer


# ---------------------------------------------------------------------------------------------- build
def _marker(seed: int) -> Dict[str, Any]:
    import transformers

    return {"builder": "psa_vlm.models.tiny", "builder_version": BUILDER_VERSION, "seed": seed,
            "transformers": transformers.__version__}


def _is_complete(path: Path, seed: Optional[int] = None, family: Optional[str] = None) -> bool:
    marker = path / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if data.get("builder_version") != BUILDER_VERSION:
        return False
    if family is not None and data.get("family", DEFAULT_FAMILY) != family:  # markers before families: 2.5-VL
        return False
    return seed is None or data.get("seed") == seed


def _write_checkpoint(path: Path, seed: int, family: str = DEFAULT_FAMILY) -> None:
    """Build the model and processor of ``family`` and ``save_pretrained`` both into ``path`` (an existing dir)."""
    import torch
    import transformers

    spec = family_spec(family)
    tokenizer = _build_tokenizer()
    token_ids, vocab_size = token_ids_and_vocab(tokenizer)
    config = getattr(transformers, spec.config_class)(**spec.config_kwargs(vocab_size, token_ids))

    # Deterministic weights without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, spec.model_class)(config).to(torch.float32).eval()
    model.generation_config = generation_config(token_ids)
    processor = spec.processor(tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    marker = {**_marker(seed), "family": family, "parameters": n_params}
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    logger.debug("tiny %s: %d parameters, vocab %d, written to %s", family, n_params, vocab_size, path)


def build_tiny_checkpoint(
    out_dir: Union[str, os.PathLike], *, family: str = DEFAULT_FAMILY, seed: int = 0, overwrite: bool = False
) -> Path:
    """Build a tiny random-weight checkpoint (model + processor) of ``family`` into ``out_dir``.

    The directory is written through a staging directory beside it and renamed into place, so a reader never
    sees a half-written checkpoint.

    Args:
        out_dir: Target directory. It may be missing or empty; a complete tiny checkpoint of the same
            family built with the same ``seed`` is reused as is. Any other content raises unless
            ``overwrite`` is set.
        family: ``qwen2_vl``, ``qwen2_5_vl`` (default), ``qwen3_vl`` or ``qwen3_vl_moe``
            (``psa_vlm.models.tiny_family`` says how they differ).
        seed: Seed of the random weights (the tokenizer is the same for every seed).
        overwrite: Replace an existing tiny checkpoint in ``out_dir`` (directories that are not tiny
            checkpoints are never deleted).

    Returns:
        The checkpoint directory as an absolute ``Path``.

    Raises:
        FileExistsError: ``out_dir`` holds something else (or a tiny checkpoint of another family or seed
            without ``overwrite``).
        ValueError: Unknown ``family``.
    """
    check_family(family)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if _is_complete(out, seed, family) and not overwrite:
            logger.info("tiny %s checkpoint already at %s (seed %d); reusing it", family, out, seed)
            return out
        if not (out / MARKER_FILE).is_file():
            raise FileExistsError(
                f"{out} is not empty and is not a psa_vlm tiny checkpoint; pass an empty or new directory"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a tiny checkpoint of another family/seed/version; pass overwrite=True"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(staging, seed, family)
        if out.is_dir():
            if any(out.iterdir()):
                shutil.rmtree(out)  # a tiny checkpoint (checked above), replaced on request
            else:
                out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("built tiny %s checkpoint at %s (seed %d)", family, out, seed)
    return out


def _cache_root() -> Path:
    env = os.environ.get("PSA_VLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "psa_vlm"


def default_tiny_checkpoint(seed: int = 0, family: str = DEFAULT_FAMILY) -> Path:
    """The tiny checkpoint in the cache (``$PSA_VLM_CACHE`` or ``~/.cache/psa_vlm``), built on first use.

    Safe when several processes call it at once: each builds into its own staging directory and the first
    rename wins; the others discard theirs and use the winner's.

    Args:
        seed: Seed of the random weights.
        family: Model family (``FAMILIES``); each has its own cache directory.

    Returns:
        Path of the cached checkpoint directory.

    Raises:
        ValueError: Unknown ``family``.
    """
    import transformers

    check_family(family)
    root = _cache_root()
    name = "qwen25vl" if family == DEFAULT_FAMILY else family.replace("_", "")  # the 2.5-VL name predates families
    target = root / f"tiny-{name}-v{BUILDER_VERSION}-tf{transformers.__version__}-seed{seed}"
    if _is_complete(target, seed, family):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_checkpoint(staging, seed, family)
        try:
            os.rename(staging, target)  # atomic; fails if another process got there first
            logger.info("built tiny %s checkpoint at %s", family, target)
        except OSError:
            if not _is_complete(target, seed, family):
                # a stale, incomplete directory (e.g. a killed build of an old version): replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psa-vlm build-tiny``."""
    from ..cli import nonnegative_int, output_dir

    parser.add_argument("--out", type=output_dir, default=None,
                        help="target directory (default: the shared cache, $PSA_VLM_CACHE or ~/.cache/psa_vlm)")
    parser.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILIES,
                        help=f"model family (default {DEFAULT_FAMILY})")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tiny checkpoint in --out")


def main(args: argparse.Namespace) -> int:
    """``psa-vlm build-tiny``: build the checkpoint and print its path on stdout."""
    from ..cli import CLIError

    try:
        path = (default_tiny_checkpoint(seed=args.seed, family=args.family) if args.out is None
                else build_tiny_checkpoint(args.out, family=args.family, seed=args.seed, overwrite=args.overwrite))
    except FileExistsError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:  # e.g. a read-only or virtual file system under --out
        raise CLIError(f"cannot write the checkpoint to {str(args.out)!r}: {exc.strerror or exc}") from None
    print(path)
    return 0
