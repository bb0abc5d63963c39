"""``psa-vlm bench-prefill``: time to first token of a Qwen2.5-VL-7B-shaped language model, PSA against dense.

By default the language model (28 layers, hidden 3584, 28 query / 4 KV heads, head_dim 128, intermediate
18944, mRoPE) is built with random weights in bf16 on the GPU, and a prefill of ``L`` tokens is its forward
over ``L`` video-like input embeddings plus the LM head on the last position: the work before the first answer
token once the vision tower has run. Without token ids PSA uses its documented fallback (the last
``text_tail`` tokens are the text question; everything before is video). With ``--model DIR`` the checkpoint
is loaded and each prompt is a synthetic mp4 of ``frames x --frame-size`` sized to ``L`` tokens, decoded by
qwen-vl-utils + decord and tokenised by the checkpoint's processor; the TTFT is then the whole model's
forward (vision tower included) and PSA gets the real token types. Methods: unpatched dense SDPA, PSA presets, and binary keep/drop at the density PSA measured.

Reported per (length, method): median TTFT over ``--reps`` runs (CUDA events), density, peak GPU memory,
speed-up over dense, and the attention share of dense TTFT (28 x one dense SDPA layer / TTFT, measured in the
same run). A speed-up is reported only if the patched model's first-token logits are finite and its
``"dense"`` preset reproduces unpatched logits to ``CHECK_TOL`` relative error (checked once per length; the
error is recorded). The input embeddings are video-like (``bench.synthetic``): smooth within a frame, slowly
drifting across frames, with a 512-token text tail.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import PRESETS, PSAConfig
from .common import append_csv, environment, write_markdown
from .synthetic import video_like_embeddings

logger = logging.getLogger(__name__)

COLUMNS = [
    "gpu", "seq_len", "method", "density", "ttft_s", "dense_ttft_s", "speedup", "peak_mem_gb",
    "dense_peak_mem_gb", "mem_over_dense_pct", "attn_share_dense", "ceiling", "check", "check_err", "layers",
    "torch", "triton", "transformers", "commit",
]
#: Relative error allowed between the "dense" preset's first-token logits and unpatched SDPA's.
CHECK_TOL = 5e-2
DEFAULT_METHODS = "dense,paper,quota-0.1,quota-0.2,quota-0.3,binary@quota-0.2,binary@paper"


def _known_method(name: str) -> bool:
    base = name.split("@", 1)[1] if name.startswith("binary@") else name
    return name == "dense" or base in PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import choice_list, existing_dir, output_file, positive_int, positive_int_list

    p.add_argument("--seq-lens", type=positive_int_list, default="16384,32768,65536,131072")
    p.add_argument("--methods", type=choice_list(_known_method, "methods"), default=DEFAULT_METHODS,
                   help="'dense' (unpatched SDPA), PSA presets, or 'binary@P' (keep/drop at P's measured density)")
    p.add_argument("--model", type=existing_dir, default=None,
                   help="local Qwen2.5-VL checkpoint (default: random 7B-shaped weights)")
    p.add_argument("--layers", type=positive_int, default=None, help="decoder layers (default: the model's, 28 for 7B)")
    p.add_argument("--frame-size", type=positive_int, default=448,
                   help="with --model: frame side in pixels of the synthetic video "
                        "(default 448: 256 tokens / 2 frames)")
    p.add_argument("--reps", type=positive_int, default=3, help="timed prefills per method (median)")
    p.add_argument("--out", type=output_file, default="eval/results/prefill.csv", help="CSV to append to ('' for none)")
    p.add_argument("--figure", type=output_file, default="eval/results/prefill.png", help="PNG figure ('' for none)")


def check_arguments(args: argparse.Namespace) -> None:
    """Checks across arguments, at parse time (``psa_vlm.cli``)."""
    from ..cli import CLIError

    for i, m in enumerate(args.methods):
        if m.startswith("binary@") and m.split("@", 1)[1] not in args.methods[:i]:
            raise CLIError(f"{m}: list {m.split('@', 1)[1]!r} before it in --methods (its density is measured first)")


def _text_config(layers: Optional[int]):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers or 28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=262144, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1, hidden_size=64, out_hidden_size=3584, num_heads=1, intermediate_size=64),
    )
    return cfg


def checkpoint_video_inputs(
    processor, n_tokens: int, workdir: Path, *, frame_size: int = 448, fps: float = 2.0, seed: int = 0
):
    """Processor inputs of about ``n_tokens`` prompt tokens, built the way ``psa-vlm run`` builds them.

    A synthetic mp4 of ``frames x frame_size^2`` (2 frames per temporal patch, ``(frame_size/28)^2`` tokens per
    pair of frames) is written with PyAV, decoded by qwen-vl-utils + decord and tokenised by the checkpoint's
    processor with its video metadata, so the video placeholder tokens, ``video_grid_thw`` and
    ``second_per_grid_ts`` are the real ones.

    Returns:
        The processor's ``BatchFeature`` on the CPU.
    """
    from ..inference import prepare_inputs, video_messages
    from ..video.synth import make_clip

    side = max(28, frame_size // 28 * 28)
    per_pair = (side // 28) ** 2
    pairs = max(1, (n_tokens - 64) // per_pair)  # ~64 tokens of chat template and question
    frames = 2 * pairs
    path = Path(workdir) / f"bench_prefill_{frames}x{side}.mp4"
    item = make_clip(path, frames=frames, width=side, height=side, fps=fps, seed=seed)
    msgs = video_messages(path, item.prompt(), nframes=frames, min_pixels=side * side, max_pixels=side * side)
    return prepare_inputs(processor, msgs)


def build_model(model_dir: Optional[str], layers: Optional[int]):
    """``Qwen2_5_VLForConditionalGeneration`` in bf16 on the GPU, SDPA attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if model_dir:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cuda"
        )
    else:
        cfg = _text_config(layers)
        cfg._attn_implementation = "sdpa"
        with torch.device("cuda"):
            torch.manual_seed(0)
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
            )
    return model.eval()


@torch.inference_mode()
def prefill(model, embeds) -> torch.Tensor:
    """First-token logits: the language model over ``embeds`` ``[1, L, hidden]`` plus the LM head on the last
    position, or (processor inputs from a checkpoint) the whole model, vision tower included."""
    if not isinstance(embeds, torch.Tensor):
        return model(**embeds, use_cache=True, logits_to_keep=1).logits
    lm = model.model.language_model
    out = lm(inputs_embeds=embeds, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1:])


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main(args: argparse.Namespace) -> int:
    from ..cli import CLIError
    from ..patches import patch_qwen25vl, psa_stats, unpatch_qwen25vl
    from .common import median_ms

    if not torch.cuda.is_available():
        raise CLIError("bench-prefill needs a CUDA GPU (H100/H200)")
    if args.model and not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model!r} is not a directory")
    env = environment()
    model = build_model(args.model, args.layers)
    processor = None
    workdir = tempfile.TemporaryDirectory(prefix="psa_vlm_bench_")
    if args.model:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
    tc = model.config.get_text_config()
    n_layers = tc.num_hidden_layers
    methods = list(args.methods)
    rows: List[Dict] = []
    for L in args.seq_lens:
        t_len = time.time()
        if args.model:
            # real video tokens through the checkpoint's processor (vision tower included in the TTFT)
            inputs = checkpoint_video_inputs(processor, L, Path(workdir.name), frame_size=args.frame_size)
            inputs = inputs.to("cuda")
            L = int(inputs["input_ids"].shape[1])
            embeds = inputs
        else:
            # video-like input embeddings (smooth within frames, slow drift across frames, a text tail)
            embeds = video_like_embeddings(L, tc.hidden_size, text_tokens=512, dtype=torch.bfloat16,
                                           device="cuda", seed=L)
        # attention share of dense prefill: one SDPA layer at this shape, times the layer count
        q = torch.randn(1, tc.num_attention_heads, L, 128, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(1, tc.num_key_value_heads, L, 128, device="cuda", dtype=torch.bfloat16)
        sdpa_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, kv, kv, is_causal=True, enable_gqa=True), rep=50)
        del q, kv
        # dense baseline (unpatched)
        unpatch_qwen25vl(model)
        prefill(model, embeds)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        dense_logits = prefill(model, embeds).float()
        dense_peak = torch.cuda.max_memory_allocated() / 2**30
        dense_t = _time(lambda: prefill(model, embeds), args.reps)
        share = n_layers * sdpa_ms / 1e3 / dense_t
        # check: the dense preset through the patch reproduces unpatched logits
        patch_qwen25vl(model, PSAConfig.preset("dense", min_seq_len=1024))
        pd = prefill(model, embeds).float()
        check_err = float((pd - dense_logits).norm() / dense_logits.norm())
        # bf16 through every layer: the Triton kernel and cuDNN round differently, so allow a few percent
        dense_ok = bool(torch.isfinite(pd).all()) and check_err < CHECK_TOL
        unpatch_qwen25vl(model)
        rows.append(dict(seq_len=L, method="dense", density=1.0, ttft_s=dense_t, dense_ttft_s=dense_t, speedup=1.0,
                         peak_mem_gb=dense_peak, dense_peak_mem_gb=dense_peak, mem_over_dense_pct=0.0,
                         attn_share_dense=share, ceiling=1.0, check="pass" if dense_ok else "FAIL",
                         check_err=check_err))
        logger.info("L=%d dense TTFT %.3f s (attention share %.2f); dense-preset check %s", L, dense_t, share,
                    dense_ok)
        measured: Dict[str, float] = {}
        for m in methods:
            if m == "dense":
                continue
            if m.startswith("binary@"):
                base = m.split("@", 1)[1]
                if base not in measured:
                    raise CLIError(f"{m}: list {base!r} before it in --methods")
                cfg = PSAConfig(mode="quota", pool_factors=(), quotas=(min(1.0, measured[base]), 0, 0, 0),
                                sim_thresholds=None)
            else:
                try:
                    cfg = PSAConfig.preset(m)
                except ValueError as exc:
                    raise CLIError(str(exc)) from None
            patch_qwen25vl(model, cfg.replace(min_seq_len=1024))
            prefill(model, embeds)  # warm-up / compile
            torch.cuda.reset_peak_memory_stats()
            logits = prefill(model, embeds).float()
            peak = torch.cuda.max_memory_allocated() / 2**30
            d = psa_stats(model)["density"]
            if d is None:
                raise CLIError(f"{m}: PSA did not run in the prefill of {L} tokens (see the log)")
            measured[m] = d
            t = _time(lambda: prefill(model, embeds), args.reps)
            unpatch_qwen25vl(model)
            ok = dense_ok and bool(torch.isfinite(logits).all())
            rows.append(dict(seq_len=L, method=m, density=d, ttft_s=t, dense_ttft_s=dense_t,
                             speedup=(dense_t / t) if ok else "", peak_mem_gb=peak, dense_peak_mem_gb=dense_peak,
                             mem_over_dense_pct=100 * (peak / dense_peak - 1), attn_share_dense=share,
                             ceiling=1 / ((1 - share) + share * d), check="pass" if ok else "FAIL",
                             check_err=check_err))
            logger.info("L=%d %s: density %.3f TTFT %.3f s (x%.2f), peak %.1f GB", L, m, d, t, dense_t / t, peak)
        del embeds
        torch.cuda.empty_cache()
        logger.info("L=%d done in %.0f s", L, time.time() - t_len)
    for r in rows:
        r.update(env, layers=n_layers)
        for k in list(r):
            if isinstance(r[k], float):
                r[k] = round(r[k], 4)
    if args.out:
        out = Path(args.out)
        append_csv(out, rows, COLUMNS)
        cond = (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
                f"commit {env['commit']}; Qwen2.5-VL-7B-shaped language model ({n_layers} layers, random bf16 "
                "weights unless a checkpoint is named), batch 1, TTFT = LM forward + LM head on the last token.")
        write_markdown(out.with_suffix(".md"), rows, ["seq_len", "method", "density", "ttft_s", "dense_ttft_s",
                       "speedup", "ceiling", "peak_mem_gb", "mem_over_dense_pct", "attn_share_dense", "check", "check_err"],
                       "Long-video prefill: time to first token", cond)
    if args.figure:
        _figure(rows, Path(args.figure), env["gpu"])
    print(f"\nbench-prefill on {env['gpu']} (commit {env['commit']}), {n_layers} layers")
    print(f"{'L':>7} {'method':<18} {'dens':>5} {'TTFT s':>7} {'dense s':>7} {'x':>5} {'ceil':>5} {'peakGB':>6} {'mem%':>5} {'chk':>4}")
    for r in rows:
        sp = f"{r['speedup']:5.2f}" if r["speedup"] != "" else "  n/a"
        print(f"{r['seq_len']:>7} {r['method']:<18} {r['density']:5.3f} {r['ttft_s']:7.3f} {r['dense_ttft_s']:7.3f} "
              f"{sp} {r['ceiling']:5.2f} {r['peak_mem_gb']:6.1f} {r['mem_over_dense_pct']:5.1f} {r['check']:>4}")
    return 0


def _figure(rows: List[Dict], path: Path, gpu: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the bench/eval extras
        logger.warning("matplotlib not installed: no figure written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["method"] for r in rows}):
        pts = sorted((r["seq_len"], r["speedup"]) for r in rows if r["method"] == m and r["speedup"] != "")
        if pts:
            ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens (k)")
    ax.set_ylabel("TTFT speed-up over dense SDPA")
    ax.set_title(f"Qwen2.5-VL-7B-shaped prefill, {gpu}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
