"""Write a random-weight Qwen2.5-VL checkpoint whose language-model layers have Qwen2.5-VL-7B's shapes.

For multi-GPU checks of the lmms-eval harness without real weights: hidden 3584, 28 query / 4 KV heads of
head_dim 128, intermediate 18944, mRoPE sections (16, 24, 24), ``--layers`` decoder layers (28 in the real
model; fewer keep the file small), a 2-block vision tower of width 1280 with ``out_hidden_size`` 3584, and the
tiny offline checkpoint's tokenizer and processor (``psa_vlm.models.tiny``). Weights are bf16.

    python3 benchmarks/make_7b_shaped.py /tmp/qwen7b_shaped --layers 4
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from psa_vlm.models.tiny import build_tiny_checkpoint, generation_config, tiny_config_kwargs, token_ids_and_vocab

    base = build_tiny_checkpoint(args.out.parent / (args.out.name + "-tiny-base"))
    processor = AutoProcessor.from_pretrained(base)
    ids, vocab_size = token_ids_and_vocab(processor.tokenizer)
    kw = copy.deepcopy(tiny_config_kwargs(vocab_size, ids))
    kw["text_config"].update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=args.layers,
                             num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    kw["text_config"]["rope_parameters"] = dict(kw["text_config"]["rope_parameters"], mrope_section=[16, 24, 24])
    kw["vision_config"].update(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16,
                               fullatt_block_indexes=[1], out_hidden_size=3584)
    config = Qwen2_5_VLConfig(**kw)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config = generation_config(ids)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    (args.out / "psa_vlm_7b_shaped.json").write_text(json.dumps({"layers": args.layers, "parameters": n}) + "\n")
    print(f"{args.out}: {n / 1e9:.2f} B parameters, {args.layers} layers of Qwen2.5-VL-7B shape", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
