"""Reference level assignment (PSA_SPEC steps 4-6) and block-list construction, plain PyTorch.

Flags describing KV blocks (``kv_flags``, int8 ``[B, nk]``, bitwise):

- ``KV_FORCE_FULL`` (1): holds text or is a sink block: the assignment keeps it at full resolution.
- ``KV_SKIP`` (2): every key is padding: never attended.
- ``KV_NEEDS_FULL`` (4): some keys are padding: it may only be read at full resolution (token mask).

``q_flags`` (bool ``[B, nq]``): the query block holds text; it attends to every visible block at full resolution.

The block list consumed by the attention kernel: for each ``(b, h, i)`` row, ``kv_idx[b, h, i, :]`` holds the
kept KV block indices ordered by factor (1, 2, 4, 8) and then by block index, ``-1`` after the last entry;
``counts[b, h, i, c]`` is the number of entries at factor ``FACTOR_ORDER[c]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...config import PSAConfig
from ..geometry import FACTOR_ORDER, block_masks

__all__ = ["assign_levels", "build_block_lists", "KV_FORCE_FULL", "KV_SKIP", "KV_NEEDS_FULL"]

KV_FORCE_FULL = 1
KV_SKIP = 2
KV_NEEDS_FULL = 4


def _flag(kv_flags: Optional[torch.Tensor], bit: int, B: int, nk: int, device) -> torch.Tensor:
    if kv_flags is None:
        return torch.zeros(B, 1, 1, nk, dtype=torch.bool, device=device)
    return ((kv_flags.to(torch.int32) & bit) != 0)[:, None, None, :]


def build_block_lists(
    factors: torch.Tensor,
    *,
    lq: int,
    lk: int,
    block_q: int,
    block_k: int,
    kv_flags: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise a factor map and turn it into per-row block lists.

    Invisible and fully padded blocks are dropped; a pooled factor on a block that is not poolable (the causal
    diagonal, an incomplete block, a partly padded block) is promoted to full resolution, so pooled keys are
    only ever read where the whole block lies in the past of every query of the query block.

    Args:
        factors: int ``[B, Hq, nq, nk]`` with values in {0, 1, 2, 4, 8}.
        lq, lk: Query and key lengths.
        block_q, block_k: Block sizes.
        kv_flags: Optional int8 ``[B, nk]`` flags (module docstring).

    Returns:
        ``(factors, kv_idx, counts)``: the normalised int8 map, int32 ``[B, Hq, nq, nk]`` block indices and
        int32 ``[B, Hq, nq, 4]`` per-factor counts (layout in the module docstring).
    """
    B, Hq, nq, nk = factors.shape
    dev = factors.device
    visible, poolable = block_masks(lq, lk, block_q, block_k, dev)
    skip = _flag(kv_flags, KV_SKIP, B, nk, dev)
    needs_full = _flag(kv_flags, KV_NEEDS_FULL, B, nk, dev)
    f = factors.to(torch.int8)
    f = torch.where(visible & ~skip, f, torch.zeros_like(f))
    f = torch.where((f > 1) & ~(poolable & ~needs_full), torch.ones_like(f), f)
    order = torch.full_like(f, 4, dtype=torch.int64)
    for c, p in enumerate(FACTOR_ORDER):
        order = torch.where(f == p, torch.full_like(order, c), order)
    j = torch.arange(nk, device=dev)
    key = order * nk + j
    skey, _ = torch.sort(key, dim=-1)
    kv_idx = torch.where(skey < 4 * nk, skey % nk, torch.full_like(skey, -1)).to(torch.int32)
    counts = torch.stack([(order == c).sum(-1) for c in range(4)], dim=-1).to(torch.int32)
    return f, kv_idx, counts


def assign_levels(
    scores: torch.Tensor,
    cap: torch.Tensor,
    kv_flags: Optional[torch.Tensor],
    q_flags: Optional[torch.Tensor],
    *,
    lq: int,
    lk: int,
    config: PSAConfig,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign every (head, query block, KV block) a factor in {0, 1, 2, 4, 8}.

    Forced full resolution: the first ``config.sink_blocks`` KV blocks, geometry-forced blocks (diagonal,
    incomplete), blocks flagged ``KV_FORCE_FULL``/``KV_NEEDS_FULL`` and every visible block of a text query
    block. The other visible, non-skipped blocks (*candidates*) are ranked by score, descending, ties to the
    lower block index:

    - threshold mode: candidate scores are normalised to sum 1 (all zero -> all 0); ``before(j)`` is the mass
      ranked above ``j``; ``j`` gets the smallest enabled factor ``p`` with ``before(j) < tau_p``, else 0.
    - quota mode: with ``n`` visible non-skipped blocks of which ``m`` are forced, the candidate of rank ``r``
      gets the first enabled factor ``p`` (ascending) with ``r + m < floor(Q_p * n + 0.5)``, ``Q_p`` being the
      cumulative quota up to ``p`` (float32 arithmetic), else 0.

    Kept candidates are then capped: ``min(factor, cap[b, h // G, j])``.

    Args:
        scores: float32 ``[B, Hq, nq, nk]`` importance (e.g. from ``block_importance``).
        cap: int8 ``[B, Hkv, nk]`` similarity cap (from ``pyramid_pool``).
        kv_flags: Optional int8 ``[B, nk]``; q_flags: optional bool ``[B, nq]``.
        lq, lk: Query and key lengths.
        config: The PSA configuration.

    Returns:
        ``(factors, kv_idx, counts)`` as ``build_block_lists``.
    """
    B, Hq, nq, nk = scores.shape
    dev = scores.device
    G = Hq // cap.shape[1]
    visible, poolable = block_masks(lq, lk, config.block_q, config.block_k, dev)
    skip = _flag(kv_flags, KV_SKIP, B, nk, dev)
    active = visible & ~skip  # [B, 1, nq, nk]
    forced = (visible & ~poolable) | _flag(kv_flags, KV_FORCE_FULL | KV_NEEDS_FULL, B, nk, dev)
    forced = forced | (torch.arange(nk, device=dev) < config.sink_blocks)
    if q_flags is not None:
        forced = forced | q_flags[:, None, :, None]
    forced = forced & active
    one = torch.ones((), dtype=torch.int8, device=dev)
    zero = torch.zeros((), dtype=torch.int8, device=dev)

    if config.dense:
        f = torch.where(active, one, zero).expand(B, Hq, nq, nk)
        return build_block_lists(f, lq=lq, lk=lk, block_q=config.block_q, block_k=config.block_k, kv_flags=kv_flags)

    cand = (active & ~forced).expand(B, Hq, nq, nk)
    s = torch.where(cand, scores.float(), torch.zeros((), device=dev))
    # rank candidates: descending score, ties to the lower index (stable sort); non-candidates last
    sort_key = torch.where(cand, s, torch.full((), -1.0, device=dev))
    sorted_key, perm = torch.sort(sort_key, dim=-1, descending=True, stable=True)
    sorted_cand = sorted_key >= 0
    enabled = config.factors
    assigned_sorted = torch.zeros(B, Hq, nq, nk, dtype=torch.int8, device=dev)
    if config.mode == "threshold":
        tot = s.sum(-1, keepdim=True)
        w = torch.where(tot > 0, sorted_key.clamp(min=0) / torch.where(tot > 0, tot, torch.ones_like(tot)), 0.0)
        before = torch.cumsum(w, dim=-1) - w
        taus = dict(zip((1, 2, 4, 8), config.thresholds))
        for p in reversed(enabled):
            assigned_sorted = torch.where(before < taus[p], torch.full_like(assigned_sorted, p), assigned_sorted)
    else:
        n = active.sum(-1, keepdim=True).to(torch.float32)  # [B, 1, nq, 1]
        m = forced.sum(-1, keepdim=True)
        rank = torch.arange(nk, device=dev) + m  # rank among candidates + forced count
        cum = 0.0
        bounds = {}
        for p, qv in zip(FACTOR_ORDER, config.quotas):
            cum += qv
            bounds[p] = torch.floor(torch.tensor(cum, dtype=torch.float32, device=dev) * n + 0.5)
        for p in reversed(enabled):
            assigned_sorted = torch.where(rank < bounds[p], torch.full_like(assigned_sorted, p), assigned_sorted)
    assigned_sorted = torch.where(sorted_cand, assigned_sorted, zero)
    assigned = torch.zeros_like(assigned_sorted).scatter_(-1, perm, assigned_sorted)
    capq = cap.repeat_interleave(G, dim=1)[:, :, None, :] if G > 1 else cap[:, :, None, :]
    assigned = torch.where(assigned > 0, torch.minimum(assigned, capq.to(torch.int8)), assigned)
    f = torch.where(forced, one, torch.where(cand, assigned, zero))
    return build_block_lists(f, lq=lq, lk=lk, block_q=config.block_q, block_k=config.block_k, kv_flags=kv_flags)
