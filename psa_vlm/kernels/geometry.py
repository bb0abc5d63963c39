"""Block geometry shared by every PSA stage (pure PyTorch, no Triton).

Query row ``r`` of ``q`` sits at absolute position ``Lk - Lq + r`` (bottom-right causal alignment).
Query block ``i`` holds rows ``[i*bq, min((i+1)*bq, Lq))``; KV block ``j`` holds keys ``[j*bk, min((j+1)*bk, Lk))``.

- *visible*: some query of block ``i`` sees some key of block ``j`` (``first_key(j) <= last_pos(i)``).
- *poolable*: block ``j`` is complete (``bk`` keys) and lies entirely in the past of every query of block
  ``i`` (``last_key(j) <= first_pos(i)``). Only poolable blocks may be read at a pooled level.
- *geometry-forced*: visible but not poolable (the causal diagonal, and an incomplete last block).

Pyramid layout: ``k_pooled`` is ``[B, Hkv, R, D]`` holding, level after level in ascending factor order,
``nkf * bk / p`` pooled rows for factor ``p`` where ``nkf = Lk // bk`` counts complete blocks.
``level_offsets`` gives the first row of each level.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

#: Factor order used by ``counts`` tensors: column ``c`` counts blocks at factor ``FACTOR_ORDER[c]``.
FACTOR_ORDER: Tuple[int, int, int, int] = (1, 2, 4, 8)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def level_offsets(nkf: int, block_k: int, factors: Sequence[int]) -> Dict[int, int]:
    """First row of each pooled level inside ``k_pooled`` (factors ascending)."""
    off, out = 0, {}
    for p in sorted(factors):
        out[p] = off
        off += nkf * (block_k // p)
    out[0] = off  # total rows
    return out


def block_masks(
    lq: int, lk: int, block_q: int, block_k: int, device: torch.device | str = "cpu"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(visible, poolable)`` boolean ``[nq, nk]`` maps for the geometry above."""
    nq, nk = cdiv(lq, block_q), cdiv(lk, block_k)
    i = torch.arange(nq, device=device)
    j = torch.arange(nk, device=device)
    first_pos = lk - lq + i * block_q
    last_pos = lk - lq + torch.clamp((i + 1) * block_q, max=lq) - 1
    first_key = j * block_k
    last_key = torch.clamp((j + 1) * block_k, max=lk) - 1
    complete = (last_key - first_key + 1) == block_k
    visible = first_key[None, :] <= last_pos[:, None]
    poolable = visible & complete[None, :] & (last_key[None, :] <= first_pos[:, None])
    return visible, poolable
