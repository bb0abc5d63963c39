"""Reference antidiagonal block importance (PSA_SPEC step 3, XAttention's estimator), plain PyTorch."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..geometry import cdiv

__all__ = ["block_importance"]


def _antidiag_q(q: torch.Tensor, stride: int) -> torch.Tensor:
    """``[B, H, L, D] -> [B, H, ceil(L/s), s*D]``: group ``s`` rows, reversed (zero-padded at the end)."""
    B, H, L, D = q.shape
    R = cdiv(L, stride)
    qp = torch.nn.functional.pad(q, (0, 0, 0, R * stride - L))
    return qp.reshape(B, H, R, stride, D).flip(3).reshape(B, H, R, stride * D)


def _grouped_k(k: torch.Tensor, stride: int) -> torch.Tensor:
    B, H, L, D = k.shape
    R = cdiv(L, stride)
    kp = torch.nn.functional.pad(k, (0, 0, 0, R * stride - L))
    return kp.reshape(B, H, R, stride * D)


def block_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    stride: int,
    scale: Optional[float] = None,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Antidiagonal importance score of every (query block, KV block) pair, per query head.

    Reduced query ``r`` groups query rows ``[r*s, r*s+s)`` and reduced key ``c`` keys ``[c*s, c*s+s)`` (the last
    group of each zero-padded). Their logit pairs query offset ``s-1-t`` with key offset ``t``:
    ``l[r, c] = scale / s * sum_t q[r*s+s-1-t] . k[c*s+t]``. Key group ``c`` is visible to ``r`` when
    ``c*s <= Lk - Lq + min(r*s+s-1, Lq-1)`` (its first key is not after the group's last query). Each reduced
    row is soft-maxed over its visible keys (float32) and the probabilities are summed per block pair.

    Args:
        q: ``[B, Hq, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` reads KV head ``h // G``).
        block_q: ``bq``, a multiple of ``stride``.
        block_k: ``bk``, a multiple of ``stride``.
        stride: ``s``.
        scale: Attention scale, ``1/sqrt(D)`` if ``None``; the estimator uses ``scale / s``.
        chunk_rows: Reduced query rows processed at once (bounds memory; results do not depend on it).

    Returns:
        float32 ``[B, Hq, nq, nk]`` with ``nq = ceil(Lq/bq)``, ``nk = ceil(Lk/bk)``; each reduced row's
        probabilities sum to 1, so row ``i`` sums to the number of reduced rows in query block ``i``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = stride
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    nq, nk = cdiv(Lq, block_q), cdiv(Lk, block_k)
    qr = _antidiag_q(q.float(), s)  # [B, Hq, Rq, sD]
    kr = _grouped_k(k.float(), s)  # [B, Hkv, Rk, sD]
    Rq, Rk = qr.shape[2], kr.shape[2]
    c = torch.arange(Rk, device=q.device)
    kblock = (c * s) // block_k  # [Rk]
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    chunk_rows = max(chunk_rows - chunk_rows % (block_q // s), block_q // s)
    for r0 in range(0, Rq, chunk_rows):
        r1 = min(Rq, r0 + chunk_rows)
        r = torch.arange(r0, r1, device=q.device)
        last = Lk - Lq + torch.clamp(r * s + s - 1, max=Lq - 1)
        vis = (c[None, :] * s) <= last[:, None]  # [n, Rk]
        # GQA by index: view the group's query heads as extra rows of their KV head (no KV copies).
        qg = qr[:, :, r0:r1].reshape(B, Hkv, G * (r1 - r0), s * D)
        logits = torch.matmul(qg, kr.transpose(-1, -2)).reshape(B, Hq, r1 - r0, Rk) * (scale / s)
        logits = logits.masked_fill(~vis, float("-inf"))
        prob = torch.softmax(logits, dim=-1)
        # sum over key groups of each KV block, then over reduced rows of each query block
        blk = torch.zeros(B, Hq, r1 - r0, nk, dtype=torch.float32, device=q.device)
        blk.index_add_(3, kblock, prob)
        qblock = (r * s) // block_q
        out.index_add_(2, qblock, blk)
    return out
