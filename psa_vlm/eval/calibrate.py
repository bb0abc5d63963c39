"""``psa-vlm calibrate``: choose a PSA setting per decoder layer under an error target; write a JSON config.

On a few calibration prompts (the offline task ``psa_synth_long`` by default, or the user's own videos or an
lmms-eval task, as for ``eval-fidelity``), layers are calibrated in order, 0 first. For layer ``i`` every
candidate setting (``--candidates``: quota pyramids at FLOP-equivalent density 0.1-0.5, the paper's threshold
rule and stricter thresholds; ``dense`` is always the fallback) runs with layers ``< i`` at their chosen
settings and layers ``> i`` dense, and the candidate with the **lowest measured density on layer i** whose error
stays under the target **on every calibration prompt** is chosen:

- ``--max-attn-err E``: layer ``i``'s relative attention-output error against dense attention on the same
  inputs (``||O_psa - O_dense||_F / ||O_dense||_F``, captured in the patch). It depends only on layers
  ``<= i``, so the forward stops after layer ``i`` and the final config has exactly the measured errors;
- ``--max-kl K``: ``KL(dense || PSA)`` of the next-token distribution at the answer position (the last
  prompt position). Each accepted layer keeps the KL of the config so far (later layers dense) under ``K``,
  so the final config meets the target on the calibration prompts.

The result is checked once more with every layer at its setting; the command prints (and writes next to the
config as ``<name>.report.json``) per-layer choices, errors and densities, the achieved density (mean over
layers, a dense layer counting 1) and the time-to-first-token speed-up predicted by the benchmark's cost model:
with ``a`` the attention share of a dense prefill at a given length (``attn_share_dense`` in
``eval/results/prefill.csv``, measured on an H200 for a 7B-shaped model) and ``rho`` the achieved density, the
ceiling ``1 / ((1 - a) + a * rho)``. It is a ceiling: it assumes the calibrated densities carry over to that
length and ignores the estimator's cost (about 11% of dense attention, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import PRESETS, PSAConfig
from .fidelity import FidelityPrompt, Session, add_common_arguments, kl_divergence, relative_error

__all__ = ["CANDIDATES", "DEFAULT_CANDIDATES", "candidate_config", "calibrate", "CalibrationResult",
           "predicted_speedups", "add_arguments", "main"]

logger = logging.getLogger(__name__)

#: Calibration candidates that are not presets: ``name -> PSAConfig field changes``.
CANDIDATES: Dict[str, Dict[str, Any]] = {
    # pyramids covering every visible block: FLOP-equivalent density 0.4 and 0.5
    "quota-0.4": dict(mode="quota", quotas=(0.2, 0.2, 0.2, 0.4), sim_thresholds=None),
    "quota-0.5": dict(mode="quota", quotas=(0.3, 0.2, 0.3, 0.2), sim_thresholds=None),
    # the paper's threshold rule with more mass kept at each level
    "tau-0.8": dict(mode="threshold", thresholds=(0.8, 0.9, 0.95, 0.95)),
    "tau-0.9": dict(mode="threshold", thresholds=(0.9, 0.95, 0.98, 0.98)),
}
DEFAULT_CANDIDATES = "quota-0.1,quota-0.2,quota-0.3,quota-0.4,quota-0.5,paper,tau-0.8,tau-0.9"


def candidate_config(name: str, base: PSAConfig) -> PSAConfig:
    """A candidate's config: a preset (or ``CANDIDATES`` entry) with ``base``'s block sizes, stride,
    ``estimate_heads``, ``min_seq_len``, ``text_tail`` and ``sink_blocks``.

    Raises:
        ValueError: Unknown name.
    """
    keep = {f: getattr(base, f)
            for f in ("block_q", "block_k", "stride", "estimate_heads", "min_seq_len", "text_tail", "sink_blocks")}
    if name in PRESETS:
        return PSAConfig.preset(name, **keep)
    if name in CANDIDATES:
        return PSAConfig.preset("paper", **CANDIDATES[name], **keep)
    raise ValueError(f"unknown candidate {name!r}; choose presets ({', '.join(PRESETS)}) or {', '.join(CANDIDATES)}")


def _diff(config: PSAConfig, base: PSAConfig) -> Dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name != "layer_overrides" and getattr(config, f.name) != getattr(base, f.name)}


def assemble(choices: Dict[int, PSAConfig], n_layers: int, base: Optional[PSAConfig] = None) -> PSAConfig:
    """One ``PSAConfig`` whose ``for_layer(i)`` is ``choices[i]`` (the most common choice is the base)."""
    if base is None:
        base = Counter(choices[i] for i in range(n_layers)).most_common(1)[0][0]
    overrides = {i: _diff(choices[i], base) for i in range(n_layers) if choices[i] != base}
    return base.replace(layer_overrides=overrides or None)


class _Stop(Exception):
    """Raised inside the forward once the calibrated layer's error is measured (later layers are not needed)."""


@dataclass
class CalibrationResult:
    """What ``calibrate`` chose and measured."""

    config: PSAConfig
    choices: Dict[int, str]
    layer_err: Dict[int, float]  # final check: max over prompts of each layer's attention error
    layer_density: Dict[int, float]  # final check: mean over prompts
    kl: List[float]  # final check: per prompt
    density: float
    trials: List[Dict[str, Any]] = field(default_factory=list)  # every (layer, candidate) measurement


def _forward(runner: Any, inputs: Any, observer: Optional[Any] = None) -> Optional[torch.Tensor]:
    """Logits ``[V]`` at the last prompt position (``None`` if an observer stopped the forward)."""
    from ..patches import observe

    device = next(runner.model.parameters()).device
    inputs = inputs.to(device)
    try:
        with torch.inference_mode():
            if observer is not None:
                with observe(runner.model, observer):
                    out = runner.model(**inputs, use_cache=False)
            else:
                out = runner.model(**inputs, use_cache=False)
    except _Stop:
        return None
    return out.logits[0, -1].float().cpu()


def calibrate(
    runner: Any,
    prompts: Sequence[FidelityPrompt],
    base: PSAConfig,
    candidates: Sequence[str],
    *,
    max_attn_err: Optional[float] = None,
    max_kl: Optional[float] = None,
) -> CalibrationResult:
    """Choose per layer the lowest-density candidate that keeps the target on every calibration prompt.

    Args:
        runner: A ``psa_vlm.eval.fidelity.FidelityRunner`` (model, processor, backend, frame settings).
        prompts: Calibration prompts.
        base: Settings every candidate keeps (block sizes, stride, ``estimate_heads``, ``min_seq_len``,
            ``text_tail``, sinks).
        candidates: Candidate names (presets or ``CANDIDATES``); ``dense`` is the fallback either way.
        max_attn_err: Target on each layer's relative attention-output error, or
        max_kl: target on ``KL(dense || PSA)`` at the answer position (exactly one of the two).

    Returns:
        ``CalibrationResult`` with the assembled config and the final check on the calibration prompts.

    Raises:
        ValueError: Neither or both targets, a negative target, no prompts or an unknown candidate.
    """
    from ..patches import psa_stats

    if (max_attn_err is None) == (max_kl is None):
        raise ValueError("give exactly one target: max_attn_err or max_kl")
    target = max_attn_err if max_attn_err is not None else max_kl
    if not (target >= 0):
        raise ValueError(f"the target must be >= 0, got {target!r}")
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    dense_cfg = base.replace(dense=True, sim_thresholds=None)
    cands = [(n, candidate_config(n, base)) for n in candidates if n != "dense"]
    n_layers = runner.n_layers
    refs = {}
    for p in prompts:
        runner.apply(None)
        inputs = runner.inputs_of(p)
        refs[p.id] = (inputs, _forward(runner, inputs))  # calibration prompts are few: kept in memory

    choices: Dict[int, PSAConfig] = {}
    names: Dict[int, str] = {}
    trials: List[Dict[str, Any]] = []
    for i in range(n_layers):
        best: Optional[Tuple[float, str, PSAConfig]] = None
        for name, cand in cands:
            trial = dict(choices)
            trial[i] = cand
            for j in range(i + 1, n_layers):
                trial[j] = dense_cfg
            runner.apply(assemble(trial, n_layers), layers=list(range(i + 1)))
            errs, dens, kls = [], [], []
            for p in prompts:
                inputs, ref_logits = refs[p.id]
                got: Dict[str, float] = {}

                def obs(layer_idx, psa_out, dense_out, plan, _i=i, _got=got):
                    if layer_idx == _i:
                        _got["err"] = relative_error(psa_out, dense_out())
                        if max_attn_err is not None:
                            raise _Stop

                logits = _forward(runner, inputs, obs)
                stats = psa_stats(runner.model)["layers"]
                dens.append(float(stats[i]["density"]) if i in stats else 1.0)
                errs.append(got.get("err", 0.0))
                if max_kl is not None:
                    kls.append(kl_divergence(ref_logits, logits))
            worst = max(errs) if max_attn_err is not None else max(kls)
            density = sum(dens) / len(dens)
            ok = worst <= target
            trials.append({"layer": i, "candidate": name, "density": density, "max_attn_err": max(errs),
                           "max_kl": max(kls) if kls else None, "passes": ok})
            logger.info("layer %d, %s: density %.3f, worst %s %.4g -> %s", i, name, density,
                        "attention error" if max_attn_err is not None else "KL", worst, "ok" if ok else "over target")
            if ok and (best is None or density < best[0]):
                best = (density, name, cand)
        if best is None:
            choices[i], names[i] = dense_cfg, "dense"
        else:
            choices[i], names[i] = best[2], best[1]
        logger.info("layer %d: %s", i, names[i])

    config = assemble(choices, n_layers)
    # final check: every layer at its setting, full forwards
    runner.apply(config)
    layer_err: Dict[int, float] = {}
    layer_dens: Dict[int, List[float]] = {i: [] for i in range(n_layers)}
    kls = []
    for p in prompts:
        inputs, ref_logits = refs[p.id]

        def obs(layer_idx, psa_out, dense_out, plan):
            e = relative_error(psa_out, dense_out())
            layer_err[layer_idx] = max(layer_err.get(layer_idx, 0.0), e)

        logits = _forward(runner, inputs, obs)
        kls.append(kl_divergence(ref_logits, logits))
        stats = psa_stats(runner.model)["layers"]
        for i in range(n_layers):
            layer_dens[i].append(float(stats[i]["density"]) if i in stats else 1.0)
    runner.apply(None)
    dens = {i: sum(v) / len(v) for i, v in layer_dens.items()}
    return CalibrationResult(config=config, choices=names, layer_err=layer_err, layer_density=dens, kl=kls,
                             density=sum(dens.values()) / n_layers, trials=trials)


def predicted_speedups(density: float, prefill_csv: Path) -> List[Dict[str, float]]:
    """TTFT speed-up ceiling ``1 / ((1 - a) + a * density)`` per sequence length of the benchmark's dense rows.

    Args:
        density: Achieved FLOP-equivalent density (mean over layers).
        prefill_csv: ``eval/results/prefill.csv`` (columns ``seq_len``, ``method``, ``attn_share_dense``, ``gpu``).

    Returns:
        ``[{"seq_len", "attn_share", "speedup", "gpu"}]`` sorted by length (the last row per length wins).
    """
    rows: Dict[int, Dict[str, Any]] = {}
    with open(prefill_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            if r.get("method") != "dense" or not r.get("attn_share_dense"):
                continue
            a = float(r["attn_share_dense"])
            rows[int(r["seq_len"])] = {"seq_len": int(r["seq_len"]), "attn_share": a, "gpu": r.get("gpu", ""),
                                       "speedup": 1.0 / ((1.0 - a) + a * density)}
    return [rows[k] for k in sorted(rows)]


def _default_prefill_csv() -> Optional[Path]:
    p = Path(__file__).resolve().parents[2] / "eval" / "results" / "prefill.csv"
    return p if p.is_file() else None


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``psa-vlm calibrate``."""
    add_common_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-attn-err", type=float, default=None,
                        help="target: each layer's relative attention-output error against dense (e.g. 0.15)")
    target.add_argument("--max-kl", type=float, default=None,
                        help="target: KL(dense || PSA) of the answer-position distribution, nats (e.g. 0.01)")
    parser.add_argument("--limit", type=int, default=4, help="calibration prompts (default 4)")
    parser.add_argument("--offset", type=int, default=0,
                        help="skip the source's first N prompts (e.g. to keep calibration apart from evaluation)")
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                        help=f"comma-separated candidates, presets or {', '.join(CANDIDATES)} (default "
                             f"{DEFAULT_CANDIDATES}); dense is always the fallback")
    parser.add_argument("--out", type=Path, required=True, help="JSON config to write (PSAConfig.save)")
    parser.add_argument("--prefill-csv", type=Path, default=None,
                        help="benchmark table for the predicted TTFT speed-up (default: the repo's eval/results/prefill.csv)")


def main(args: argparse.Namespace) -> int:
    """``psa-vlm calibrate``: see the module docstring."""
    from .fidelity import _cli_error

    target = args.max_attn_err if args.max_attn_err is not None else args.max_kl
    if not (target is not None and target >= 0):
        raise _cli_error(f"the target must be a number >= 0, got {target!r}")
    if args.limit < 1 or args.offset < 0:
        raise _cli_error(f"--limit must be >= 1 and --offset >= 0, got {args.limit} and {args.offset}")
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    probe = PSAConfig.preset("paper")
    try:
        for n in names:
            candidate_config(n, probe)
    except ValueError as exc:
        raise _cli_error(str(exc)) from None
    if not names:
        raise _cli_error("--candidates is empty")
    limit = args.limit
    args.limit = args.limit + args.offset  # Session loads the first limit + offset prompts
    session = Session(args)
    prompts = session.prompts[args.offset:]
    args.limit = limit
    if not prompts:
        raise _cli_error(f"no calibration prompts left after --offset {args.offset}")
    base_changes: Dict[str, Any] = {}
    if session.block_size is not None:
        base_changes.update(block_q=session.block_size, block_k=session.block_size)
    if session.min_seq_len is not None:
        base_changes["min_seq_len"] = session.min_seq_len
    base = PSAConfig.preset("paper", **base_changes)
    t0 = time.perf_counter()
    res = calibrate(session.runner, prompts, base, names, max_attn_err=args.max_attn_err, max_kl=args.max_kl)
    wall = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res.config.save(args.out)
    csv_path = args.prefill_csv or _default_prefill_csv()
    speedups = predicted_speedups(res.density, csv_path) if csv_path is not None and Path(csv_path).is_file() else []
    what = "attention error" if args.max_attn_err is not None else "KL"
    report = {
        "target": {"max_attn_err": args.max_attn_err, "max_kl": args.max_kl},
        "prompts": [p.id for p in prompts],
        "choices": res.choices,
        "layer_max_attn_err": res.layer_err,
        "layer_density": res.layer_density,
        "kl": res.kl,
        "density": res.density,
        "predicted_ttft_speedup": speedups,
        "prefill_csv": None if csv_path is None else str(csv_path),
        "trials": res.trials,
        "wall_s": wall,
        "conditions": session.conditions(),
    }
    report_path = args.out.with_suffix(".report.json")
    report_path.write_text(json.dumps(report, indent=1) + "\n")

    print(f"calibrate: {len(prompts)} prompts, target max {what} {target:g}, {wall:.0f} s")
    print(f"{'layer':>5}  {'setting':<10} {'density':>7} {'max attn err':>12}")
    for i in sorted(res.choices):
        err = res.layer_err.get(i)
        print(f"{i:>5}  {res.choices[i]:<10} {res.layer_density[i]:>7.3f} {'dense' if err is None else f'{err:.4f}':>12}")
    print(f"achieved density {res.density:.3f} (mean over layers, dense layers count 1); KL(dense || PSA) at the "
          f"answer position: max {max(res.kl):.3g}, mean {sum(res.kl) / len(res.kl):.3g}")
    if speedups:
        print("predicted TTFT speed-up ceiling 1/((1-a)+a*density), a = dense attention share of TTFT "
              f"({speedups[0]['gpu']}, 7B-shaped model, {csv_path}):")
        for s in speedups:
            print(f"  {s['seq_len']:>7} tokens: a = {s['attn_share']:.3f} -> {s['speedup']:.2f}x")
    else:
        print("no benchmark table (eval/results/prefill.csv) found: pass --prefill-csv for the predicted speed-up")
    print(f"config: {args.out}\nreport: {report_path}")
    return 0
