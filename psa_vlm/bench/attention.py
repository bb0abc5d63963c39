"""``psa-vlm bench-attention``: one attention layer at Qwen2.5-VL-7B shapes, PSA stages against dense attention.

For every length and preset, in one run: correctness of each stage of the chosen backend against the PyTorch
reference (pool, estimate, assign on the same inputs; attention on sampled query blocks), then CUDA-event medians
of every dense baseline a user has (cuDNN SDPA, FlashAttention-2 through SDPA's flash backend, FlashAttention-4
dense when installed), of each stage (pool, estimate, assign, attend) and of the whole ``psa_attention`` call, the
density, level histogram, whether the dense guard ran dense attention, and the extra GPU memory of the call. The
speed-up is against the *fastest* dense baseline of the run (and, separately, against cuDNN SDPA); it is printed
only for a configuration whose checks passed in this run. Rows are appended to ``eval/results/attention.csv``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import PRESETS, PSAConfig
from .common import append_csv, binary_config_at_density, split_method, environment, median_ms, write_markdown

logger = logging.getLogger(__name__)

COLUMNS = [
    "gpu", "seq_len", "preset", "backend", "density", "dense_ms", "fastest_dense", "psa_ms", "speedup",
    "speedup_vs_cudnn", "dense_cudnn_ms", "dense_fa2_ms", "dense_fa4_ms", "dense_guard",
    "pool_ms", "estimate_ms", "assign_ms", "attend_ms", "overhead_pct_of_dense", "attend_over_ideal",
    "full", "pool2", "pool4", "pool8", "skip", "extra_mem_mb", "kv_mb", "check", "max_rel_err", "err_vs_dense",
    "input", "heads", "kv_heads", "head_dim", "dtype", "torch", "triton", "commit",
]
MD_COLUMNS = [
    "seq_len", "preset", "backend", "density", "dense_cudnn_ms", "dense_fa2_ms", "dense_fa4_ms", "psa_ms",
    "speedup", "speedup_vs_cudnn", "pool_ms", "estimate_ms", "assign_ms", "attend_ms", "overhead_pct_of_dense",
    "attend_over_ideal", "err_vs_dense", "dense_guard", "extra_mem_mb", "check",
]
DEFAULT_PRESETS = "quota-0.1,binary-0.1,quota-0.2,binary-0.2,quota-0.3,binary-0.3,paper,binary@paper"


def _known_method(name: str) -> bool:
    name, _ = split_method(name)
    return name in PRESETS or (name.startswith("binary@") and name.split("@", 1)[1] in PRESETS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import choice_list, output_file, positive_int, positive_int_list

    p.add_argument("--seq-lens", type=positive_int_list, default="16384,32768,65536,131072",
                   help="comma-separated token counts")
    p.add_argument("--presets", type=choice_list(_known_method, "presets"), default=DEFAULT_PRESETS,
                   help="comma-separated presets; 'binary@P' is keep/drop with its quota corrected to P's "
                        "measured density; suffixes, each at most once and combinable: '/sN' sets the estimator "
                        "stride, '/kv' the GQA-shared estimator (estimate_heads='kv'), e.g. 'quota-0.2/s32', "
                        "'quota-0.2/s16/kv'")
    p.add_argument("--heads", type=positive_int, default=28)
    p.add_argument("--kv-heads", type=positive_int, default=4)
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--input", choices=("video", "random"), default="video", help="video-like or random q/k/v")
    p.add_argument("--rep", type=positive_int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--out", type=output_file, default="eval/results/attention.csv",
                   help="CSV to append to ('' for none)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks (no speed-ups printed)")
    p.add_argument("--backend", default="auto", choices=("auto", "fa4", "triton"),
                   help="PSA backend (auto: FlashAttention-4 attend stage where installed, else Triton)")


# ------------------------------------------------------------------------------------------- helpers
def dense_baselines(q, k, v, rep: int) -> Dict[str, float]:
    """Medians (ms) of every dense causal attention available: ``cudnn`` and ``fa2`` (SDPA backends, GQA without
    copies) and ``fa4`` (FlashAttention-4, when installed); a baseline that cannot run is left out."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels.attention.fa4 import dense_attention, fa4_available

    res: Dict[str, float] = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        try:
            fn()
        except RuntimeError as exc:
            logger.warning("dense baseline %s unavailable: %s", name, str(exc).splitlines()[0][:120])
            continue
        res[name] = median_ms(fn, rep=rep)
    if fa4_available(q.device):
        res["fa4"] = median_ms(lambda: dense_attention(q, k, v), rep=rep)
    if not res:
        raise RuntimeError("no dense attention baseline could run")
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _config_for(name: str, measured: Dict[str, float], q: torch.Tensor, k: torch.Tensor) -> PSAConfig:
    name, changes = split_method(name)
    if changes:
        return _config_for(name, measured, q, k).replace(**changes)
    if name.startswith("binary@"):
        base = name.split("@", 1)[1]
        if base not in measured:
            raise ValueError(f"{name}: run preset {base!r} earlier in --presets to match its density")
        cfg, _ = binary_config_at_density(q, k, measured[base], backend="triton")
        cfg = cfg.replace(dense_guard=PSAConfig.preset(base).dense_guard)
        return cfg
    return PSAConfig.preset(name)


def check_stages(q, k, v, cfg: PSAConfig, tol: float = 1e-2, backend: str = "triton") -> Dict[str, float]:
    """The backend's stages against the PyTorch reference on the same inputs; returns error measures."""
    from ..api import _ops, block_flags, estimator_queries, share_in_groups
    from ..kernels.assign import naive as nassign
    from ..kernels.attention import naive as nattn
    from ..kernels.estimate import naive as nest
    from ..kernels.pool import naive as npool

    t_pool, t_est, t_assign, t_attn = _ops(backend)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    scale = 1.0 / math.sqrt(D)
    res: Dict[str, float] = {}
    factors = tuple(cfg.pool_factors)
    kp, vp, cap = t_pool(k, v, block_k=bk, factors=factors, sim_thresholds=cfg.sim_thresholds)
    rkp, rvp, rcap = npool.pyramid_pool(k, v, block_k=bk, factors=factors, sim_thresholds=cfg.sim_thresholds)
    res["pool"] = max(_rel(kp, rkp), _rel(vp, rvp)) if kp.numel() else 0.0
    res["cap_mismatch"] = float((cap != rcap).float().mean())
    kv_flags, q_flags = block_flags(B, Lq, Lk, cfg, q.device)
    if not cfg.dense:
        qe = estimator_queries(q, k.shape[1], cfg)  # the group-mean queries with estimate_heads="kv"
        s = t_est(qe, k, block_q=bq, block_k=bk, stride=cfg.stride, scale=scale)
        rs = nest.block_importance(qe, k, block_q=bq, block_k=bk, stride=cfg.stride, scale=scale)
        res["estimate"] = _rel(s, rs)
    else:
        rs = torch.zeros(B, Hq, -(-Lq // bq), -(-Lk // bk), device=q.device)
    # assignment on identical (reference) scores and caps
    f, kv_idx, counts = share_in_groups(t_assign(rs, rcap, kv_flags, q_flags, lq=Lq, lk=Lk, config=cfg), Hq)
    rf, _, _ = share_in_groups(nassign.assign_levels(rs, rcap, kv_flags, q_flags, lq=Lq, lk=Lk, config=cfg), Hq)
    res["assign_mismatch"] = float((f != rf).float().mean())
    # attention on sampled query blocks (first, middle, last) against the reference on the same lists
    nq = kv_idx.shape[2]
    out = torch.full_like(q, float("nan"))
    t_attn(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=factors, scale=scale, out=out)
    errs = []
    for i in sorted({0, nq // 2, nq - 1}):
        r0, r1 = i * bq, min((i + 1) * bq, Lq)
        kend = Lk - Lq + r1
        ksub, vsub = k[:, :, :kend], v[:, :, :kend]
        skp, svp, _ = npool.pyramid_pool(ksub, vsub, block_k=bk, factors=factors, sim_thresholds=None)
        ref = nattn.sparse_attention(
            q[:, :, r0:r1], ksub, vsub, skp, svp, kv_idx[:, :, i : i + 1], counts[:, :, i : i + 1],
            block_q=bq, block_k=bk, factors=factors, scale=scale,
        )
        errs.append(_rel(out[:, :, r0:r1], ref))
    res["attention"] = max(errs)
    res["nan"] = float(torch.isnan(out).any())
    res["ok"] = float(
        res["pool"] < tol and res.get("estimate", 0.0) < tol and res["assign_mismatch"] < 1e-3
        and res["attention"] < tol and res["nan"] == 0.0 and res["cap_mismatch"] < 1e-3
    )
    return res


def bench_one(q, k, v, cfg: PSAConfig, dense: Dict[str, float], rep: int, backend: str,
              requested: Optional[str] = None) -> Dict[str, float]:
    """Stage and whole-call timings (ms), density, histogram and extra memory for one configuration.

    ``dense`` holds the dense baselines of the run; the speed-up is against the fastest of them,
    ``attend_over_ideal`` is the attend stage over ``density x cuDNN dense`` (the kernel issue's yardstick).
    ``backend`` runs the stage timings; ``requested`` (default ``backend``) is what the whole call is given, e.g.
    ``"auto"``, so that the whole call takes the same decisions a user's call takes (the attend-stage engine,
    ``PSAPlan.attend_backend``; the dense guard).
    """
    call_backend = backend if requested is None else requested  # the whole call as a user's (``"auto"``) runs
    from ..api import _ops, block_flags, estimator_queries, run_psa, share_in_groups

    t_pool, t_est, t_assign, t_attn = _ops(backend)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    scale = 1.0 / math.sqrt(D)
    factors = tuple(cfg.pool_factors)
    row: Dict[str, float] = {}
    # whole call first (also compiles everything), with its memory high-water mark
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, plan = run_psa(q, k, v, cfg, backend=call_backend)
    torch.cuda.synchronize()
    row["extra_mem_mb"] = (torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()) / 2**20
    del out
    row["psa_ms"] = median_ms(lambda: run_psa(q, k, v, cfg, backend=call_backend), rep=rep)
    row["dense_guard"] = "dense" if plan.dense_reason else ""
    if plan.dense_reason:  # the stages below time the sparse plan (the dense guard's shortcut has none)
        _, plan = run_psa(q, k, v, cfg, backend=backend, plan_only=True)
    lm = plan.level_map
    row["density"] = lm.density()
    row.update(lm.histogram())
    kp, vp = plan.k_pooled, plan.v_pooled
    row["pool_ms"] = median_ms(
        lambda: t_pool(k, v, block_k=bk, factors=factors, sim_thresholds=cfg.sim_thresholds), rep=rep
    ) if (factors and not cfg.dense) else 0.0
    if cfg.dense:
        row["estimate_ms"] = 0.0
        scores = torch.zeros(B, Hq, -(-Lq // bq), -(-Lk // bk), device=q.device)
    else:
        # the stage as run_psa runs it: with estimate_heads="kv" the group mean of the queries is part of it
        def estimate():
            return t_est(estimator_queries(q, k.shape[1], cfg), k, block_q=bq, block_k=bk, stride=cfg.stride,
                         scale=scale)

        row["estimate_ms"] = median_ms(estimate, rep=rep)
        scores = estimate()
    _, _, cap = t_pool(k, v, block_k=bk, factors=factors, sim_thresholds=cfg.sim_thresholds)

    def assign():
        kv_flags, q_flags = block_flags(B, Lq, Lk, cfg, q.device)
        return share_in_groups(t_assign(scores, cap, kv_flags, q_flags, lq=Lq, lk=Lk, config=cfg), Hq)

    row["assign_ms"] = median_ms(assign, rep=rep)
    o = torch.empty_like(q)
    row["attend_ms"] = median_ms(
        lambda: t_attn(q, k, v, kp, vp, plan.kv_idx, plan.counts, block_q=bq, block_k=bk, factors=factors,
                       scale=scale, out=o),
        rep=rep,
    )
    fastest = min(dense.values())
    cudnn = dense.get("cudnn", fastest)
    row["speedup"] = fastest / row["psa_ms"]
    row["speedup_vs_cudnn"] = cudnn / row["psa_ms"]
    row["overhead_pct_of_dense"] = 100.0 * (row["pool_ms"] + row["estimate_ms"] + row["assign_ms"]) / cudnn
    row["attend_over_ideal"] = row["attend_ms"] / max(row["density"] * cudnn, 1e-9)
    return row


def check_arguments(args: argparse.Namespace) -> None:
    """Checks across arguments, at parse time (``psa_vlm.cli``)."""
    from ..api import check_config_for_backend
    from ..cli import CLIError

    if args.heads % args.kv_heads:
        raise CLIError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    for full in args.presets:
        name, changes = split_method(full)
        base = name.split("@", 1)[1] if name.startswith("binary@") else name
        if name.startswith("binary@") and base not in args.presets[: args.presets.index(full)]:
            raise CLIError(f"{full}: list preset {base!r} before it in --presets (its density is measured first)")
        if changes and base == "dense":
            raise CLIError(f"{full}: 'dense' has no estimator: its stride ('/sN') and heads ('/kv') cannot be set")
        try:  # the Triton kernels' limits (head_dim <= 256), a stride that divides the blocks
            cfg = PSAConfig.preset(base, **changes)
            check_config_for_backend(cfg, "triton", device="cuda", head_dim=args.head_dim)
        except ValueError as exc:
            raise CLIError(str(exc)) from None


def main(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    if not torch.cuda.is_available():
        raise CLIError("bench-attention needs a CUDA GPU (H100/H200); use `psa-vlm demo` on the CPU")
    from .synthetic import video_like_qkv

    from ..api import attend_backend, resolve_backend, run_psa

    env = environment()
    try:
        backend = resolve_backend(args.backend, torch.device("cuda"))
    except (ImportError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    seq_lens = args.seq_lens
    presets = args.presets
    results: List[Dict] = []
    torch.manual_seed(0)
    for L in seq_lens:
        t0 = time.time()
        if args.input == "video":
            q, k, v = video_like_qkv(1, args.heads, args.kv_heads, L, args.head_dim, dtype=torch.bfloat16,
                                     device="cuda", seed=L)
        else:
            q = torch.randn(1, args.heads, L, args.head_dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, args.kv_heads, L, args.head_dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, args.kv_heads, L, args.head_dim, device="cuda", dtype=torch.bfloat16)
        dense = dense_baselines(q, k, v, args.rep)
        # exact causal attention (SDPA), the yardstick of each row's err_vs_dense (a fidelity measure, not a check)
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        fastest = min(dense, key=dense.get)
        dense_ms = dense[fastest]
        kv_mb = 2 * k.numel() * k.element_size() / 2**20
        logger.info("L=%d dense: %s", L, ", ".join(f"{n} {t:.2f} ms" for n, t in dense.items()))
        measured: Dict[str, float] = {}
        for name in presets:
            try:
                cfg = _config_for(name, measured, q, k)
            except ValueError as exc:
                raise CLIError(str(exc)) from None
            chk: Optional[Dict[str, float]] = None
            # the attend stage's engine as the user's call picks it ("auto": by the plan's level mix, which a
            # threshold-mode plan knows only in a whole call); None: dense ran before planning
            o0, plan0 = run_psa(q, k, v, cfg, backend=args.backend)
            be_L = plan0.attend_backend or attend_backend(args.backend, backend, L)
            err_vs_dense = _rel(o0, exact)
            del o0, plan0
            if not args.no_check:
                chk = check_stages(q, k, v, cfg, backend=be_L)
            row = bench_one(q, k, v, cfg, dense, args.rep, be_L, requested=args.backend)
            measured[name] = row["density"]
            ok = chk is not None and chk["ok"] == 1.0
            row.update(env)
            row.update(
                seq_len=L, preset=name, backend=be_L, dense_ms=dense_ms, fastest_dense=fastest, kv_mb=kv_mb,
                dense_cudnn_ms=dense.get("cudnn", ""), dense_fa2_ms=dense.get("fa2", ""),
                dense_fa4_ms=dense.get("fa4", ""), input=args.input, heads=args.heads,
                kv_heads=args.kv_heads, head_dim=args.head_dim, dtype="bfloat16",
                check=("pass" if ok else ("skipped" if chk is None else "FAIL")), err_vs_dense=err_vs_dense,
                max_rel_err=(max(chk[x] for x in ("pool", "attention", "estimate") if x in chk) if chk else ""),
            )
            if not ok:
                row["speedup"] = row["speedup_vs_cudnn"] = ""  # never print a speed-up not checked in this run
            for key in list(row):
                if isinstance(row[key], float):
                    row[key] = round(row[key], 4)
            results.append(row)
            logger.info("L=%d %s: %s", L, name, {k_: row[k_] for k_ in ("density", "psa_ms", "speedup", "check")})
            if chk is not None and not ok:
                logger.warning("check failed for L=%d %s: %s", L, name, chk)
        del q, k, v, exact
        torch.cuda.empty_cache()
        logger.info("L=%d done in %.0f s", L, time.time() - t0)
    if args.out:
        append_csv(Path(args.out), results, COLUMNS)
        write_markdown(
            Path(args.out).with_suffix(".md"), results, MD_COLUMNS, "Attention layer: PSA against dense attention",
            f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; one layer, batch 1, "
            f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, bf16, causal, {args.input} inputs; "
            "CUDA-event medians (ms); `speedup` is against the fastest dense baseline of the run "
            "(cuDNN SDPA, FlashAttention-2 via SDPA, FlashAttention-4 dense), `attend_over_ideal` is the attend "
            "stage over density x cuDNN dense, `err_vs_dense` the whole call's relative error (Frobenius) against "
            "exact causal attention (SDPA) on the same inputs; every row's stages were checked against the PyTorch "
            "reference in the same run before its speed-up was recorded.",
        )
    print(f"\nbench-attention on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']}), "
          f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} bf16 causal, {args.input} inputs, backend {backend}; "
          "x = speed-up over the fastest dense, xcu = over cuDNN SDPA")
    hdr = (f"{'L':>6} {'preset':<13} {'dens':>5} {'fastest':>13} {'psa':>7} {'x':>5} {'xcu':>5} {'pool':>5} "
           f"{'est':>6} {'asg':>5} {'attn':>7} {'ovh%':>5} {'at/id':>5} {'grd':>5} {'chk':>4}")
    print(hdr)
    for r in results:
        sp = f"{r['speedup']:5.2f}" if r["speedup"] != "" else "  n/a"
        sc = f"{r['speedup_vs_cudnn']:5.2f}" if r["speedup_vs_cudnn"] != "" else "  n/a"
        fd = f"{r['fastest_dense']} {r['dense_ms']:.1f}"
        print(f"{r['seq_len']:>6} {r['preset']:<13} {r['density']:5.3f} {fd:>13} {r['psa_ms']:7.2f} {sp} {sc} "
              f"{r['pool_ms']:5.2f} {r['estimate_ms']:6.2f} {r['assign_ms']:5.2f} {r['attend_ms']:7.2f} "
              f"{r['overhead_pct_of_dense']:5.1f} {r['attend_over_ideal']:5.2f} {r['dense_guard'] or '-':>5} "
              f"{r['check']:>4}")
    sys.stdout.flush()
    return 0
