"""Write a random-weight Qwen VL checkpoint whose language-model layers have a real model's shapes.

For multi-GPU checks of the lmms-eval harness without real weights. ``--arch`` picks the family:

* ``qwen2_5_vl`` (default): Qwen2.5-VL-7B's text shapes (hidden 3584, 28 query / 4 KV heads of head_dim 128,
  intermediate 18944, mRoPE sections (16, 24, 24)); a 2-block vision tower of width 1280 with
  ``out_hidden_size`` 3584; the tiny Qwen2.5-VL checkpoint's tokenizer and processor.
* ``qwen3_vl``: Qwen3-VL-8B's text shapes (hidden 4096, 32 query / 8 KV heads of head_dim 128, q/k norms,
  intermediate 12288, interleaved mRoPE sections (24, 20, 20)); a 2-block vision tower of Qwen3-VL's width
  1152 (16 heads, intermediate 4304, 48 x 48 learned positions, DeepStack after both blocks) with
  ``out_hidden_size`` 4096; the tiny Qwen3-VL checkpoint's tokenizer and processor.

Both have ``--layers`` decoder layers (28 / 36 in the real models; fewer keep the file small), the tiny
offline tokenizer (``psa_vlm.models.tiny``, a small vocabulary) and bf16 weights. lmms-eval serves them as
``qwen2_5_vl_psa`` and ``qwen3_vl_psa``.

    python3 benchmarks/make_7b_shaped.py /tmp/qwen7b_shaped --layers 4
    python3 benchmarks/make_7b_shaped.py /tmp/qwen3_8b_shaped --arch qwen3_vl --layers 4
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Dict

import torch

ARCHS = ("qwen2_5_vl", "qwen3_vl")
#: What the checkpoint's layers are shaped like, for the log line and the marker file.
SHAPE_OF = {"qwen2_5_vl": "Qwen2.5-VL-7B", "qwen3_vl": "Qwen3-VL-8B"}


def _qwen2_5_vl_kwargs(kw: Dict[str, Any], layers: int) -> Dict[str, Any]:
    kw["text_config"].update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                             num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    kw["text_config"]["rope_parameters"] = dict(kw["text_config"]["rope_parameters"], mrope_section=[16, 24, 24])
    kw["vision_config"].update(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16,
                               fullatt_block_indexes=[1], out_hidden_size=3584)
    return kw


def _qwen3_vl_kwargs(kw: Dict[str, Any], layers: int) -> Dict[str, Any]:
    kw["text_config"].update(hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=262144)
    kw["text_config"]["rope_parameters"] = dict(kw["text_config"]["rope_parameters"], mrope_section=[24, 20, 20],
                                                mrope_interleaved=True)
    kw["vision_config"].update(depth=2, hidden_size=1152, intermediate_size=4304, num_heads=16,
                               num_position_embeddings=2304, deepstack_visual_indexes=[0, 1], out_hidden_size=4096)
    return kw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=ARCHS, default="qwen2_5_vl",
                   help="qwen2_5_vl: Qwen2.5-VL-7B text shapes (default); qwen3_vl: Qwen3-VL-8B text shapes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import transformers
    from transformers import AutoProcessor

    from psa_vlm.models.tiny import build_tiny_checkpoint, generation_config, token_ids_and_vocab
    from psa_vlm.models.tiny_family import family_spec

    spec = family_spec(args.arch)
    # the tiny checkpoint of the family gives the tokenizer, processor and special-token ids
    base = build_tiny_checkpoint(args.out.parent / f"{args.out.name}-tiny-{args.arch}", family=args.arch)
    processor = AutoProcessor.from_pretrained(base)
    ids, vocab_size = token_ids_and_vocab(processor.tokenizer)
    kw = copy.deepcopy(spec.config_kwargs(vocab_size, ids))
    kw = (_qwen2_5_vl_kwargs if args.arch == "qwen2_5_vl" else _qwen3_vl_kwargs)(kw, args.layers)
    config = getattr(transformers, spec.config_class)(**kw)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = getattr(transformers, spec.model_class)(config).to(torch.bfloat16).eval()
    model.generation_config = generation_config(ids)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    marker = {"arch": args.arch, "shape_of": SHAPE_OF[args.arch], "layers": args.layers, "parameters": n}
    (args.out / "psa_vlm_7b_shaped.json").write_text(json.dumps(marker) + "\n")
    print(f"{args.out}: {n / 1e9:.2f} B parameters, {args.layers} layers of {SHAPE_OF[args.arch]} shape "
          f"({spec.model_class})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
