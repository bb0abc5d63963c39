"""Reference PSA attention over block lists (PSA_SPEC step 7), plain PyTorch, float32 math."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..geometry import FACTOR_ORDER, level_offsets

__all__ = ["sparse_attention", "factors_from_lists"]


def factors_from_lists(kv_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of ``build_block_lists``: the int8 factor map ``[B, Hq, nq, nk]`` a block list encodes."""
    nk = kv_idx.shape[-1]
    ends = torch.cumsum(counts.long(), dim=-1)  # [B, Hq, nq, 4]
    pos = torch.arange(nk, device=kv_idx.device)
    lvl = (pos[None, None, None, :, None] >= ends[..., None, :]).sum(-1)  # level column of each entry
    fac = torch.tensor(FACTOR_ORDER + (0,), dtype=torch.int8, device=kv_idx.device)[lvl.clamp(max=4)]
    valid = pos < ends[..., -1:]
    # invalid entries land in a spare column nk that is dropped afterwards
    f = torch.zeros(kv_idx.shape[:-1] + (nk + 1,), dtype=torch.int8, device=kv_idx.device)
    idx = torch.where(valid, kv_idx.long(), torch.full_like(kv_idx, nk, dtype=torch.long))
    return f.scatter_(-1, idx, fac)[..., :nk].contiguous()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pooled: torch.Tensor,
    v_pooled: torch.Tensor,
    kv_idx: torch.Tensor,
    counts: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    factors: Sequence[int],
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of every query block over its listed KV blocks, each at its own resolution.

    A full-resolution block is token-causal (key position ``<=`` query position ``Lk - Lq + r``) and honours
    ``key_padding_mask``; a block at factor ``p`` is read from the pyramid and every pooled logit gets
    ``+ ln p``. The list must come from ``build_block_lists`` (pooled entries only on poolable blocks). Rows
    with no key to attend to give zeros; a NaN or infinity a row attends to makes the row non-finite, as in
    SDPA (a non-finite value may also reach rows that give it zero weight, as in SDPA's ``softmax @ v``).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        k_pooled, v_pooled: ``[B, Hkv, R, D]`` pyramid from ``pyramid_pool`` with ``factors``.
        kv_idx, counts: Block lists (``assign/naive.py`` docstring).
        block_q, block_k: Block sizes.
        factors: Pool factors present in the pyramid (ascending); a listed factor not in it is an error.
        scale: Softmax scale, ``1/sqrt(D)`` if ``None``.
        key_padding_mask: Optional bool ``[B, Lk]``, ``True`` for real keys.
        out: Optional ``[B, Hq, Lq, D]`` tensor (any strides) to write into.

    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype (``out`` if given).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    nkf = Lk // block_k
    offs = level_offsets(nkf, block_k, factors)
    fmap = factors_from_lists(kv_idx, counts)  # [B, Hq, nq, nk]
    listed = set(int(x) for x in torch.unique(fmap).tolist()) - {0, 1}
    if not listed <= set(factors):
        raise ValueError(f"block list uses pool factors {sorted(listed)} but the pyramid holds only {tuple(factors)}")

    # key-space descriptors: full keys, then each pooled level
    kpos = torch.arange(Lk, device=q.device)
    key_block = [kpos // block_k]
    key_level = [torch.ones(Lk, dtype=torch.int8, device=q.device)]
    for p in sorted(factors):
        rows = nkf * (block_k // p)
        r = torch.arange(rows, device=q.device)
        key_block.append(r // (block_k // p))
        key_level.append(torch.full((rows,), p, dtype=torch.int8, device=q.device))
    key_block = torch.cat(key_block)
    key_level = torch.cat(key_level)
    bias = torch.log(key_level.float())  # 0 for full resolution
    kall = torch.cat([k, k_pooled[:, :, : offs[0]]], dim=2).float()
    vall = torch.cat([v, v_pooled[:, :, : offs[0]]], dim=2).float()
    NK = kall.shape[2]
    is_full = key_level == 1
    key_pos = torch.cat([kpos, kpos.new_zeros(NK - Lk)])
    valid_key = torch.ones(B, NK, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid_key[:, :Lk] = key_padding_mask.bool()

    if out is None:
        out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    # bound the [B, Hq, rows, NK] logits to ~2**25 elements
    rows_per_chunk = max(block_q, (2**25 // max(1, B * Hq * NK)) // block_q * block_q)
    for r0 in range(0, Lq, rows_per_chunk):
        r1 = min(Lq, r0 + rows_per_chunk)
        rows = r1 - r0
        r = torch.arange(r0, r1, device=q.device)
        qpos = Lk - Lq + r
        qblk = r // block_q
        # factor of each (row, key) from the map of the row's query block: [B, Hq, rows, NK]
        f_rows = fmap[:, :, qblk]  # [B, Hq, rows, nk]
        f_key = f_rows[..., key_block]
        allowed = f_key == key_level
        causal = (~is_full)[None, :] | (key_pos[None, :] <= qpos[:, None])
        allowed = allowed & causal[None, None] & valid_key[:, None, None, :]
        qg = q[:, :, r0:r1].float().reshape(B, Hkv, G * rows, D)
        logits = torch.matmul(qg, kall.transpose(-1, -2)).reshape(B, Hq, rows, NK) * scale + bias
        logits = logits.masked_fill(~allowed, float("-inf"))
        mx = logits.amax(-1, keepdim=True)
        # guard only rows that see nothing (max -inf); a NaN max must reach the output, as in SDPA
        mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
        pexp = torch.exp(logits - mx)
        den = pexp.sum(-1, keepdim=True)
        o = torch.matmul(pexp.reshape(B, Hkv, G * rows, NK), vall).reshape(B, Hq, rows, D)
        empty = den == 0  # no key at all: zeros (NaN compares false here and propagates through o / den)
        o = torch.where(empty, torch.zeros_like(o), o / torch.where(empty, torch.ones_like(den), den))
        out[:, :, r0:r1] = o.to(out.dtype)
    return out
