"""Triton pyramid pooling and similarity cap (PSA_SPEC steps 2 and 6): same contract as ``naive.pyramid_pool``.

What it computes: for every complete KV block of every ``(batch, KV head)``, the float32 mean of each run of
``p`` consecutive keys and values for every enabled factor ``p`` (stored in the input dtype, levels stacked
in ascending factor order as ``geometry.level_offsets`` lays them out), and the block's similarity cap: the
largest enabled ``p`` whose mean cosine ``a.b / max(|a| |b|, 1e-8)`` between the first (``a``) and last
(``b``) key of each length-``p`` window exceeds its threshold, else 1. An incomplete last block gets cap 1;
without thresholds every complete block gets ``max(factors)``; without factors every block gets 1.

Grid: ``(nk, Hkv, B)``: one program per KV block. All factors come from one read of the block: the program
walks the block in chunks of ``CH`` rows; a chunk is loaded as ``M = max(factors)`` row tiles by residue
modulo ``M`` (tile ``o`` holds rows ``w*M + o`` of every ``M``-window ``w``), so each element is read once and
every level is element-wise arithmetic on those tiles: ``p``-window sums are sums of ``p`` consecutive residue
tiles (pairwise: ``(x0+x1)+(x2+x3)``), the first/last keys of a ``p``-window are residue tiles ``kp`` and
``kp+p-1``. V is pooled the same way (means only). The incomplete last block only writes its cap.

Tiles: ``M`` tiles ``[CH/M, BD]`` float32, ``BD = next_pow2(D)`` (masked), ``CH = min(64, next_pow2(bk))``.

Limits: memory-bound (reads K and V once, writes ``sum(1/p)`` of them); any float dtype the reference takes
(float16, bfloat16, float32), any strides (copied only if the last dimension is not contiguous); ``block_k``
a multiple of ``max(factors)``. Cosines and window means are float32 sums in a different order from the
reference, so a cap may differ from it only where a mean cosine lies within float32 rounding of its threshold.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..geometry import cdiv, level_offsets
from .naive import COS_EPS

__all__ = ["pyramid_pool"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Launch overrides (``CH``, ``num_warps``) for benchmarks; empty by default.
_OVERRIDES: dict = {}


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _cos_sum(a, b, wmask, EPS: tl.constexpr):
    """Sum over windows of ``a.b / max(|a| |b|, EPS)``; ``a``, ``b`` ``[NW, BD]`` float32."""
    dot = tl.sum(a * b, axis=1)  # [NW]
    na = tl.sqrt_rn(tl.sum(a * a, axis=1))
    nb = tl.sqrt_rn(tl.sum(b * b, axis=1))
    cos = tl.math.div_rn(dot, tl.maximum(na * nb, EPS))
    return tl.sum(tl.where(wmask, cos, 0.0), axis=0)


@triton.jit
def _store_level(dst, row, stride_pl, offs_d, m2d, val, P: tl.constexpr):
    """Store the window means ``val / P`` (``[NW, BD]``) at pooled rows ``row`` (``[NW]``)."""
    ptrs = dst + row.to(tl.int64)[:, None] * stride_pl + offs_d[None, :]
    tl.store(ptrs, (val * (1.0 / P)).to(dst.dtype.element_ty), mask=m2d)  # 1/P: exact power of two


@triton.jit
def _pool_chunk(
    src,  # [NW, BD] pointers to the first row of each MAXF-window of the chunk
    stride_l,
    dst,  # pooled tensor base of this (batch, head)
    stride_pl,
    offs_d,
    m2d,  # [NW, BD] load/store mask
    wmask,  # [NW]
    first,  # [NW] int32: position of each window's first row inside the complete-block stream (j*bk + row)
    off2,
    off4,
    off8,
    MAXF: tl.constexpr,
    HAS2: tl.constexpr,
    HAS4: tl.constexpr,
    HAS8: tl.constexpr,
    WITH_COS: tl.constexpr,
    EPS: tl.constexpr,
):
    """Means of every enabled level for one chunk; returns the chunk's cosine sums for factors 2, 4, 8."""
    c2 = 0.0
    c4 = 0.0
    c8 = 0.0
    x0 = tl.load(src, mask=m2d, other=0.0).to(tl.float32)
    x1 = tl.load(src + stride_l, mask=m2d, other=0.0).to(tl.float32)
    s01 = x0 + x1
    if MAXF == 2:
        _store_level(dst, off2 + first // 2, stride_pl, offs_d, m2d, s01, 2)
        if WITH_COS:
            c2 = _cos_sum(x0, x1, wmask, EPS)
    else:
        x2 = tl.load(src + 2 * stride_l, mask=m2d, other=0.0).to(tl.float32)
        x3 = tl.load(src + 3 * stride_l, mask=m2d, other=0.0).to(tl.float32)
        s23 = x2 + x3
        s03 = s01 + s23
        if MAXF == 4:
            if HAS2:
                _store_level(dst, off2 + first // 2, stride_pl, offs_d, m2d, s01, 2)
                _store_level(dst, off2 + first // 2 + 1, stride_pl, offs_d, m2d, s23, 2)
                if WITH_COS:
                    c2 = _cos_sum(x0, x1, wmask, EPS) + _cos_sum(x2, x3, wmask, EPS)
            _store_level(dst, off4 + first // 4, stride_pl, offs_d, m2d, s03, 4)
            if WITH_COS:
                c4 = _cos_sum(x0, x3, wmask, EPS)
        else:
            x4 = tl.load(src + 4 * stride_l, mask=m2d, other=0.0).to(tl.float32)
            x5 = tl.load(src + 5 * stride_l, mask=m2d, other=0.0).to(tl.float32)
            x6 = tl.load(src + 6 * stride_l, mask=m2d, other=0.0).to(tl.float32)
            x7 = tl.load(src + 7 * stride_l, mask=m2d, other=0.0).to(tl.float32)
            s45 = x4 + x5
            s67 = x6 + x7
            s47 = s45 + s67
            if HAS2:
                _store_level(dst, off2 + first // 2, stride_pl, offs_d, m2d, s01, 2)
                _store_level(dst, off2 + first // 2 + 1, stride_pl, offs_d, m2d, s23, 2)
                _store_level(dst, off2 + first // 2 + 2, stride_pl, offs_d, m2d, s45, 2)
                _store_level(dst, off2 + first // 2 + 3, stride_pl, offs_d, m2d, s67, 2)
                if WITH_COS:
                    c2 = (_cos_sum(x0, x1, wmask, EPS) + _cos_sum(x2, x3, wmask, EPS)
                          + _cos_sum(x4, x5, wmask, EPS) + _cos_sum(x6, x7, wmask, EPS))
            if HAS4:
                _store_level(dst, off4 + first // 4, stride_pl, offs_d, m2d, s03, 4)
                _store_level(dst, off4 + first // 4 + 1, stride_pl, offs_d, m2d, s47, 4)
                if WITH_COS:
                    c4 = _cos_sum(x0, x3, wmask, EPS) + _cos_sum(x4, x7, wmask, EPS)
            _store_level(dst, off8 + first // 8, stride_pl, offs_d, m2d, s03 + s47, 8)
            if WITH_COS:
                c8 = _cos_sum(x0, x7, wmask, EPS)
    return c2, c4, c8


#: Integer arguments that change with the sequence length: not specialised by Triton (no recompilation when a
#: new length is, or is not, a multiple of 16). Measured cost of a new length: docs/PERFORMANCE.md.
_LENGTH_ARGS = ("stride_cb", "stride_ch", "nkf", "off2", "off4", "off8")


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _pool_kernel(
    k_ptr,
    v_ptr,
    kp_ptr,
    vp_ptr,
    cap_ptr,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_pb,  # k_pooled and v_pooled share their (contiguous) layout
    stride_ph,
    stride_pl,
    stride_cb,
    stride_ch,
    D,
    nkf,
    off2,
    off4,
    off8,
    thr2,
    thr4,
    thr8,
    BLOCK_K: tl.constexpr,
    CH: tl.constexpr,
    BD: tl.constexpr,
    MAXF: tl.constexpr,
    HAS2: tl.constexpr,
    HAS4: tl.constexpr,
    HAS8: tl.constexpr,
    USE_SIM: tl.constexpr,
    EPS: tl.constexpr,
):
    j = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    cap_off = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + j
    if j < nkf:
        NW: tl.constexpr = CH // MAXF  # MAXF-windows per chunk
        offs_w = tl.arange(0, NW)
        offs_d = tl.arange(0, BD)
        d_mask = offs_d < D
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        p_base = b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
        cos2 = tl.full((), 0.0, tl.float32)
        cos4 = tl.full((), 0.0, tl.float32)
        cos8 = tl.full((), 0.0, tl.float32)
        for row0 in range(0, BLOCK_K, CH):
            wrow = row0 + offs_w * MAXF  # [NW] first row of each window inside the block
            wmask = wrow < BLOCK_K
            m2d = wmask[:, None] & d_mask[None, :]
            first = j * BLOCK_K + wrow  # [NW] position in the stream of complete blocks
            roff = first.to(tl.int64)[:, None]
            c2, c4, c8 = _pool_chunk(k_base + roff * stride_kl + offs_d[None, :], stride_kl, kp_ptr + p_base,
                                     stride_pl, offs_d, m2d, wmask, first, off2, off4, off8, MAXF, HAS2, HAS4,
                                     HAS8, USE_SIM, EPS)
            cos2 += c2
            cos4 += c4
            cos8 += c8
            _pool_chunk(v_base + roff * stride_vl + offs_d[None, :], stride_vl, vp_ptr + p_base, stride_pl,
                        offs_d, m2d, wmask, first, off2, off4, off8, MAXF, HAS2, HAS4, HAS8, False, EPS)
        if USE_SIM:
            # ascending factors: the largest passing factor wins (as the reference)
            cap = tl.full((), 1, tl.int32)
            if HAS2:
                cap = tl.where(tl.math.div_rn(cos2, BLOCK_K // 2) > thr2, 2, cap)
            if HAS4:
                cap = tl.where(tl.math.div_rn(cos4, BLOCK_K // 4) > thr4, 4, cap)
            if HAS8:
                cap = tl.where(tl.math.div_rn(cos8, BLOCK_K // 8) > thr8, 8, cap)
        else:
            cap = tl.full((), MAXF, tl.int32)
        tl.store(cap_ptr + cap_off, cap.to(tl.int8))
    else:
        tl.store(cap_ptr + cap_off, tl.full((), 1, tl.int8))


# ---------------------------------------------------------------------------------------------- launcher
def _alloc(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer (a seam for tests, which poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
        k: Keys ``[B, Hkv, Lk, D]`` (float16, bfloat16 or float32, any strides).
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
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, Hkv, Lk, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; pyramid_pool supports float16, bfloat16 and float32")
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"k and v must share shape, dtype and device, got {tuple(k.shape)}/{k.dtype}/{k.device} and "
            f"{tuple(v.shape)}/{v.dtype}/{v.device}"
        )
    factors = sorted(int(p) for p in factors)
    if any(p not in (2, 4, 8) for p in factors) or len(set(factors)) != len(factors):
        raise ValueError(f"factors must be distinct values from (2, 4, 8), got {factors}")
    if block_k <= 0 or (factors and block_k % max(factors)):
        raise ValueError(f"block_k={block_k} must be a positive multiple of the largest factor {factors}")
    if sim_thresholds is not None and len(sim_thresholds) != 3:
        raise ValueError(f"sim_thresholds must be 3 numbers for factors (2, 4, 8) or None, got {sim_thresholds!r}")

    B, H, Lk, D = k.shape
    nk, nkf = cdiv(Lk, block_k), Lk // block_k
    dev = k.device
    if not factors:
        cap = torch.ones(B, H, nk, dtype=torch.int8, device=dev)
        return k.new_empty(B, H, 0, D), v.new_empty(B, H, 0, D), cap
    offs = level_offsets(nkf, block_k, factors)
    R = offs[0]
    k_pooled = _alloc((B, H, R, D), k.dtype, dev)
    v_pooled = _alloc((B, H, R, D), v.dtype, dev)
    cap = _alloc((B, H, nk), torch.int8, dev)
    if B * H * nk == 0:
        return k_pooled, v_pooled, cap
    k = _last_dim_contiguous(k)
    v = _last_dim_contiguous(v)

    BD = max(16, triton.next_power_of_2(D))
    # chunk: a power of two holding whole windows of the largest factor (block_k is a multiple of it)
    CH = min(_OVERRIDES.get("CH", 64), triton.next_power_of_2(block_k))
    CH = max(CH, max(factors))
    thr = tuple(float(t) for t in sim_thresholds) if sim_thresholds is not None else (0.0, 0.0, 0.0)
    assert k_pooled.stride() == v_pooled.stride()
    _pool_kernel[(nk, H, B)](
        k,
        v,
        k_pooled,
        v_pooled,
        cap,
        *k.stride()[:3],
        *v.stride()[:3],
        *k_pooled.stride()[:3],
        *cap.stride()[:2],
        D,
        nkf,
        offs.get(2, 0),
        offs.get(4, 0),
        offs.get(8, 0),
        *thr,
        BLOCK_K=block_k,
        CH=CH,
        BD=BD,
        MAXF=max(factors),
        HAS2=2 in factors,
        HAS4=4 in factors,
        HAS8=8 in factors,
        USE_SIM=sim_thresholds is not None,
        EPS=COS_EPS,
        num_warps=_OVERRIDES.get("num_warps", 4),
    )
    return k_pooled, v_pooled, cap
