"""``psa-vlm demo``: PSA against dense attention on synthetic video-like tensors (no model, no weights).

Prints, for the chosen preset: the level histogram, the FLOP-equivalent density, the relative error of the
output against exact dense causal attention, and the error of binary keep/drop block-sparse attention at the
same density (the baseline PSA must beat).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Dict, List, Tuple

import torch

from .api import BACKENDS, run_psa
from .bench.common import binary_config_at_density
from .bench.synthetic import video_like_qkv
from .config import PSAConfig

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import nonnegative_int, positive_int, preset_name

    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens (default 4096)")
    p.add_argument("--heads", type=positive_int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=positive_int, default=2, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="head dimension (default 64)")
    p.add_argument("--tokens-per-frame", type=positive_int, default=256, help="visual tokens per frame (default 256)")
    p.add_argument("--preset", type=preset_name, default="paper",
                   help=f"PSA preset: {', '.join(PSAConfig.preset_names())} (default paper)")
    p.add_argument("--block", type=positive_int, default=None,
                   help="block size for queries and keys (default: preset's)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=nonnegative_int, default=0)


def _config(args: argparse.Namespace) -> PSAConfig:
    cfg = PSAConfig.preset(args.preset)
    if args.block:
        cfg = cfg.replace(block_q=args.block, block_k=args.block)
    return cfg


def check_arguments(args: argparse.Namespace) -> None:
    """Checks across arguments, at parse time (``psa_vlm.cli``): one-line errors, exit status 2."""
    from .api import check_config_for_backend
    from .cli import CLIError

    if args.heads % args.kv_heads:
        raise CLIError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise CLIError(f"--device {args.device!r} is not a torch device (cuda or cpu)") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA GPU is visible")
    try:
        check_config_for_backend(_config(args), args.backend, device=device, head_dim=args.head_dim)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def compare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PSAConfig, backend: str
) -> List[Tuple[str, float, Dict[str, float], float, float]]:
    """Rows ``(method, density, histogram, rel_error, seconds)`` for dense, ``cfg`` and binary at equal density."""
    t0 = time.perf_counter()
    dense, _ = run_psa(q, k, v, cfg.replace(dense=True), backend=backend)
    t_dense = time.perf_counter() - t0
    rows = [("dense", 1.0, {"full": 1.0}, 0.0, t_dense)]
    t0 = time.perf_counter()
    out, plan = run_psa(q, k, v, cfg, backend=backend)
    t_psa = time.perf_counter() - t0
    d = plan.level_map.density()
    rows.append(("psa", d, plan.level_map.histogram(), _rel(out, dense), t_psa))
    binary, _ = binary_config_at_density(q, k, d, base=cfg, backend=backend)
    t0 = time.perf_counter()
    bout, bplan = run_psa(q, k, v, binary, backend=backend)
    t_bin = time.perf_counter() - t0
    rows.append(("binary", bplan.level_map.density(), bplan.level_map.histogram(), _rel(bout, dense), t_bin))
    return rows


def main(args: argparse.Namespace) -> int:
    from .cli import CLIError

    check_arguments(args)
    try:
        cfg = _config(args)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    q, k, v = video_like_qkv(
        1, args.heads, args.kv_heads, args.seq_len, args.head_dim,
        tokens_per_frame=args.tokens_per_frame, dtype=dtype, device=device, seed=args.seed,
    )
    logger.info("running dense, %s and binary attention on %d video-like tokens (%s, %s)",
                args.preset, args.seq_len, device, dtype)
    rows = compare(q, k, v, cfg, args.backend)
    print(f"PSA demo: {args.seq_len} tokens, {args.heads} query / {args.kv_heads} KV heads, head_dim "
          f"{args.head_dim}, preset {args.preset!r}, blocks {cfg.block_q}/{cfg.block_k}, {device}")
    print(f"{'method':<8} {'density':>8} {'full':>6} {'pool2':>6} {'pool4':>6} {'pool8':>6} {'skip':>6} "
          f"{'rel.err':>9} {'time s':>7}")
    for name, d, h, err, sec in rows:
        hist = " ".join(f"{h.get(x, 0.0):6.3f}" for x in ("full", "pool2", "pool4", "pool8", "skip"))
        print(f"{name:<8} {d:8.3f} {hist} {err:9.4f} {sec:7.2f}")
    psa_err, bin_err = rows[1][3], rows[2][3]
    verdict = "lower" if psa_err < bin_err else "NOT lower"
    print(f"PSA error is {verdict} than binary block-sparse at the same density "
          f"({psa_err:.4f} vs {bin_err:.4f}); sparsity {1 - rows[1][1]:.3f}.")
    return 0
