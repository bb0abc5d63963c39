"""Triton antidiagonal block importance (PSA_SPEC step 3): same contract as ``naive.block_importance``.

What it computes: XAttention's estimator. Reduced query row ``r`` (query rows ``[r*s, r*s+s)``) and reduced key
``c`` (keys ``[c*s, c*s+s)``, both zero-padded at the end) have the logit
``l[r, c] = scale / s * sum_t q[r*s+s-1-t] . k[c*s+t]``; ``c`` is visible to ``r`` when
``c*s <= Lk - Lq + min(r*s+s-1, Lq-1)``; each reduced row is soft-maxed over its visible keys and the
probabilities are summed per (query block, KV block). Output float32 ``[B, Hq, nq, nk]``, 0 where invisible.

Two forms of one computation (``_gemm_form`` picks; both are tested against the reference), the first in two
implementations:

**GEMM form** (``_estimate_gemm_kernel``; float16/bfloat16, power-of-two ``bq/s`` and ``bk/s``, TMA: compute
capability 9.0+). The antidiagonal sum is one dot product of two ``s * D``-long rows:
``Qr[r] = q[r*s], ..., q[r*s+s-1]`` side by side and ``Kr[c] = k[c*s+s-1], ..., k[c*s]`` (the group reversed),
so the logits are the plain product ``Qr @ Kr^T`` with a ``s * D``-deep reduction, read through TMA tensor
descriptors. ``Qr`` is read in place (``_gemm_query``) from contiguous ``[B, Hq, Lq, D]`` when ``Lq % s == 0``,
and from transformers' ``[B, L, H, D]`` storage when ``Lq % s == 0`` or the batch is 1 (a ragged last group is
then added after the kernel by ``_add_ragged_row``; this layout also needs a descriptor chunk of at least 32
elements dividing ``D`` on a GPU: D 64 and 128 yes, D 80 no); otherwise it is one zero-padded copy (0.5-0.9 ms
at 64k tokens on an H200). In place on a ragged 64k prompt: 4.65 ms against 5.56 ms with the copy (v7).
``Kr`` is always a copy (``Hkv / Hq`` of the query bytes). On Hopper (compute capability 9.x, Triton >= 3.6) this
form runs as the Gluon kernel of ``hopper.py`` (``_gluon_engine``: same tiles, same float32 arithmetic; 14% faster
on an H200, ``NOTES_stages.md`` v8); elsewhere, and under the interpreter, as ``_estimate_gemm_kernel``. A work
item is ``BM`` = 128 consecutive reduced rows of one query head (``128 / (bq/s)`` whole query blocks), walking the
key tiles up to its causal limit; the items of one row tile's ``Hq`` heads run side by side, so the ``Hkv`` key
streams are shared through L2.

**General form** (``_estimate_kernel``; any ``s`` dividing the blocks, float32 too): the same sum as ``s``
strided steps of ``D``-wide dots, loaded with pointer arithmetic. Work items are the (query block, query head)
*pairs* of one (batch, KV head), ordered query-block-major, in groups of ``PP = ROWS // (bq/s)`` consecutive
pairs (``ROWS`` = 128 on the GPU: 8 pairs x 16 reduced rows for bq 128, s 8; 16 pairs x 8 rows at s 16; 4
pairs x 32 rows at s 4). An item stacks its pairs' reduced rows (``PP * bq/s``, padded to a power of two
``BM``) as the M dimension; a group may straddle query blocks, each row carries its own causal limit.
``KPB = bk/s`` reduced keys per KV block occupy ``KPB_P2 = next_pow2(KPB)`` tile columns (padding masked).

Both forms: a persistent grid (program ``p`` takes items in snake order over items sorted heaviest first, so
all programs get the same work), each program with a float32 scratch slot ``[BM, nk]`` (bounded by the grid,
not by the sequence length), and two passes per item, no ``[Rq, Rk]`` score matrix:

1. Over the key tiles up to the item's causal limit (tiles wholly in the future are never visited), each tile
   of ``BN`` reduced keys (``BN / KPB`` whole KV blocks) is accumulated in float32; from the tile's logits
   (log2 domain; the causal mask only on tiles that reach past some row's limit) the per (row, KV block)
   log-sum-exp relative to the running row maximum goes to the scratch while the running row maximum and sum
   are carried along (online softmax).
2. With the final row log-sum-exp ``LSE_r``: ``S[i, j] = sum_r 2^(lse_rj - LSE_r)`` summed over each query
   block's rows, read back from the scratch in ``[BM, NJ]`` tiles; every ``j`` of the row is written (0 if
   invisible).

Tiles (GPU defaults, chosen on an H200, see ``NOTES_stages.md``): ``BM`` 128 x ``BN`` 256 reduced keys x
``BKD`` 64, 8 warps, 3 stages (wgmma, one CTA per SM); the GEMM form with one program per SM and TMA loads, the
general form with up to two programs per SM and cp.async loads.

Cost: ``Lq * Lk * Hq * D / s`` FLOPs for causal inputs (``1/(2s)`` of dense causal attention's). Measured on an
H200 at 64k tokens, s 8: GEMM form as the Gluon kernel 3.71 ms (~520 TFLOP/s, v8), as the Triton kernel 4.32 ms
in the same run (4.35 ms = 443 TFLOP/s in v6), general form 5.47 ms (345 TFLOP/s); cuBLAS runs the same product
without softmax or causal skipping at 623 TFLOP/s. Session 9 (Gluon kernel, 64k / 128k): s 8 3.67 / 14.96 ms,
s 16 2.13 / 8.11, s 32 1.19 / 4.24 (``NOTES_stages.md`` v9).

Limits: ``bq``, ``bk`` multiples of ``s``, any such ``s`` (the CPU tests compare both forms with the reference
at s 4, 8, 16 and 32, on 128 x 128 blocks too; the GPU tier at s 8, 16 and 32 on Qwen2.5-VL-7B shapes); float16,
bfloat16, float32 inputs (float32 dots in IEEE precision, general form); any strides (copied only if the last
dimension is not contiguous, or as the GEMM form's padded copy). Under ``TRITON_INTERPRET=1`` bfloat16 tiles
are upcast to float32 after loading (the interpreter's bfloat16 arithmetic is wrong).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import gluon_support
from ..geometry import cdiv

__all__ = ["block_importance"]

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Scratch budget (float32 block log-sum-exps, ``[BM, nk]`` per program); the grid shrinks to fit, but never
#: below one program per SM.
_SCRATCH_BYTES = 64 << 20
#: Tile/launch overrides for benchmarks and tests, empty by default: ``GEMM`` (the GEMM form on / off), ``GLUON``
#: (its Gluon kernel on / off; ``True`` raises where it cannot run), ``GLUON_TILES`` (a dict over ``hopper.TILES``),
#: and the Triton kernels' ``ROWS``, ``BN``, ``BKD``, ``NJ``, ``FLAT``, ``PROGRAMS``, ``num_warps``, ``num_stages``.
_OVERRIDES: dict = {}
#: Whether the GEMM form (``_estimate_gemm_kernel``) runs where it can; see ``_gemm_form``.
_GEMM_DEFAULT = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _qk_step(
    acc,  # [BM, BN] float32
    q_ptr,
    k_ptr,
    q_rows,  # [BM] int64: row offsets (batch/head/row at t = 0) of the stacked reduced rows
    q_row0,  # [BM] int32: query row of offset s-1 (t = 0)
    q_ok,  # [BM] bool
    k_rows,  # [BN] int32: key row of offset 0 of each tile column
    k_ok,  # [BN] bool
    k_base,  # scalar int64
    stride_ql,
    stride_kl,
    u,  # step: t = u // ND, D chunk = u % ND
    Lq,
    Lk,
    D,
    S: tl.constexpr,
    BKD: tl.constexpr,
    ND: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    t = u // ND
    offs_d = (u % ND) * BKD + tl.arange(0, BKD)
    qr = q_row0 - t  # [BM]
    kr = k_rows + t  # [BN]
    qm = q_ok & (qr < Lq)
    km = k_ok & (kr < Lk)
    if EVEN_D:
        qmask = qm[:, None]
        kmask = km[:, None]
    else:
        qmask = qm[:, None] & (offs_d < D)[None, :]
        kmask = km[:, None] & (offs_d < D)[None, :]
    qt = tl.load(q_ptr + q_rows[:, None] + qr.to(tl.int64)[:, None] * stride_ql + offs_d[None, :], mask=qmask,
                 other=0.0)
    kt = tl.load(k_ptr + k_base + kr.to(tl.int64)[:, None] * stride_kl + offs_d[None, :], mask=kmask, other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
        kt = kt.to(tl.float32)
    return tl.dot(qt, tl.trans(kt), acc, input_precision=DOT_PREC)  # [BM, BN]


@triton.jit
def _tile_lse(
    acc,  # [BM, BN] float32 raw logits of the tile
    m_i,  # [BM] running max (log2 domain)
    l_i,  # [BM] running sum
    scr_rows,  # [BM] pointers to the program's scratch rows
    row_ok,  # [BM] bool
    last_m,  # [BM] int32: last visible key position of each reduced row
    min_last,  # scalar: smallest last_m over the valid rows
    col_c,  # [BN] int32: tile-relative reduced key of each column
    col_ok,  # [BN] bool: column maps to a key group of its block (KPB_P2 padding excluded)
    jt,  # tile index
    nk,
    qk_scale,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KPB: tl.constexpr,
    KPB_P2: tl.constexpr,
):
    NBT: tl.constexpr = BN // KPB_P2
    x = acc * qk_scale
    # only tiles reaching past some row's causal limit (or with KPB padding columns) need the mask
    if (KPB != KPB_P2) | ((jt + 1) * (NBT * KPB * S) - S > min_last):
        c = jt * (NBT * KPB) + col_c  # [BN] reduced key index
        vis = ((c * S)[None, :] <= last_m[:, None]) & col_ok[None, :]
        x = tl.where(vis, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    p = tl.exp2(x - m_new[:, None])  # [BM, BN]
    bs = tl.sum(tl.reshape(p, [BM, NBT, KPB_P2]), axis=2)  # [BM, NBT] per-KV-block sums
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(bs, axis=1)
    lse = tl.where(bs > 0.0, m_new[:, None] + tl.log2(tl.maximum(bs, 1e-38)), float("-inf"))
    jj = jt * NBT + tl.arange(0, NBT)
    tl.store(scr_rows[:, None] + jj[None, :], lse, mask=row_ok[:, None] & (jj < nk)[None, :])
    return m_new, l_i


@triton.jit
def _estimate_item(
    q_ptr,
    k_ptr,
    out_ptr,
    scr_rows,  # [BM] pointers: this program's scratch rows
    item,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_ob,
    stride_oh,
    stride_oq,
    Lq,
    Lk,
    D,
    nk,
    Rq,
    n_pairs,
    n_pg,
    Hkv,
    G,
    NB,  # B * Hkv
    qk_scale,
    S: tl.constexpr,
    RB: tl.constexpr,
    PP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KPB: tl.constexpr,
    KPB_P2: tl.constexpr,
    BKD: tl.constexpr,
    ND: tl.constexpr,
    NJ: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FLAT: tl.constexpr,
):
    """One work item: ``PP`` consecutive (query block, head) pairs of one (batch, KV head), both passes."""
    NBT: tl.constexpr = BN // KPB_P2
    NU: tl.constexpr = S * ND
    pg = n_pg - 1 - item // NB  # heaviest (latest) pair group first
    bh = item % NB
    b = bh // Hkv
    hkv = bh % Hkv

    # ---- stacked rows: m -> pair (query block i, head g) -> reduced row r
    offs_m = tl.arange(0, BM)
    pp_m = offs_m // RB
    pair_m = pg * PP + pp_m
    i_m = pair_m // G
    r = i_m * RB + offs_m % RB  # [BM] reduced row
    row_ok = (pp_m < PP) & (pair_m < n_pairs) & (r < Rq)
    last_m = Lk - Lq + tl.minimum(r * S + S - 1, Lq - 1)  # [BM] last visible key position
    min_last = tl.min(tl.where(row_ok, last_m, Lk), axis=0)
    q_rows = b.to(tl.int64) * stride_qb + (hkv * G + pair_m % G).to(tl.int64) * stride_qh
    q_row0 = r * S + S - 1

    # ---- key tile columns: n -> (KV block jb of the tile, key group o of the block)
    offs_n = tl.arange(0, BN)
    col_c = (offs_n // KPB_P2) * KPB + offs_n % KPB_P2  # tile-relative reduced key
    col_ok = (offs_n % KPB_P2) < KPB
    k_base = b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh

    # causal extent of the item: the last position of its last query block
    i_last = (tl.minimum(pg * PP + PP, n_pairs) - 1) // G
    last_max = Lk - Lq + tl.minimum((i_last + 1) * (RB * S), Lq) - 1
    nvis = last_max // (KPB * S) + 1  # KV blocks visible to some row of the item
    n_tiles = tl.cdiv(nvis, NBT)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BN], tl.float32)
    if FLAT:
        # one flattened (tile, step) loop: the pipeline does not drain between tiles
        for it in range(0, n_tiles * NU):
            jt = it // NU
            u = it - jt * NU
            k_rows = (jt * (NBT * KPB) + col_c) * S
            acc = _qk_step(acc, q_ptr, k_ptr, q_rows, q_row0, row_ok, k_rows, col_ok, k_base, stride_ql,
                           stride_kl, u, Lq, Lk, D, S, BKD, ND, EVEN_D, UPCAST, DOT_PREC)
            if u == NU - 1:
                m_i, l_i = _tile_lse(acc, m_i, l_i, scr_rows, row_ok, last_m, min_last, col_c, col_ok, jt, nk, qk_scale,
                                     S, BM, BN, KPB, KPB_P2)
                acc = tl.zeros([BM, BN], tl.float32)
    else:
        for jt in range(0, n_tiles):
            k_rows = (jt * (NBT * KPB) + col_c) * S
            acc = tl.zeros([BM, BN], tl.float32)
            for u in range(0, NU):
                acc = _qk_step(acc, q_ptr, k_ptr, q_rows, q_row0, row_ok, k_rows, col_ok, k_base, stride_ql,
                               stride_kl, u, Lq, Lk, D, S, BKD, ND, EVEN_D, UPCAST, DOT_PREC)
            m_i, l_i = _tile_lse(acc, m_i, l_i, scr_rows, row_ok, last_m, min_last, col_c, col_ok, jt, nk, qk_scale,
                                 S, BM, BN, KPB, KPB_P2)

    lse_row = m_i + tl.log2(l_i)  # [BM]
    tl.debug_barrier()  # the scratch written above is read back by other threads of the program

    # ---- second pass: S[i, j] = sum over each pair's rows of 2^(lse_rj - LSE_r)
    offs_j = tl.arange(0, NJ)
    for j0 in range(0, nk, NJ):
        jj = j0 + offs_j
        lse = tl.load(scr_rows[:, None] + jj[None, :], mask=row_ok[:, None] & (jj < nvis)[None, :],
                      other=float("-inf"))
        pr = tl.exp2(lse - lse_row[:, None])  # [BM, NJ]
        for pp in tl.static_range(PP):
            val = tl.sum(tl.where(((pp_m == pp) & row_ok)[:, None], pr, 0.0), axis=0)  # [NJ]
            pair = pg * PP + pp
            dst = (out_ptr + b.to(tl.int64) * stride_ob + (hkv * G + pair % G).to(tl.int64) * stride_oh
                   + (pair // G).to(tl.int64) * stride_oq)
            tl.store(dst + jj, val, mask=(jj < nk) & (pair < n_pairs))
    tl.debug_barrier()  # the next item of this program overwrites the scratch


#: Integer arguments that change with the sequence length: not specialised by Triton (no recompilation when a
#: new length is, or is not, a multiple of 16). The scratch row pitch is ``nk`` rounded up to 16 instead, so its
#: divisibility (aligned scratch rows) holds at every length. Measured cost of a new length: docs/PERFORMANCE.md.
_LENGTH_ARGS = ("stride_ob", "stride_oh", "stride_oq", "Lq", "Lk", "nk", "Rq", "n_pairs", "n_pg", "n_items")


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _estimate_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    scr_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_ob,
    stride_oh,
    stride_oq,
    Lq,
    Lk,
    D,
    nk,
    Rq,
    n_pairs,  # nq * G (query block, head) pairs per (batch, KV head)
    n_pg,  # pair groups of PP pairs
    n_items,  # n_pg * B * Hkv
    Hkv,
    G,
    NB,
    qk_scale,  # scale / s * log2(e)
    pitch,  # scratch row pitch: nk rounded up to a multiple of 16
    S: tl.constexpr,
    RB: tl.constexpr,  # bq / s reduced rows per query block
    PP: tl.constexpr,  # pairs stacked per item
    BM: tl.constexpr,
    BN: tl.constexpr,
    KPB: tl.constexpr,
    KPB_P2: tl.constexpr,
    BKD: tl.constexpr,
    ND: tl.constexpr,
    NJ: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FLAT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # the program's scratch slot: [BM, nk] float32 in rows of `pitch` elements
    scr_rows = scr_ptr + pid.to(tl.int64) * (BM * pitch) + tl.arange(0, BM).to(tl.int64) * pitch
    # persistent snake schedule over items sorted heaviest first: equal work per program
    for rnd in range(0, tl.cdiv(n_items, nprog)):
        item = rnd * nprog + tl.where(rnd % 2 == 0, pid, nprog - 1 - pid)
        if item < n_items:
            _estimate_item(q_ptr, k_ptr, out_ptr, scr_rows, item, stride_qb, stride_qh, stride_ql, stride_kb,
                           stride_kh, stride_kl, stride_ob, stride_oh, stride_oq, Lq, Lk, D, nk, Rq, n_pairs,
                           n_pg, Hkv, G, NB, qk_scale, S, RB, PP, BM, BN, KPB, KPB_P2, BKD, ND, NJ, EVEN_D,
                           UPCAST, DOT_PREC, FLAT)


@triton.jit
def _gemm_item(
    q_desc,  # the queries' reduced rows: in place or a reduced-row buffer (``_gemm_query``)
    k_desc,  # [B*Hkv*Rk, s*D]: reduced keys, each group's s keys in reverse order
    out_ptr,
    scr_rows,
    item,
    stride_ob,
    stride_oh,
    stride_oq,
    Lq,
    Lk,
    nq,
    nk,
    Rq,
    Rrows,  # reduced rows per head the descriptor holds (Rq, or Rq - 1 when a ragged last group is added later)
    Rk,
    n_rt,
    row_b,  # q_desc rows per batch
    row_h,  # q_desc rows per head (0 in place)
    col_t,
    col_hd,  # q_desc columns per head (``D`` in place, else 0)
    Hq,
    G,
    BH,  # B * Hq
    qk_scale,
    S: tl.constexpr,
    SD: tl.constexpr,
    DH: tl.constexpr,
    RB: tl.constexpr,
    PP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KPB: tl.constexpr,
    BKD: tl.constexpr,
    NJ: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FLAT: tl.constexpr,
):
    """One work item of the GEMM form: ``BM`` consecutive reduced rows (``PP`` query blocks) of one query head."""
    NBT: tl.constexpr = BN // KPB
    NKD: tl.constexpr = (SD + BKD - 1) // BKD
    rt = n_rt - 1 - item // BH  # heaviest (latest) row tile first
    bh = item % BH
    b = bh // Hq
    h = bh % Hq

    offs_m = tl.arange(0, BM)
    r = rt * BM + offs_m  # [BM] reduced row
    row_ok = r < Rrows
    last_m = Lk - Lq + tl.minimum(r * S + S - 1, Lq - 1)  # [BM] last visible key position
    min_last = tl.min(tl.where(row_ok, last_m, Lk), axis=0)
    last_max = tl.max(tl.where(row_ok, last_m, 0), axis=0)
    nvis = last_max // (KPB * S) + 1  # KV blocks visible to some row of the item
    n_tiles = tl.cdiv(nvis, NBT)
    k_row = (bh // G) * Rk  # (b * Hkv + h // G) * Rk
    col_c = tl.arange(0, BN)
    col_ok = col_c < BN

    q_row = b * row_b + h * row_h + rt * BM
    col_h = h * col_hd

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for jt in tl.range(0, n_tiles, flatten=FLAT):
        acc = tl.zeros([BM, BN], tl.float32)
        for kk in range(0, NKD):
            # chunk kk of a reduced row is query sub-row kk*BKD // DH at element kk*BKD % DH (the launcher keeps a
            # chunk inside one query row where col_t != DH)
            c = kk * BKD
            qt = q_desc.load([q_row, (c // DH) * col_t + col_h + c % DH])
            kt = k_desc.load([k_row + jt * BN, c])
            if UPCAST:
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            acc = tl.dot(qt, tl.trans(kt), acc, input_precision=DOT_PREC)
        m_i, l_i = _tile_lse(acc, m_i, l_i, scr_rows, row_ok, last_m, min_last, col_c, col_ok, jt, nk, qk_scale, S,
                             BM, BN, KPB, KPB)

    lse_row = m_i + tl.log2(l_i)  # [BM]
    tl.debug_barrier()  # the scratch written above is read back by other threads of the program

    # ---- second pass: S[i, j] = sum over the query block's reduced rows of 2^(lse_rj - LSE_r)
    offs_j = tl.arange(0, NJ)
    offs_p = tl.arange(0, PP)
    i_p = rt * PP + offs_p  # [PP] query blocks of the item
    dst = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
           + i_p.to(tl.int64)[:, None] * stride_oq)  # [PP, 1]
    for j0 in range(0, nk, NJ):
        jj = j0 + offs_j
        lse = tl.load(scr_rows[:, None] + jj[None, :], mask=row_ok[:, None] & (jj < nvis)[None, :],
                      other=float("-inf"))
        pr = tl.where(row_ok[:, None], tl.exp2(lse - lse_row[:, None]), 0.0)  # [BM, NJ]
        val = tl.sum(tl.reshape(pr, [PP, RB, NJ]), axis=1)  # [PP, NJ]
        tl.store(dst + jj[None, :], val, mask=(i_p < nq)[:, None] & (jj < nk)[None, :])
    tl.debug_barrier()  # the next item of this program overwrites the scratch


#: Length-derived integer arguments of the GEMM form (see ``_LENGTH_ARGS``).
_GEMM_LENGTH_ARGS = ("stride_ob", "stride_oh", "stride_oq", "Lq", "Lk", "nq", "nk", "Rq", "Rrows", "Rk", "n_rt",
                     "n_items", "row_b", "row_h")


@triton.jit(do_not_specialize=_GEMM_LENGTH_ARGS)
def _estimate_gemm_kernel(
    q_desc,
    k_desc,
    out_ptr,
    scr_ptr,
    stride_ob,
    stride_oh,
    stride_oq,
    Lq,
    Lk,
    nq,
    nk,
    Rq,
    Rrows,
    Rk,
    n_rt,  # row tiles of BM reduced rows per head
    n_items,  # n_rt * B * Hq
    row_b,
    row_h,
    col_t,
    col_hd,
    Hq,
    G,
    BH,
    qk_scale,
    pitch,
    S: tl.constexpr,
    SD: tl.constexpr,
    DH: tl.constexpr,
    RB: tl.constexpr,
    PP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KPB: tl.constexpr,
    BKD: tl.constexpr,
    NJ: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FLAT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scr_rows = scr_ptr + pid.to(tl.int64) * (BM * pitch) + tl.arange(0, BM).to(tl.int64) * pitch
    for rnd in range(0, tl.cdiv(n_items, nprog)):
        item = rnd * nprog + tl.where(rnd % 2 == 0, pid, nprog - 1 - pid)
        if item < n_items:
            _gemm_item(q_desc, k_desc, out_ptr, scr_rows, item, stride_ob, stride_oh, stride_oq, Lq, Lk, nq, nk, Rq,
                       Rrows, Rk, n_rt, row_b, row_h, col_t, col_hd, Hq, G, BH, qk_scale, S, SD, DH, RB, PP, BM, BN,
                       KPB, BKD, NJ, UPCAST, DOT_PREC, FLAT)


# ---------------------------------------------------------------------------------------------- launcher
def _alloc(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer (a seam for tests, which poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tiles(RB: int, KPB: int, D: int, interpret: bool, overrides: Optional[dict] = None) -> dict:
    """Tile sizes and launch options for one call."""
    if interpret:
        cfg = dict(ROWS=32, BN=16, BKD=128, NJ=16, FLAT=False, PROGRAMS=3, num_warps=4, num_stages=1)
    else:
        # v1 (H200): BN 256 beat BN 128 by 1.19x (less L2 traffic per FLOP); NOTES_stages.md
        cfg = dict(ROWS=128, BN=256, BKD=64, NJ=64, FLAT=False, PROGRAMS=0, num_warps=8, num_stages=3)
    if overrides:
        cfg.update(overrides)
    PP = max(1, cfg["ROWS"] // RB)  # RB > ROWS: one pair per item, a taller tile
    BM = max(16, triton.next_power_of_2(PP * RB))
    BD = max(16, triton.next_power_of_2(D))
    KPB_P2 = triton.next_power_of_2(KPB)
    if BM > cfg["ROWS"]:  # keep the accumulator's size
        cfg["BN"] = cfg["BN"] * cfg["ROWS"] // BM
    cfg["BN"] = max(cfg["BN"], KPB_P2, 16)
    cfg["BKD"] = min(max(cfg["BKD"], 16), BD)
    cfg.update(PP=PP, BM=BM, KPB_P2=KPB_P2, BD=BD)
    return cfg


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _gemm_tiles(RB: int, KPB: int, SD: int, interpret: bool, overrides: Optional[dict] = None) -> dict:
    """Tile sizes and launch options of the GEMM form for one call."""
    if interpret:
        cfg = dict(ROWS=32, BN=16, BKD=32, NJ=16, FLAT=False, PROGRAMS=3, num_warps=4, num_stages=1)
    else:
        # v6 (H200, 64k): one program per SM (PROGRAMS -1) was the fastest variant at s 8 and tied at s 16; the
        # flattened loop spills (22 spills) and gains nothing at s 8; 4 stages = 3; 2 stages, BN 128, BKD 128
        # are 15-25% slower. NOTES_stages.md
        cfg = dict(ROWS=128, BN=256, BKD=64, NJ=64, FLAT=False, PROGRAMS=-1, num_warps=8, num_stages=3)
    if overrides:
        cfg.update({key: val for key, val in overrides.items() if key != "GEMM"})
    cfg["BM"] = max(cfg["ROWS"], RB)
    cfg["PP"] = cfg["BM"] // RB
    cfg["BN"] = max(cfg["BN"], KPB)
    cfg["BKD"] = min(cfg["BKD"], max(16, triton.next_power_of_2(SD)))
    return cfg


def _gemm_form(q: torch.Tensor, RB: int, KPB: int, s: int, D: int, interpret: bool, overrides: dict) -> bool:
    """Whether the GEMM form runs (``_OVERRIDES["GEMM"]`` forces it either way where it can run).

    It needs 16-bit inputs, power-of-two ``bq/s <= 128`` and ``bk/s <= 256`` (whole query and KV blocks per
    tile), a reduced row of ``s * D`` elements whose byte pitch is a multiple of 16 (TMA), and a GPU with TMA
    (compute capability 9.0 or newer) or the interpreter.
    """
    able = (q.dtype in (torch.float16, torch.bfloat16) and _is_pow2(RB) and _is_pow2(KPB) and RB <= 128
            and KPB <= 256 and (s * D) % 8 == 0)
    if able and not interpret:
        able = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    want = overrides.get("GEMM", _GEMM_DEFAULT)
    if want and not able and "GEMM" in overrides:
        raise ValueError("the estimator's GEMM form cannot run on these inputs (see _gemm_form)")
    return bool(want) and able


class _GemmQuery(NamedTuple):
    """The query operand of the GEMM form (``_gemm_query``): element ``d`` of sub-row ``t`` of reduced row ``r`` of
    head ``h`` in batch ``b`` is ``view[b*row_b + h*row_h + r, t*col_t + h*col_hd + d]``."""

    view: torch.Tensor
    row_b: int
    row_h: int
    col_t: int
    col_hd: int
    bkd: int  # the descriptor chunk (``BKD``) this layout is read with
    rows: int  # reduced rows per head in ``view``: ``Rq``, or ``Rq - 1`` when the ragged last group is left out


def _gemm_query(q: torch.Tensor, s: int, BKD: int, interpret: bool) -> _GemmQuery:
    """Reduced query rows for the GEMM form, in place where the storage allows it.

    - ``q`` contiguous ``[B, Hq, Lq, D]`` with ``Lq % s == 0``: ``view`` = ``[B*Hq*Rq, s*D]``.
    - ``q`` a ``[B, Hq, Lq, D]`` view of ``[B, Lq, Hq, D]`` storage (transformers' layout after its
      ``transpose(1, 2)``) with ``Lq % s == 0`` or batch 1 (and ``Lq >= s``), and a descriptor chunk that divides
      ``D`` (so it stays in one query row: ``BKD`` halved down to 32, 16 under the interpreter, if needed):
      ``view`` = ``[B*(Lq//s), s*Hq*D]``, head ``h`` at column offset ``h*D``. A ragged last group (batch 1) is not
      in the view (its missing rows lie past the storage): ``rows = Rq - 1``, the kernel leaves that row out and
      ``_add_ragged_row`` adds it. (Reading it from a zero-padded copy of the last row tile inside the kernel was
      measured and dropped: its second code path cost more than the copy, ``NOTES_stages.md`` v7.)
    - Anything else: one zero-padded copy ``[B, Hq, Rq*s, D]`` in the first layout (0.5-0.9 ms at 64k tokens on
      an H200).

    All views need 16-byte alignment (TMA).
    """
    B, Hq, Lq, D = q.shape
    Rq = cdiv(Lq, s)
    SD = s * D
    aligned = q.data_ptr() % 16 == 0
    if aligned and q.is_contiguous() and Lq == Rq * s:
        return _GemmQuery(q.view(B * Hq * Rq, SD), Hq * Rq, Rq, D, 0, BKD, Rq)
    sb, sh, sl, sd = q.stride()
    blhd = sd == 1 and sh == D and sl == Hq * D and (B == 1 or sb == Lq * Hq * D)
    bkd = _gemm_bkd(BKD, D, interpret)
    full = Lq // s  # complete groups per head
    if aligned and blhd and D % bkd == 0 and full > 0 and (Lq == Rq * s or B == 1):
        view = q.as_strided((B * full, s * Hq * D), (s * Hq * D, 1))
        return _GemmQuery(view, full, 0, Hq * D, D, bkd, full)
    buf = torch.empty((B, Hq, Rq * s, D), dtype=q.dtype, device=q.device)
    buf[:, :, :Lq].copy_(q)
    buf[:, :, Lq:].zero_()
    return _GemmQuery(buf.view(B * Hq * Rq, SD), Hq * Rq, Rq, D, 0, BKD, Rq)


def _add_ragged_row(q: torch.Tensor, kr: torch.Tensor, Hkv: int, out: torch.Tensor, s: int, block_k: int,
                    scale: float, full: int) -> None:
    """Add the ragged last reduced row's block sums (left out of the kernel's in-place read) to ``out``.

    Row ``full`` holds queries ``full*s .. Lq-1`` (``T < s`` of them, the rest zero as in the reference); it sees
    every reduced key (its last query is the last one). Its logit against reduced key ``c`` is the dot product of
    its first ``T*D`` elements with those of ``Kr[c]`` (``_gemm_keys``: offset ``u`` of ``Kr[c]`` is key
    ``c*s+s-1-u``), computed in float32 from the 16-bit inputs (products exact), soft-maxed over all reduced keys
    and summed per KV block into the last query block (which the kernel wrote without this row). A few small
    PyTorch launches instead of copying the whole query; transient memory: a float32 copy of ``T/s`` of ``Kr``
    (up to ~235 MB at 128k tokens with 4 KV heads).
    """
    B, Hq, Lq, D = q.shape
    nk = out.shape[3]
    T = Lq - full * s
    G = Hq // Hkv
    Rk = kr.shape[0] // (B * Hkv)
    qt = q[:, :, full * s:, :].reshape(B, Hkv, G, T * D).float()  # [B, Hkv, G, T*D]
    kt = kr.view(B, Hkv, Rk, s * D)[..., : T * D].float()  # [B, Hkv, Rk, T*D]
    logits = torch.matmul(qt, kt.transpose(-1, -2)).reshape(B, Hq, Rk) * (scale / s)
    pr = torch.softmax(logits, dim=-1)
    kpb = block_k // s
    pr = torch.nn.functional.pad(pr, (0, nk * kpb - Rk))
    out[:, :, -1, :] += pr.view(B, Hq, nk, kpb).sum(-1)


def _gemm_keys(k: torch.Tensor, s: int) -> torch.Tensor:
    """``[B*Hkv*Rk, s*D]`` reversed reduced keys, zero-padded: reduced key ``c`` is keys ``c*s+s-1 .. c*s``.

    So ``Qr[r] . Kr[c] = sum_t q[r*s+s-1-t] . k[c*s+t]``: the antidiagonal sum is one dot product. Always a copy
    (``Hkv / Hq`` of the query bytes).
    """
    B, Hkv, Lk, D = k.shape
    Rk = cdiv(Lk, s)
    kp = k if Lk == Rk * s else torch.nn.functional.pad(k, (0, 0, 0, Rk * s - Lk))
    return kp.reshape(B, Hkv, Rk, s, D).flip(3).reshape(B * Hkv * Rk, s * D)


def _gemm_bkd(cfg_bkd: int, D: int, interpret: bool) -> int:
    """The in-place layout's descriptor chunk: the tile option, halved while it does not divide ``D``, but not
    below 32 on a GPU (narrower boxes would cost more than the copy they save; a guess, not measured) or 16."""
    bkd = cfg_bkd
    while D % bkd and bkd > (16 if interpret else 32):
        bkd //= 2
    return bkd if D % bkd == 0 else cfg_bkd


# Triton versions below ``gluon_support.GLUON_MIN_TRITON`` use the Triton GEMM form; a newer version whose Gluon
# API no longer fits falls back at its first compile (``_gluon_failed``).
#: Why the Gluon kernel failed to compile in this process (then the Triton GEMM form runs); ``None`` until then.
_GLUON_FAILURE: Optional[str] = None


def _gluon_engine(q: torch.Tensor, interpret: bool, overrides: dict) -> bool:
    """Whether the GEMM form runs as the Gluon kernel (``hopper.py``) rather than the Triton kernel.

    Yes on CUDA devices of compute capability 9.x (wgmma is Hopper's instruction) with Triton >= 3.6 whose Gluon
    Hopper module imports, unless ``_OVERRIDES["GLUON"]`` is false or the kernel failed to compile earlier in this
    process; never under the interpreter (Gluon has none). ``_OVERRIDES["GLUON"] = True`` where it cannot run
    raises instead of falling back.
    """
    want = overrides.get("GLUON", True)
    able = _gluon_hardware(q, interpret) and _gluon_import_error() is None and _GLUON_FAILURE is None
    if want and not able and overrides.get("GLUON") is True:
        raise ValueError("the estimator's Gluon kernel needs a compute capability 9.x GPU and Triton >= 3.6 with "
                         f"triton.experimental.gluon (import: {_gluon_import_error() or 'ok'}; compile: "
                         f"{_GLUON_FAILURE or 'not failed'})")
    return bool(want) and able


def _gluon_hardware(q: torch.Tensor, interpret: bool) -> bool:
    """A CUDA tensor on a compute capability 9.x device, outside the interpreter (``gluon_support``)."""
    return gluon_support.hopper_device(q, interpret)


@functools.lru_cache(maxsize=None)
def _gluon_import_error() -> Optional[str]:
    """``None`` when the Gluon kernel can be used with this Triton, else the reason (logged once)."""
    reason = gluon_support.import_error(lambda: importlib.import_module(".hopper", __package__))
    if reason is None:
        return None
    logger.info("estimator: Gluon kernel unavailable (%s); the Triton GEMM form runs", reason)
    return reason


def _device_error(exc: BaseException) -> bool:
    """Out of memory or a CUDA error (``gluon_support.device_error``)."""
    return gluon_support.device_error(exc)


def _gluon_failed(exc: Exception) -> None:
    """Record that the Gluon kernel could not be built with this Triton (its Gluon API changed) and log it once."""
    global _GLUON_FAILURE
    _GLUON_FAILURE = f"{type(exc).__name__}: {str(exc)[-500:]}"
    logger.warning("estimator: the Gluon kernel did not compile with Triton %s (%s); the Triton GEMM form runs "
                   "instead for the rest of this process", triton.__version__, _GLUON_FAILURE)


def _launch_gemm(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, s: int, RB: int, KPB: int, scale: float,
                 interpret: bool) -> None:
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nq, nk = out.shape[2], out.shape[3]
    SD = s * D
    Rq, Rk = cdiv(Lq, s), cdiv(Lk, s)
    kr = _gemm_keys(k, s)
    ran = False
    if _gluon_engine(q, interpret, _OVERRIDES):
        from . import hopper

        tiles = dict(hopper.TILES, **_OVERRIDES.get("GLUON_TILES", {}))
        tiles["BKD"] = min(tiles["BKD"], max(16, triton.next_power_of_2(SD)))
        tiles["BM"] = max(tiles["BM"], RB)  # whole query blocks per item and whole KV blocks per key tile
        tiles["BN"] = max(tiles["BN"], KPB)
        qo = _gemm_query(q, s, tiles["BKD"], interpret)
        # scratch rows padded to whole key tiles: the kernel stores a tile's block values without a column mask
        programs, pitch, scratch = _persistent_grid(q.device, -1, tiles["BM"], nk, cdiv(Rq, tiles["BM"]) * B * Hq,
                                                    multiple=max(16, tiles["BN"] // KPB))
        try:
            hopper.launch(qo, kr, out, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv, D=D, s=s, RB=RB, KPB=KPB,
                          qk_scale=scale / s * _LOG2E, programs=programs, pitch=pitch, scratch=scratch,
                          fp16=q.dtype == torch.float16, tiles=tiles)
            ran = True
        except gluon_support.GLUON_API_ERRORS as exc:
            # what another Triton's Gluon API raises before anything runs; errors of the device itself (out of
            # memory, a CUDA error surfacing at the launch) are not an API mismatch and propagate
            if _OVERRIDES.get("GLUON") is True or _device_error(exc):
                raise
            _gluon_failed(exc)  # nothing was launched: ``out`` is untouched, the Triton GEMM form writes it
    if not ran:
        from triton.tools.tensor_descriptor import TensorDescriptor

        cfg = _gemm_tiles(RB, KPB, SD, interpret, _OVERRIDES)
        BM, BN = cfg["BM"], cfg["BN"]
        qo = _gemm_query(q, s, cfg["BKD"], interpret)
        BKD = qo.bkd
        q_desc = TensorDescriptor(qo.view, list(qo.view.shape), list(qo.view.stride()), [BM, BKD])
        k_desc = TensorDescriptor(kr, list(kr.shape), list(kr.stride()), [BN, BKD])
        n_rt = cdiv(Rq, BM)
        n_items = n_rt * B * Hq
        programs, pitch, scratch = _persistent_grid(q.device, cfg["PROGRAMS"], BM, nk, n_items)
        upcast = interpret and q.dtype == torch.bfloat16
        _estimate_gemm_kernel[(programs,)](
            q_desc,
            k_desc,
            out,
            scratch,
            *out.stride()[:3],
            Lq,
            Lk,
            nq,
            nk,
            Rq,
            qo.rows,
            Rk,
            n_rt,
            n_items,
            qo.row_b,
            qo.row_h,
            qo.col_t,
            qo.col_hd,
            Hq,
            Hq // Hkv,
            B * Hq,
            scale / s * _LOG2E,
            pitch,
            S=s,
            SD=SD,
            DH=D,
            RB=RB,
            PP=cfg["PP"],
            BM=BM,
            BN=BN,
            KPB=KPB,
            BKD=BKD,
            NJ=cfg["NJ"],
            UPCAST=upcast,
            DOT_PREC="ieee" if upcast else "tf32",
            FLAT=cfg["FLAT"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    if qo.rows < Rq:
        _add_ragged_row(q, kr, Hkv, out, s, KPB * s, scale, qo.rows)


def _persistent_grid(device: torch.device, requested: int, BM: int, nk: int, n_items: int,
                     multiple: int = 16) -> Tuple[int, int, torch.Tensor]:
    """``(programs, pitch, scratch)`` of a persistent launch of either form.

    ``requested`` (the ``PROGRAMS`` tile option): ``> 0`` that many programs; ``-1`` one per SM; ``0`` up to two
    per SM, as many as ``_SCRATCH_BYTES`` of scratch allow but at least one per SM. Never more programs than
    work items. Each program owns ``BM`` float32 scratch rows of ``pitch`` = ``nk`` rounded up to ``multiple`` (16 or
    more, a power of two) elements, so the rows' alignment does not depend on the length.
    """
    pitch = cdiv(nk, multiple) * multiple
    if requested > 0:
        programs = requested
    else:
        n_sm = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        programs = n_sm if requested < 0 else min(2 * n_sm, max(n_sm, _SCRATCH_BYTES // (BM * pitch * 4)))
    programs = max(1, min(programs, n_items))
    return programs, pitch, torch.empty(programs * BM * pitch, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
        k: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` reads KV head ``h // G``) and
            ``Lk >= Lq`` (query ``i`` sits at key position ``Lk - Lq + i``).
        block_q: ``bq``, a multiple of ``stride``.
        block_k: ``bk``, a multiple of ``stride``.
        stride: ``s``.
        scale: Attention scale, ``1/sqrt(D)`` if ``None``; the estimator uses ``scale / s``.
        chunk_rows: Accepted for parity with the reference; memory is bounded by the module's scratch limit
            (``_SCRATCH_BYTES``) instead. Results do not depend on it.

    Returns:
        float32 ``[B, Hq, nq, nk]`` with ``nq = ceil(Lq/bq)``, ``nk = ceil(Lk/bk)``; each reduced row's
        probabilities sum to 1, so row ``i`` sums to the number of reduced rows in query block ``i``.

    Raises:
        ValueError: not 4-d tensors, mismatched dtype/device/batch/head_dim, ``Hq`` not a multiple of ``Hkv``,
            ``Lq > Lk``, or a stride that does not divide both block sizes.
        TypeError: a dtype other than float16, bfloat16, float32.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; block_importance supports float16, bfloat16, float32")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"q and k must share dtype and device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Dk != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} (batch, head_dim, GQA groups)")
    if Lq > Lk:
        raise ValueError(f"Lq={Lq} > Lk={Lk}: the queries must be the last Lq of the keys' positions (prefill "
                         "appends the new tokens to the cache before attention); pass the keys of every query")
    s = int(stride)
    if s <= 0 or block_q % s or block_k % s:
        raise ValueError(f"stride={stride} must be positive and divide block_q={block_q} and block_k={block_k}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    G = Hq // Hkv
    nq, nk = cdiv(Lq, block_q), cdiv(Lk, block_k)
    out = _alloc((B, Hq, nq, nk), torch.float32, q.device)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()

    interpret = _interpreting()
    RB, KPB = block_q // s, block_k // s
    if _gemm_form(q, RB, KPB, s, D, interpret, _OVERRIDES):
        _launch_gemm(q, k, out, s, RB, KPB, float(scale), interpret)
        return out
    cfg = _tiles(RB, KPB, D, interpret, _OVERRIDES)
    PP, BM = cfg["PP"], cfg["BM"]
    n_pairs = nq * G
    n_pg = cdiv(n_pairs, PP)
    n_items = n_pg * B * Hkv
    programs, pitch, scratch = _persistent_grid(q.device, cfg["PROGRAMS"], BM, nk, n_items)
    upcast = interpret and q.dtype == torch.bfloat16
    dot_prec = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    _estimate_kernel[(programs,)](
        q,
        k,
        out,
        scratch,
        *q.stride()[:3],
        *k.stride()[:3],
        *out.stride()[:3],
        Lq,
        Lk,
        D,
        nk,
        cdiv(Lq, s),
        n_pairs,
        n_pg,
        n_items,
        Hkv,
        G,
        B * Hkv,
        float(scale) / s * _LOG2E,
        pitch,
        S=s,
        RB=RB,
        PP=PP,
        BM=BM,
        BN=cfg["BN"],
        KPB=KPB,
        KPB_P2=cfg["KPB_P2"],
        BKD=cfg["BKD"],
        ND=cfg["BD"] // cfg["BKD"],
        NJ=cfg["NJ"],
        EVEN_D=D == cfg["BD"],
        UPCAST=upcast,
        DOT_PREC=dot_prec,
        FLAT=cfg["FLAT"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
