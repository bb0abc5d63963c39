"""Reference pyramid pooling and similarity cap (PSA_SPEC steps 2 and 6), plain PyTorch."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..geometry import cdiv

__all__ = ["pyramid_pool"]

#: Cosine similarity denominator floor: ``cos = a.b / max(|a| |b|, COS_EPS)``.
COS_EPS = 1e-8


def pyramid_pool(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_k: int,
    factors: Sequence[int],
    sim_thresholds: Optional[Sequence[float]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-pool K and V at every factor and compute each block's similarity cap.

    Args:
        k: Keys ``[B, Hkv, Lk, D]`` (any float dtype, any strides).
        v: Values ``[B, Hkv, Lk, D]``.
        block_k: KV block size ``bk``; pooling windows never cross a block boundary.
        factors: Pooling factors (subset of ``(2, 4, 8)``); may be empty.
        sim_thresholds: Thresholds for factors ``(2, 4, 8)``, or ``None`` for no cap.

    Returns:
        ``(k_pooled, v_pooled, cap)``: ``k_pooled``/``v_pooled`` are ``[B, Hkv, R, D]`` in ``k``'s dtype, the
        levels stacked in ascending factor order over the ``nkf = Lk // bk`` complete blocks (layout in
        ``geometry.level_offsets``); means are taken in float32. ``cap`` is int8 ``[B, Hkv, nk]``: the largest
        enabled factor ``p`` whose mean cosine similarity between the first and last key of each length-``p``
        window of the block exceeds its threshold, else 1; 1 for an incomplete block; ``max(factors)`` for every
        complete block when ``sim_thresholds`` is ``None`` (1 when ``factors`` is empty).
    """
    B, H, Lk, D = k.shape
    factors = sorted(factors)
    nk, nkf = cdiv(Lk, block_k), Lk // block_k
    kf = k[:, :, : nkf * block_k].float().reshape(B, H, nkf, block_k, D)
    vf = v[:, :, : nkf * block_k].float().reshape(B, H, nkf, block_k, D)
    kp, vp = [], []
    for p in factors:
        kp.append(kf.reshape(B, H, nkf, block_k // p, p, D).mean(4).reshape(B, H, -1, D))
        vp.append(vf.reshape(B, H, nkf, block_k // p, p, D).mean(4).reshape(B, H, -1, D))
    if kp:
        k_pooled = torch.cat(kp, dim=2).to(k.dtype)
        v_pooled = torch.cat(vp, dim=2).to(v.dtype)
    else:
        k_pooled = k.new_empty(B, H, 0, D)
        v_pooled = v.new_empty(B, H, 0, D)

    cap = torch.ones(B, H, nk, dtype=torch.int8, device=k.device)
    if factors:
        if sim_thresholds is None:
            cap[:, :, :nkf] = max(factors)
        else:
            thr = dict(zip((2, 4, 8), sim_thresholds))
            full = torch.ones(B, H, nkf, dtype=torch.int8, device=k.device)
            for p in factors:  # ascending, so the largest passing factor wins
                win = kf.reshape(B, H, nkf, block_k // p, p, D)
                a, b = win[..., 0, :], win[..., p - 1, :]
                cos = (a * b).sum(-1) / torch.clamp(a.norm(dim=-1) * b.norm(dim=-1), min=COS_EPS)
                ok = cos.mean(-1) > thr[p]
                full = torch.where(ok, torch.full_like(full, p), full)
            cap[:, :, :nkf] = full
    return k_pooled, v_pooled, cap
