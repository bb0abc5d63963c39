"""``psa-vlm bench-prefill``: time to first token of a 7B/8B-shaped Qwen VL language model, PSA against dense.

``--arch`` picks the shape of the random-weight language model, built in bf16 on the GPU:

- ``qwen2_5_vl`` (default): Qwen2.5-VL-7B (28 layers, hidden 3584, 28 query / 4 KV heads, head_dim 128,
  intermediate 18944, vocab 152064, mRoPE sections 16/24/24);
- ``qwen3_vl``: Qwen3-VL-8B (36 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, intermediate 12288,
  vocab 151936, interleaved mRoPE sections 24/20/20, rope theta 5e6, 256k native context: the values of the
  Qwen/Qwen3-VL-8B-Instruct ``config.json``; transformers' ``Qwen3VLTextConfig`` defaults are another size).
  Its default lengths are 32k-256k tokens, where attention is most of the prefill.

A prefill of ``L`` tokens is the language model's forward over ``L`` video-like input embeddings plus the LM head
on the last position: the work before the first answer token once the vision tower has run. Without token ids PSA
uses its documented fallback (the last ``text_tail`` tokens are the text question; everything before is video).
With ``--model DIR`` a checkpoint of any supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) is
loaded instead, and each prompt is a synthetic mp4 of ``frames x --frame-size`` sized to ``L`` tokens, decoded by
qwen-vl-utils + decord and tokenised by the checkpoint's own processor (Qwen3-VL: with its per-frame
timestamps); the TTFT is then the whole model's forward (vision tower included) and PSA gets the real token
types. Methods: unpatched dense SDPA, PSA presets (``psa_vlm.patch``), and binary keep/drop at the density PSA
measured.

Reported per (length, method): median TTFT over ``--reps`` runs (CUDA events), density, peak GPU memory,
speed-up over dense, and the attention share of dense TTFT (layers x one dense SDPA layer / TTFT, measured in the
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
from typing import Any, Dict, List, Optional

import torch

from ..config import PRESETS, PSAConfig
from .common import append_csv, environment, split_method, write_markdown
from .synthetic import video_like_embeddings

logger = logging.getLogger(__name__)

COLUMNS = [
    "gpu", "seq_len", "method", "backend", "density", "ttft_s", "dense_ttft_s", "fastest_dense", "speedup",
    "speedup_vs_sdpa", "sdpa_ttft_s", "dense_guard_layers", "peak_mem_gb",
    "dense_peak_mem_gb", "mem_over_dense_pct", "attn_share_dense", "ceiling", "check", "check_err", "layers",
    "torch", "triton", "transformers", "commit",
]
#: Relative error allowed between the "dense" preset's first-token logits and unpatched SDPA's.
CHECK_TOL = 5e-2
DEFAULT_METHODS = "dense,paper,quota-0.1,quota-0.2,quota-0.3,binary@quota-0.2,binary@paper"

#: Random-weight shapes ``--arch`` builds: config class, text config, description, default lengths, CSV.
ARCHS: Dict[str, Dict[str, Any]] = {
    "qwen2_5_vl": {
        "config_class": "Qwen2_5_VLConfig",
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=262144, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                      "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=1, hidden_size=64, num_heads=1, intermediate_size=64),
        "name": "Qwen2.5-VL-7B",
        "seq_lens": "16384,32768,65536,131072",
        "out": "eval/results/prefill.csv",
    },
    "qwen3_vl": {
        "config_class": "Qwen3VLConfig",
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, attention_bias=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        "vision": dict(depth=1, hidden_size=64, num_heads=1, intermediate_size=64, deepstack_visual_indexes=[]),
        "name": "Qwen3-VL-8B",
        "seq_lens": "32768,65536,131072,262144",
        "out": "eval/results/prefill_qwen3_vl.csv",
    },
}


def _known_method(name: str) -> bool:
    name, _ = split_method(name)
    base = name.split("@", 1)[1] if name.startswith("binary@") else name
    return name == "dense" or base in PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import choice_list, existing_dir, output_file, positive_int, positive_int_list

    p.add_argument("--arch", default="qwen2_5_vl", choices=sorted(ARCHS),
                   help="shape of the random-weight language model: qwen2_5_vl (Qwen2.5-VL-7B, default) or qwen3_vl "
                        "(Qwen3-VL-8B); ignored with --model")
    p.add_argument("--seq-lens", type=positive_int_list, default=None,
                   help="comma-separated prompt lengths (default: 16k-128k for qwen2_5_vl, 32k-256k for qwen3_vl)")
    p.add_argument("--methods", type=choice_list(_known_method, "methods"), default=DEFAULT_METHODS,
                   help="'dense' (unpatched SDPA), PSA presets, or 'binary@P' (keep/drop at P's measured density); "
                        "suffixes, each at most once and combinable: '/sN' sets the estimator stride, '/kv' the "
                        "GQA-shared estimator (estimate_heads='kv'), e.g. 'quota-0.2/s32', 'quota-0.2/s16/kv'")
    p.add_argument("--model", type=existing_dir, default=None,
                   help="local checkpoint of any supported family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe) "
                        "instead of random weights; prompts are real video tokens through its processor")
    p.add_argument("--layers", type=positive_int, default=None, help="decoder layers (default: the model's, 28 / 36)")
    p.add_argument("--frame-size", type=positive_int, default=448,
                   help="with --model: frame side in pixels of the synthetic video (default 448: 256 tokens per 2 "
                        "frames at patch 14, 196 at Qwen3-VL's patch 16)")
    p.add_argument("--reps", type=positive_int, default=3, help="timed prefills per method (median)")
    p.add_argument("--backend", default="auto", choices=("auto", "fa4", "triton"),
                   help="PSA backend (auto: FlashAttention-4 attend stage where installed, else Triton)")
    p.add_argument("--out", type=output_file, default=None,
                   help="CSV to append to ('' for none; default eval/results/prefill.csv for qwen2_5_vl, "
                        "prefill_qwen3_vl.csv for qwen3_vl, prefill_<model_type>_checkpoint.csv with --model)")
    p.add_argument("--figure", type=output_file, default=None,
                   help="PNG figure ('' for none; default: the CSV's name as .png)")


def check_arguments(args: argparse.Namespace) -> None:
    """Checks across arguments, at parse time (``psa_vlm.cli``)."""
    from ..cli import CLIError

    for i, full in enumerate(args.methods):
        m, changes = split_method(full)
        if m.startswith("binary@") and m.split("@", 1)[1] not in args.methods[:i]:
            raise CLIError(f"{full}: list {m.split('@', 1)[1]!r} before it in --methods (its density is measured first)")
        if changes:
            if m == "dense":
                raise CLIError(f"{full}: 'dense' has no estimator: its stride ('/sN') and heads ('/kv') cannot be set")
            try:
                PSAConfig.preset("paper", **changes)
            except ValueError as exc:
                raise CLIError(str(exc)) from None


def arch_config(arch: str, layers: Optional[int] = None, **text_overrides: Any) -> Any:
    """The composite transformers config of a random-weight ``--arch`` model (a one-block stand-in vision tower).

    Args:
        arch: A key of ``ARCHS`` (``qwen2_5_vl``, ``qwen3_vl``).
        layers: Decoder layers (default: the real model's).
        **text_overrides: Text-config fields to change (tests shrink the model with these).

    Returns:
        ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig`` with ``sdpa`` attention.

    Raises:
        ValueError: Unknown ``arch``.
    """
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    spec = ARCHS[arch]
    text = {**spec["text"], **text_overrides}
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = {**spec["vision"], "out_hidden_size": text["hidden_size"]}
    cfg = getattr(transformers, spec["config_class"])(text_config=text, vision_config=vision)
    cfg._attn_implementation = "sdpa"
    return cfg


def checkpoint_video_inputs(
    processor, n_tokens: int, workdir: Path, *, frame_size: int = 448, fps: float = 2.0, seed: int = 0
):
    """Processor inputs of about ``n_tokens`` prompt tokens, built the way ``psa-vlm run`` builds them.

    A synthetic mp4 of ``frames x side^2`` (``side``: ``frame_size`` rounded down to the merged-token size,
    ``2 x patch``: 28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL; 2 frames per temporal patch, ``(side/merged)^2``
    tokens per pair of frames) is written with PyAV, decoded by qwen-vl-utils + decord and tokenised by the
    checkpoint's processor with its video metadata, so the video placeholder tokens, ``video_grid_thw``, Qwen2.5-VL's
    ``second_per_grid_ts`` and Qwen3-VL's per-frame timestamps are the real ones. Qwen3-VL's per-patch structure
    (a ``<t seconds>`` timestamp and two markers) counts against the budget.

    Returns:
        The processor's ``BatchFeature`` on the CPU.
    """
    from ..inference import _is_qwen3_processor, prepare_inputs, video_messages
    from ..video.synth import make_clip

    vp = processor.video_processor
    merged = int(vp.patch_size) * int(vp.merge_size)
    side = max(merged, frame_size // merged * merged)
    per_pair = (side // merged) ** 2
    if _is_qwen3_processor(processor):  # "<t seconds>" + <|vision_start|> + ... + <|vision_end|> per patch
        longest = f"<{n_tokens / per_pair / fps * 2:.1f} seconds>"
        per_pair += len(processor.tokenizer(longest)["input_ids"]) + 2
    pairs = max(1, (n_tokens - 64) // per_pair)  # ~64 tokens of chat template and question
    frames = 2 * pairs
    path = Path(workdir) / f"bench_prefill_{frames}x{side}.mp4"
    item = make_clip(path, frames=frames, width=side, height=side, fps=fps, seed=seed)
    msgs = video_messages(path, item.prompt(), nframes=frames, min_pixels=side * side, max_pixels=side * side)
    return prepare_inputs(processor, msgs)


def build_model(model_dir: Optional[str], layers: Optional[int], arch: str = "qwen2_5_vl", *,
                device: str = "cuda", dtype: torch.dtype = torch.bfloat16, **text_overrides: Any):
    """The benchmarked model in eval mode, SDPA attention: a checkpoint of any supported family (through
    ``AutoModelForImageTextToText``) or random ``arch``-shaped weights (seed 0)."""
    from transformers import AutoModelForImageTextToText

    if model_dir:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", device_map=device
        )
    else:
        import transformers

        cfg = arch_config(arch, layers, **text_overrides)
        cls = getattr(transformers, ARCHS[arch]["config_class"].replace("Config", "ForConditionalGeneration"))
        with torch.device(device):
            torch.manual_seed(0)
            model = cls._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
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
    from ..inference import CheckpointError, checkpoint_family
    from ..patches import patch, psa_stats, unpatch
    from .common import median_ms

    if not torch.cuda.is_available():
        raise CLIError("bench-prefill needs a CUDA GPU (H100/H200)")
    if args.arch not in ARCHS:
        raise CLIError(f"unknown --arch {args.arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    if args.model:
        try:
            family = checkpoint_family(args.model)
        except CheckpointError as exc:
            raise CLIError(str(exc)) from None
        shape = f"{family} checkpoint {args.model}"
        default_out = f"eval/results/prefill_{family}_checkpoint.csv"
    else:
        shape = f"{ARCHS[args.arch]['name']}-shaped language model (random bf16 weights)"
        default_out = ARCHS[args.arch]["out"]
    out_csv = default_out if args.out is None else args.out
    figure = (str(Path(out_csv).with_suffix(".png")) if out_csv else "") if args.figure is None else args.figure
    seq_lens = args.seq_lens if args.seq_lens is not None else [int(x) for x in ARCHS[args.arch]["seq_lens"].split(",")]
    from ..api import attend_backend, resolve_backend
    from ..kernels.attention.fa4 import fa4_available

    try:
        backend = resolve_backend(args.backend, torch.device("cuda"))
    except (ImportError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    env = environment()
    model = build_model(args.model, args.layers, args.arch)
    processor = None
    workdir = tempfile.TemporaryDirectory(prefix="psa_vlm_bench_")
    if args.model:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
    tc = model.config.get_text_config()
    n_layers = tc.num_hidden_layers
    methods = list(args.methods)
    rows: List[Dict] = []
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    for L in seq_lens:
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
        q = torch.randn(1, tc.num_attention_heads, L, head_dim, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(1, tc.num_key_value_heads, L, head_dim, device="cuda", dtype=torch.bfloat16)
        sdpa_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, kv, kv, is_causal=True, enable_gqa=True), rep=50)
        del q, kv
        # dense baseline (unpatched)
        unpatch(model)
        prefill(model, embeds)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        dense_logits = prefill(model, embeds).float()
        dense_peak = torch.cuda.max_memory_allocated() / 2**30
        dense_t = _time(lambda: prefill(model, embeds), args.reps)
        share = n_layers * sdpa_ms / 1e3 / dense_t
        # check: the dense preset through the patch reproduces unpatched logits
        patch(model, PSAConfig.preset("dense", min_seq_len=1024))
        pd = prefill(model, embeds).float()
        check_err = float((pd - dense_logits).norm() / dense_logits.norm())
        # bf16 through every layer: the Triton kernel and cuDNN round differently, so allow a few percent
        dense_ok = bool(torch.isfinite(pd).all()) and check_err < CHECK_TOL
        unpatch(model)
        rows.append(dict(seq_len=L, method="dense", backend="sdpa", density=1.0, ttft_s=dense_t,
                         peak_mem_gb=dense_peak, dense_peak_mem_gb=dense_peak, mem_over_dense_pct=0.0,
                         attn_share_dense=share, ceiling=1.0, check="pass" if dense_ok else "FAIL",
                         check_err=check_err))
        logger.info("L=%d dense TTFT %.3f s (attention share %.2f); dense-preset check %s", L, dense_t, share,
                    dense_ok)
        sdpa_t = dense_t
        if fa4_available():
            # the other dense attention a user has: FlashAttention-4's (the dense preset on the fa4 backend
            # calls it directly); the speed-ups below are against the faster of the two
            patch(model, PSAConfig.preset("dense", min_seq_len=1024), backend="fa4")
            prefill(model, embeds)
            torch.cuda.reset_peak_memory_stats()
            f4 = prefill(model, embeds).float()
            f4_peak = torch.cuda.max_memory_allocated() / 2**30
            f4_err = float((f4 - dense_logits).norm() / dense_logits.norm())
            f4_t = _time(lambda: prefill(model, embeds), args.reps)
            unpatch(model)
            f4_ok = bool(torch.isfinite(f4).all()) and f4_err < CHECK_TOL
            rows.append(dict(seq_len=L, method="dense-fa4", backend="fa4", density=1.0, ttft_s=f4_t,
                             peak_mem_gb=f4_peak, dense_peak_mem_gb=dense_peak,
                             mem_over_dense_pct=100 * (f4_peak / dense_peak - 1), attn_share_dense=share, ceiling=1.0,
                             check="pass" if f4_ok else "FAIL", check_err=f4_err))
            logger.info("L=%d FlashAttention-4 dense TTFT %.3f s (rel. err %.4f)", L, f4_t, f4_err)
            if f4_ok and f4_t < dense_t:
                dense_t = f4_t
        fastest = "dense-fa4" if dense_t != sdpa_t else "dense"
        for r in rows:
            if r["seq_len"] == L:
                r.update(dense_ttft_s=dense_t, fastest_dense=fastest, speedup=dense_t / r["ttft_s"],
                         speedup_vs_sdpa=sdpa_t / r["ttft_s"], sdpa_ttft_s=sdpa_t)
        measured: Dict[str, float] = {}
        for full in methods:
            if full == "dense":
                continue
            m, changes = split_method(full)
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
            if changes:
                cfg = cfg.replace(**changes)
            # the requested backend ("auto" by default): every layer call takes a user's decisions
            patch(model, cfg.replace(min_seq_len=1024), backend=args.backend)
            prefill(model, embeds)  # warm-up / compile
            torch.cuda.reset_peak_memory_stats()
            logits = prefill(model, embeds).float()
            peak = torch.cuda.max_memory_allocated() / 2**30
            st = psa_stats(model)
            d = st["density"]
            if d is None:
                raise CLIError(f"{full}: PSA did not run in the prefill of {L} tokens (see the log)")
            measured[full] = d
            t = _time(lambda: prefill(model, embeds), args.reps)
            unpatch(model)
            ok = dense_ok and bool(torch.isfinite(logits).all())
            engines = st.get("attend_backends") or {}  # per layer under "auto"
            if len(engines) == 1:
                be_label = next(iter(engines))
            elif engines:
                be_label = " + ".join(f"{e} x{n}" for e, n in sorted(engines.items()))
            elif st.get("dense_guard_layers"):
                be_label = "dense"  # every layer ran dense attention before planning (the dense guard)
            else:
                be_label = attend_backend(args.backend, backend, L)
            rows.append(dict(seq_len=L, method=full, backend=be_label, density=d,
                             ttft_s=t, dense_ttft_s=dense_t,
                             fastest_dense=fastest, speedup=(dense_t / t) if ok else "",
                             speedup_vs_sdpa=(sdpa_t / t) if ok else "", sdpa_ttft_s=sdpa_t,
                             dense_guard_layers=st.get("dense_guard_layers", 0), peak_mem_gb=peak,
                             dense_peak_mem_gb=dense_peak,
                             mem_over_dense_pct=100 * (peak / dense_peak - 1), attn_share_dense=share,
                             ceiling=1 / ((1 - share) + share * d), check="pass" if ok else "FAIL",
                             check_err=check_err))
            logger.info("L=%d %s: density %.3f TTFT %.3f s (x%.2f), peak %.1f GB", L, full, d, t, dense_t / t, peak)
        del embeds
        torch.cuda.empty_cache()
        logger.info("L=%d done in %.0f s", L, time.time() - t_len)
    for r in rows:
        r.update(env, layers=n_layers)
        for k in list(r):
            if isinstance(r[k], float):
                r[k] = round(r[k], 4)
    if out_csv:
        out = Path(out_csv)
        append_csv(out, rows, COLUMNS)
        cond = (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
                f"commit {env['commit']}; {shape}, {n_layers} layers, batch 1, TTFT = "
                + ("whole-model forward (vision tower included) on real video tokens." if args.model
                   else "LM forward + LM head on the last token."))
        write_markdown(out.with_suffix(".md"), rows, ["seq_len", "method", "backend", "density", "ttft_s",
                       "sdpa_ttft_s", "dense_ttft_s", "fastest_dense", "speedup", "speedup_vs_sdpa", "ceiling",
                       "dense_guard_layers", "peak_mem_gb", "mem_over_dense_pct", "attn_share_dense", "check",
                       "check_err"],
                       "Long-video prefill: time to first token", cond)
    if figure:
        _figure(rows, Path(figure), env["gpu"], shape.split(" (")[0])
    print(f"\nbench-prefill on {env['gpu']} (commit {env['commit']}), {n_layers} layers, PSA backend {backend}; "
          "x = over the fastest dense (SDPA or FlashAttention-4), xsd = over SDPA")
    print(f"{'L':>7} {'method':<18} {'dens':>5} {'TTFT s':>7} {'fastest':>7} {'x':>5} {'xsd':>5} {'ceil':>5} "
          f"{'peakGB':>6} {'mem%':>5} {'chk':>4}")
    for r in rows:
        sp = f"{r['speedup']:5.2f}" if r["speedup"] != "" else "  n/a"
        ss = f"{r['speedup_vs_sdpa']:5.2f}" if r["speedup_vs_sdpa"] != "" else "  n/a"
        print(f"{r['seq_len']:>7} {r['method']:<18} {r['density']:5.3f} {r['ttft_s']:7.3f} {r['dense_ttft_s']:7.3f} "
              f"{sp} {ss} {r['ceiling']:5.2f} {r['peak_mem_gb']:6.1f} {r['mem_over_dense_pct']:5.1f} {r['check']:>4}")
    return 0


def _figure(rows: List[Dict], path: Path, gpu: str, shape: str) -> None:
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
    ax.set_title(f"{shape} prefill, {gpu}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
