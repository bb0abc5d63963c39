"""The pooled stream of the attend stage (PSA_SPEC step 7, factors 2 / 4 / 8) as a Gluon kernel for Hopper.

Same contract as the Triton kernel's pooled stream (``kernel._psa_fwd_kernel`` part 2, run by
``fa4.triton_pooled_launch`` on a list of pooled factors alone): every query tile of ``BM`` rows streams the
pyramid rows of its listed pooled blocks (factor 2 rows, then 4, then 8), ``BN`` rows per tile, each column
with ``+ log2 p`` in the exp2 domain (``+ ln p`` on the natural-log logit), and writes its output and its
natural-log log-sum-exp for the level merge (``fa4.merge_levels``). Pooled blocks are complete and entirely in
the past of their query block (``build_block_lists`` lists only poolable blocks), so no causal mask applies.

What differs from the Triton kernel (the previous form of this kernel ran 10-12% faster than it on an H200 at 64k
and 128k tokens, ``NOTES_fa4.md`` v6; this one another 15-17%, v10):
- warp specialisation: one loader warp (``_ws_producer``) reads each tile's list entries and issues its copies;
  two MMA warpgroups (``_wg_consumer``, 64 query rows each, 4 warps) only wait, multiply and run the softmax. K and
  V have mbarrier rings of their own (``NSK`` / ``NSV`` slots), a slot released once both warpgroups' MMAs that
  read it are done;
- FlashAttention-3's ping-pong (Shah et al. 2024, section 3.1): the warpgroups' MMA turns alternate through two
  mbarriers (``_turn``), a turn issuing the logits of tile ``t`` together with ``P V`` of tile ``t - 1``, so one
  warpgroup's softmax runs while the other's MMAs occupy the tensor cores. (Within a warpgroup ptxas, CUDA 12.8
  and 13.0 alike, runs the softmax and the MMAs back to back whatever the program order: ``NOTES_fa4.md`` v6, v9.)
  A tile inside one factor's rows (most tiles) takes a shorter softmax (``_softmax_uniform``);
- the gather: each tile's ``BN`` pyramid rows are ``BN / CH`` runs of ``CH = bk / max(p)`` consecutive rows
  (a run never crosses a list entry), each one TMA copy into its row slice of the shared-memory tile; runs past
  the stream's end are copied from past the end of the tensor, which TMA fills with zeros (a NaN anywhere in an
  unlisted row stays hidden, as in the Triton kernel's masked loads);
- ``P`` stays in registers as the A operand of the ``P V`` wgmma;
- all partitions loop over work items (query tiles, ``_query_tile``: heaviest first), with ring slots, phases and
  turns carried across items, so the grid is either one program per query tile (``TILES["PROGRAMS_PER_SM"] = 0``,
  the default) or persistent (``n`` programs per multiprocessor: the loader runs into the next query tile while the
  MMA warps finish the previous one; measured within a few percent either way, not the default, ``NOTES_fa4.md`` v9,
  v10).
Nsight Compute puts the tensor pipe at 52% (43% before the ping-pong) and ~16-19% of the launch at 64k in
per-program costs (v9, v10).

Limits (``pooled_unsupported`` says which, the caller then runs the Triton kernel): compute capability 9.x,
Triton >= 3.6 with Gluon, float16 / bfloat16 (the pyramid in ``q``'s dtype), head_dim 64 or 128, ``bq`` a multiple
of 128 (``TILES["BM"]`` 128: two warpgroups of 64 rows), ``bk`` a power of two with ``bk / max(p)`` >= 8 and
``bk / 2`` <= 128, the pyramid ``[B, Hkv, R, D]`` contiguous, ``out`` and ``lse`` with a contiguous last
dimension, a positive ``scale`` (``launch`` raises otherwise). A factor-1 entry in the list, or a factor missing
from the pyramid, fills the query block's rows with NaN (the caller passes pooled factors only; nothing
is checked on the host, which would synchronise); tiles whose shared memory exceeds 227 KB (``shared_bytes``). Not
runnable under ``TRITON_INTERPRET=1``: the CPU tests compile it for sm_90a (``tests/kernels/test_gluon_compile.py``:
Hopper instructions, shared memory against ``shared_bytes``), the GPU tier checks it against the reference. Nothing
here is imported by ``import psa_vlm``.
"""

from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..geometry import cdiv, level_offsets

# the CTA-wide barrier: ``thread_barrier`` in Triton 3.6, ``barrier`` from 3.7 on
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

_LOG2E = 1.4426950408889634


@gluon.jit
def _tile_rows(idx_base, stride_ie, t, c1, c2, c4, r2, e4, n_rows, kv_row0, oob_row, off2, off4, off8,
               BN: gl.constexpr, CH: gl.constexpr, RP2: gl.constexpr, RP4: gl.constexpr, RP8: gl.constexpr,
               NCH: gl.constexpr, layout: gl.constexpr):
    """``[NCH]`` first tensor row (of the 2-D ``[B * Hkv * R, D]`` pyramid) of each ``CH``-row run of stream
    tile ``t``; ``oob_row`` (past the tensor: TMA fills zeros) for runs past the stream's end."""
    vr = t * BN + gl.arange(0, NCH, layout=layout) * CH  # stream row of each run
    ok = vr < n_rows
    in2 = vr < r2
    in4 = vr < e4
    pos = gl.where(in2, c1 + vr // RP2, gl.where(in4, c1 + c2 + (vr - r2) // RP4, c1 + c2 + c4 + (vr - e4) // RP8))
    blk = gl.load(idx_base + pos.to(gl.int64) * stride_ie, mask=ok, other=0)
    prow = gl.where(in2, off2 + blk * RP2 + vr % RP2,
                    gl.where(in4, off4 + blk * RP4 + (vr - r2) % RP4, off8 + blk * RP8 + (vr - e4) % RP8))
    return gl.where(ok, kv_row0 + prow, oob_row)


@gluon.jit
def _issue(desc, tile, bar, rows, pred, CH: gl.constexpr, NCH: gl.constexpr, layout: gl.constexpr):
    """TMA copies of one tile's ``NCH`` runs into their row slices of ``tile``, completing on ``bar``."""
    mbarrier.expect(bar, NCH * desc.block_type.nbytes, pred=pred)
    ci = gl.arange(0, NCH, layout=layout)
    for c in gl.static_range(NCH):
        r = gl.sum(gl.where(ci == c, rows, 0), axis=0)  # every thread holds the whole vector: no exchange
        tma.async_copy_global_to_shared(desc, [r, 0], bar, tile.slice(c * CH, CH, dim=0), pred=pred)


@gluon.jit
def _softmax(s, t, m_i, l_i, qk_scale, r2, e4, n_rows, BN: gl.constexpr, cols_l: gl.constexpr):
    """Online-softmax statistics of logit tile ``t`` (exp2 domain, ``+ log2 p`` per column, ``-inf`` past the
    stream's end): ``(p, alpha, m_new, l_new)``."""
    vr = t * BN + gl.arange(0, BN, layout=cols_l)
    bias = gl.where(vr < r2, 1.0, gl.where(vr < e4, 2.0, 3.0))
    bias = gl.where(vr < n_rows, bias, float("-inf"))
    x = s * qk_scale + gl.expand_dims(bias, 0)
    m_new = gl.maximum(m_i, gl.max(x, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(x - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _softmax_uniform(s, m_i, l_i, qk_scale, bias):
    """``_softmax`` of a tile whose columns all lie before the stream's end and in one factor's rows (a scalar
    ``bias``, ``log2 p``): the running maximum from the raw logits' row maximum (``qk_scale > 0``, so it commutes
    with the scale) and one fused multiply-add per element before the exp2, instead of the column-wise bias and mask
    (``NOTES_fa4.md`` v10)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale + bias)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale + gl.expand_dims(bias - m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _softmax_tile(s, t, m_i, l_i, qk_scale, r2, e4, n_rows, BN: gl.constexpr, cols_l: gl.constexpr,
                  UNIFORM: gl.constexpr):
    """``_softmax`` of tile ``t``, through ``_softmax_uniform`` when the tile is uniform (``UNIFORM``: most tiles;
    only a tile that crosses a factor boundary or the stream's end is not)."""
    if UNIFORM:
        lo = t * BN
        hi = lo + BN
        one = (hi <= n_rows) & ((hi <= r2) | ((lo >= r2) & (hi <= e4)) | (lo >= e4))
        if one:
            bias = gl.where(hi <= r2, 1.0, gl.where(hi <= e4, 2.0, 3.0))
            p, alpha, m_new, l_new = _softmax_uniform(s, m_i, l_i, qk_scale, bias)
        else:
            p, alpha, m_new, l_new = _softmax(s, t, m_i, l_i, qk_scale, r2, e4, n_rows, BN, cols_l)
    else:
        p, alpha, m_new, l_new = _softmax(s, t, m_i, l_i, qk_scale, r2, e4, n_rows, BN, cols_l)
    return p, alpha, m_new, l_new


@gluon.jit
def _ws_producer(k_desc, v_desc, k_smem, v_smem, full_k, full_v, empty_k, empty_v, idx_base, stride_ie, c1, c2, c4,
                 r2, e4, n_rows, kv_row0, oob_row, off2, off4, off8, n_tiles, g0, BN: gl.constexpr,
                 CH: gl.constexpr, RP2: gl.constexpr, RP4: gl.constexpr, RP8: gl.constexpr, NCH: gl.constexpr,
                 NSK: gl.constexpr, NSV: gl.constexpr):
    """Loader warp: the list entries and the K / V runs of every tile of one query tile into the rings (``NSK`` /
    ``NSV`` slots); ``g0``: the tiles this program streamed before (ring slots and phases continue from it)."""
    rep_l: gl.constexpr = gl.BlockedLayout([NCH], [32], [1], [0])
    for t in range(0, n_tiles):
        rows = _tile_rows(idx_base, stride_ie, t, c1, c2, c4, r2, e4, n_rows, kv_row0, oob_row, off2, off4, off8,
                          BN, CH, RP2, RP4, RP8, NCH, rep_l)
        g = g0 + t
        sk = g % NSK
        mbarrier.wait(empty_k.index(sk), ((g // NSK) & 1) ^ 1)  # the first round passes: the slots start empty
        _issue(k_desc, k_smem.index(sk), full_k.index(sk), rows, True, CH, NCH, rep_l)
        sv = g % NSV
        mbarrier.wait(empty_v.index(sv), ((g // NSV) & 1) ^ 1)
        _issue(v_desc, v_smem.index(sv), full_v.index(sv), rows, True, CH, NCH, rep_l)


@gluon.jit
def _epilogue(acc, m_i, l_i, n_bad, o_base, stride_om, l_base, row0, Lq, ROWS: gl.constexpr, D: gl.constexpr,
              HAS_LSE: gl.constexpr, num_warps: gl.constexpr):
    """Rows ``row0 ..`` of the output and their log-sum-exp. Rows that saw no key give zeros, a NaN/inf the row
    attended to stays visible, rows of a list this kernel cannot run (factor-1 entries, a factor missing from the
    pyramid) give NaN."""
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, D, 16])
    io_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [num_warps, 1], [1, 0])
    offs_m = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_l))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, io_l))
    row_ok = offs_m < Lq
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, mma_o))
    l_safe = gl.where(l_o == 0.0, 1.0, l_o)
    o = acc / gl.expand_dims(l_safe, 1)
    o = gl.where(gl.expand_dims(l_o == 0.0, 1), 0.0, o)
    o = gl.where(n_bad > 0, float("nan"), o)
    o = gl.convert_layout(o.to(o_base.dtype.element_ty), io_l)
    gl.store(o_base + gl.expand_dims(offs_m.to(gl.int64) * stride_om, 1) + gl.expand_dims(offs_d, 0), o,
             mask=gl.expand_dims(row_ok, 1))
    if HAS_LSE:  # natural-log log-sum-exp (pooled logits with their + ln p); -inf for a row that saw no key
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_i)) * 0.6931471805599453)
        lse = gl.convert_layout(lse, gl.SliceLayout(1, io_l))
        gl.store(l_base + offs_m, lse, mask=row_ok)


@gluon.jit
def _query_tile(item, idx_ptr, cnt_ptr, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq, stride_cc,
                BH, Hq, G, Hkv, R, n_tiles_q, BM: gl.constexpr, BN: gl.constexpr, BLOCK_Q: gl.constexpr,
                RP2: gl.constexpr, RP4: gl.constexpr, RP8: gl.constexpr, HAS_P2: gl.constexpr, HAS_P4: gl.constexpr,
                HAS_P8: gl.constexpr):
    """Work item ``item`` of ``BH * n_tiles_q`` (heaviest query tiles first, the Triton kernel's order): ``(b64, h64,
    tile_m, idx_base, c1, c2, c4, n_bad, r2, e4, n_rows, kv_row0, n_tiles)``, the stream's rows per factor and its
    ``BN``-row tiles included (the loader and both warpgroups derive them here, so they agree); a factor missing from
    the pyramid counts its entries in ``n_bad`` (the rows become NaN) and streams nothing."""
    tile_m = n_tiles_q - 1 - item // BH
    pid_bh = item % BH
    i = tile_m // (BLOCK_Q // BM)
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    idx_base = idx_ptr + b64 * stride_ib + h64 * stride_ih + i.to(gl.int64) * stride_iq
    cnt_base = cnt_ptr + b64 * stride_cb + h64 * stride_ch + i.to(gl.int64) * stride_cq
    c1 = gl.load(cnt_base)
    c2 = gl.load(cnt_base + stride_cc)
    c4 = gl.load(cnt_base + 2 * stride_cc)
    c8 = gl.load(cnt_base + 3 * stride_cc)
    n_bad = c1  # this kernel streams pooled entries only
    r2 = c2 * RP2
    r4 = c4 * RP4
    r8 = c8 * RP8
    if not HAS_P2:
        n_bad += c2
        r2 = r2 * 0
    if not HAS_P4:
        n_bad += c4
        r4 = r4 * 0
    if not HAS_P8:
        n_bad += c8
        r8 = r8 * 0
    e4 = r2 + r4
    n_rows = e4 + r8
    kv_row0 = (b * Hkv + h // G) * R
    return b64, h64, tile_m, idx_base, c1, c2, c4, n_bad, r2, e4, n_rows, kv_row0, gl.cdiv(n_rows, BN)


@gluon.jit
def _pp_producer(k_desc, v_desc, k_smem, v_smem, full_k, full_v, empty_k, empty_v, idx_ptr, cnt_ptr, stride_ib,
                 stride_ih, stride_iq, stride_ie, stride_cb, stride_ch, stride_cq, stride_cc, BH, Hq, G, Hkv, R,
                 n_tiles_q, n_items, oob_row, off2, off4, off8, BM: gl.constexpr, BN: gl.constexpr,
                 BLOCK_Q: gl.constexpr, CH: gl.constexpr, RP2: gl.constexpr, RP4: gl.constexpr, RP8: gl.constexpr,
                 NCH: gl.constexpr, NSK: gl.constexpr, NSV: gl.constexpr, HAS_P2: gl.constexpr, HAS_P4: gl.constexpr,
                 HAS_P8: gl.constexpr):
    """Loader warp over this program's query tiles (items ``program_id, + num_programs, ...``): each tile's K / V
    runs into the rings, continuing into the next query tile while the MMA warps finish the previous one."""
    g0 = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        _, _, _, idx_base, c1, c2, c4, _, r2, e4, n_rows, kv_row0, n_tiles = _query_tile(
            item, idx_ptr, cnt_ptr, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq, stride_cc, BH,
            Hq, G, Hkv, R, n_tiles_q, BM, BN, BLOCK_Q, RP2, RP4, RP8, HAS_P2, HAS_P4, HAS_P8)
        _ws_producer(k_desc, v_desc, k_smem, v_smem, full_k, full_v, empty_k, empty_v, idx_base, stride_ie, c1, c2,
                     c4, r2, e4, n_rows, kv_row0, oob_row, off2, off4, off8, n_tiles, g0, BN, CH, RP2, RP4, RP8, NCH,
                     NSK, NSV)
        g0 += n_tiles


@gluon.jit
def _turn(sched, WG: gl.constexpr, h, wait: gl.constexpr):
    """FlashAttention-3's warpgroup ping-pong (Shah et al. 2024, section 3.1): warpgroup ``WG``'s MMA turn ``h``
    waits (``wait``) until the other warpgroup has issued its turn ``h - 1`` (``WG`` 1: its turn ``h``), or, after
    issuing, passes the turn on. Only the order of issue depends on it, never a result."""
    if wait:
        if WG == 0:
            mbarrier.wait(sched.index(0), (h & 1) ^ 1)  # turn 0 of warpgroup 0 passes: the barrier starts fresh
        else:
            mbarrier.wait(sched.index(1), h & 1)
    else:
        mbarrier.arrive(sched.index(1 - WG))


@gluon.jit
def _wg_stream(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, sched, n_tiles, g0, h, qk_scale, r2, e4,
               n_rows, WG: gl.constexpr, ROWS: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NSK: gl.constexpr,
               NSV: gl.constexpr, UNIFORM: gl.constexpr, num_warps: gl.constexpr):
    """One warpgroup's ``ROWS`` query rows on one query tile's stream, its MMAs issued in turns alternating with
    the other warpgroup's (``_turn``): turn ``t`` issues the logits of tile ``t`` and ``P V`` of tile ``t - 1``
    together, then the softmax of tile ``t`` runs while the other warpgroup's turn keeps the tensor cores busy.
    ``n_tiles + 1`` turns (none for an empty stream); slots are released by each warpgroup's own arrival (the empty
    barriers count two). Returns ``(acc, m_i, l_i, h)`` (exp2-domain statistics, the turn counter after)."""
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BN, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, D, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    rows_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    cols_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([ROWS], gl.float32, rows_s)
    acc = gl.zeros([ROWS, D], gl.float32, mma_o)
    zero_s = gl.zeros([ROWS, BN], gl.float32, mma_s)
    if n_tiles > 0:
        sk0 = g0 % NSK
        mbarrier.wait(full_k.index(sk0), (g0 // NSK) & 1)
        _turn(sched, WG, h, True)
        s = warpgroup_mma(q_smem, k_smem.index(sk0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _turn(sched, WG, h, False)
        h += 1
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        _cta_barrier()  # the warpgroup's four warps are done with the slot
        mbarrier.arrive(empty_k.index(sk0))
        for t in range(0, n_tiles - 1):
            p, alpha, m_i, l_i = _softmax_tile(s, t, m_i, l_i, qk_scale, r2, e4, n_rows, BN, cols_s, UNIFORM)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
            pa = gl.convert_layout(p.to(q_smem.dtype), p_l)
            g = g0 + t
            sv = g % NSV
            sk1 = (g + 1) % NSK
            mbarrier.wait(full_k.index(sk1), ((g + 1) // NSK) & 1)
            mbarrier.wait(full_v.index(sv), (g // NSV) & 1)
            _turn(sched, WG, h, True)
            s = warpgroup_mma(q_smem, k_smem.index(sk1).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(pa, v_smem.index(sv), acc, is_async=True)
            _turn(sched, WG, h, False)
            h += 1
            s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
            _cta_barrier()
            mbarrier.arrive(empty_k.index(sk1))
            mbarrier.arrive(empty_v.index(sv))
        t = n_tiles - 1
        p, alpha, m_i, l_i = _softmax_tile(s, t, m_i, l_i, qk_scale, r2, e4, n_rows, BN, cols_s, UNIFORM)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        pa = gl.convert_layout(p.to(q_smem.dtype), p_l)
        g = g0 + t
        mbarrier.wait(full_v.index(g % NSV), (g // NSV) & 1)
        _turn(sched, WG, h, True)
        acc = warpgroup_mma(pa, v_smem.index(g % NSV), acc, is_async=True)
        _turn(sched, WG, h, False)
        h += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        _cta_barrier()
        mbarrier.arrive(empty_v.index(g % NSV))
    return acc, m_i, l_i, h


@gluon.jit
def _wg_consumer(q_ptr, q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, sched, idx_ptr, cnt_ptr, out_ptr,
                 lse_ptr, stride_qb, stride_qh, stride_qm, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                 stride_cq, stride_cc, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, BH, Hq, G, Hkv, R, Lq,
                 n_tiles_q, n_items, qk_scale, WG: gl.constexpr, D: gl.constexpr, BM: gl.constexpr,
                 BN: gl.constexpr, BLOCK_Q: gl.constexpr, RP2: gl.constexpr, RP4: gl.constexpr, RP8: gl.constexpr,
                 HAS_P2: gl.constexpr, HAS_P4: gl.constexpr, HAS_P8: gl.constexpr, HAS_LSE: gl.constexpr,
                 NSK: gl.constexpr, NSV: gl.constexpr, UNIFORM: gl.constexpr):
    """Warpgroup ``WG`` (4 warps, query rows ``WG * BM / 2 ..`` of each query tile) over this program's query tiles:
    its half of the query tile into its half of ``q_smem``, ``_wg_stream``, its half of the epilogue."""
    ROWS: gl.constexpr = BM // 2
    io_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, io_l))
    q_half = q_smem.slice(WG * ROWS, ROWS, dim=0)
    g0 = 0
    h = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        b64, h64, tile_m, _, _, _, _, n_bad, r2, e4, n_rows, _, n_tiles = _query_tile(
            item, idx_ptr, cnt_ptr, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq, stride_cc, BH,
            Hq, G, Hkv, R, n_tiles_q, BM, BN, BLOCK_Q, RP2, RP4, RP8, HAS_P2, HAS_P4, HAS_P8)
        row0 = tile_m * BM + WG * ROWS
        offs_m = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_l))
        q = gl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + gl.expand_dims(offs_m.to(gl.int64) * stride_qm, 1)
                    + gl.expand_dims(offs_d, 0), mask=gl.expand_dims(offs_m < Lq, 1), other=0.0)
        _cta_barrier()  # the warpgroup is done with the previous query tile's logits
        q_half.store(q)
        fence_async_shared()
        _cta_barrier()
        acc, m_i, l_i, h = _wg_stream(q_half, k_smem, v_smem, full_k, full_v, empty_k, empty_v, sched, n_tiles, g0,
                                      h, qk_scale, r2, e4, n_rows, WG, ROWS, BN, D, NSK, NSV, UNIFORM, 4)
        _epilogue(acc, m_i, l_i, n_bad, out_ptr + b64 * stride_ob + h64 * stride_oh, stride_om,
                  lse_ptr + b64 * stride_lb + h64 * stride_lh, row0, Lq, ROWS, D, HAS_LSE, 4)
        g0 += n_tiles


#: Length-derived integer arguments: not specialised, so a new prompt length does not compile again.
_LENGTH_ARGS = ("stride_ib", "stride_ih", "stride_iq", "stride_cb", "stride_ch", "stride_cq", "stride_lb",
                "stride_lh", "R", "Lq", "n_tiles_q", "n_items", "oob_row", "off2", "off4", "off8")


@gluon.jit(do_not_specialize=_LENGTH_ARGS)
def _pooled_gluon_kernel(
    q_ptr, k_desc, v_desc, idx_ptr, cnt_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_ib, stride_ih, stride_iq, stride_ie,
    stride_cb, stride_ch, stride_cq, stride_cc, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    BH, Hq, G, Hkv, R, Lq, n_tiles_q, n_items, oob_row, qk_scale, off2, off4, off8,
    D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_KV: gl.constexpr,
    CH: gl.constexpr, HAS_P2: gl.constexpr, HAS_P4: gl.constexpr, HAS_P8: gl.constexpr, HAS_LSE: gl.constexpr,
    NSK: gl.constexpr, NSV: gl.constexpr, PRODUCER_REGS: gl.constexpr, Q_LAYOUT: gl.constexpr,
    KV_LAYOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr, UNIFORM: gl.constexpr,
):
    """Programs over the ``n_items = BH x n_tiles_q`` query tiles (``_query_tile``: heaviest first), program ``p``
    taking items ``p, p + num_programs, ...``: one program per item, or a persistent grid whose loader warp runs into
    the next query tile's K / V while the MMA warps finish the previous one. Two ``_wg_consumer`` warpgroups (the
    program's 4 warps and 4 more, ``CONSUMER_REGS`` registers) whose MMA turns alternate through ``sched``, and
    ``_pp_producer`` (one extra warp), on mbarrier rings whose slots and phases continue across query tiles."""
    NCH: gl.constexpr = BN // CH
    RP2: gl.constexpr = BLOCK_KV // 2
    RP4: gl.constexpr = BLOCK_KV // 4
    RP8: gl.constexpr = BLOCK_KV // 8

    q_smem = gl.allocate_shared_memory(k_desc.dtype, [BM, D], Q_LAYOUT)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NSK, BN, D], KV_LAYOUT)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NSV, BN, D], KV_LAYOUT)
    full_k = gl.allocate_shared_memory(gl.int64, [NSK, 1], mbarrier.MBarrierLayout())
    full_v = gl.allocate_shared_memory(gl.int64, [NSV, 1], mbarrier.MBarrierLayout())
    empty_k = gl.allocate_shared_memory(gl.int64, [NSK, 1], mbarrier.MBarrierLayout())
    empty_v = gl.allocate_shared_memory(gl.int64, [NSV, 1], mbarrier.MBarrierLayout())
    sched = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for si in gl.static_range(NSK):  # a slot is free once both warpgroups have arrived
        mbarrier.init(full_k.index(si), count=1)
        mbarrier.init(empty_k.index(si), count=2)
    for si in gl.static_range(NSV):
        mbarrier.init(full_v.index(si), count=1)
        mbarrier.init(empty_v.index(si), count=2)
    for si in gl.static_range(2):
        mbarrier.init(sched.index(si), count=1)
    fence_async_shared()
    _cta_barrier()

    # the kernel's 4 warps are warpgroup 0 (the default partition), a 4-warp worker warpgroup 1, the loader warp
    gl.warp_specialize(
        [(_wg_consumer, (q_ptr, q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, sched, idx_ptr, cnt_ptr,
                         out_ptr, lse_ptr, stride_qb, stride_qh, stride_qm, stride_ib, stride_ih, stride_iq,
                         stride_cb, stride_ch, stride_cq, stride_cc, stride_ob, stride_oh, stride_om, stride_lb,
                         stride_lh, BH, Hq, G, Hkv, R, Lq, n_tiles_q, n_items, qk_scale, 0, D, BM, BN, BLOCK_Q,
                         RP2, RP4, RP8, HAS_P2, HAS_P4, HAS_P8, HAS_LSE, NSK, NSV, UNIFORM)),
         (_wg_consumer, (q_ptr, q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, sched, idx_ptr, cnt_ptr,
                         out_ptr, lse_ptr, stride_qb, stride_qh, stride_qm, stride_ib, stride_ih, stride_iq,
                         stride_cb, stride_ch, stride_cq, stride_cc, stride_ob, stride_oh, stride_om, stride_lb,
                         stride_lh, BH, Hq, G, Hkv, R, Lq, n_tiles_q, n_items, qk_scale, 1, D, BM, BN, BLOCK_Q,
                         RP2, RP4, RP8, HAS_P2, HAS_P4, HAS_P8, HAS_LSE, NSK, NSV, UNIFORM)),
         (_pp_producer, (k_desc, v_desc, k_smem, v_smem, full_k, full_v, empty_k, empty_v, idx_ptr, cnt_ptr,
                         stride_ib, stride_ih, stride_iq, stride_ie, stride_cb, stride_ch, stride_cq, stride_cc,
                         BH, Hq, G, Hkv, R, n_tiles_q, n_items, oob_row, off2, off4, off8, BM, BN, BLOCK_Q, CH,
                         RP2, RP4, RP8, NCH, NSK, NSV, HAS_P2, HAS_P4, HAS_P8))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    # every arrive and wait is done once the partitions have joined; PTX asks for mbarrier.inval before the
    # barriers' shared memory may be reused
    for si in gl.static_range(NSK):
        mbarrier.invalidate(full_k.index(si))
        mbarrier.invalidate(empty_k.index(si))
    for si in gl.static_range(NSV):
        mbarrier.invalidate(full_v.index(si))
        mbarrier.invalidate(empty_v.index(si))
    for si in gl.static_range(2):
        mbarrier.invalidate(sched.index(si))


#: Tiles (H200, ``NOTES_fa4.md`` v6 and v10): 128 query rows x 128 pyramid rows, two MMA warpgroups of 64 rows in
#: ping-pong (``CONSUMER_REGS`` for the worker warpgroup; the other gets what is left: 200-208, no spills at D 128)
#: plus the loader warp (88 registers: fewer spill its entry vectors), K and V double-buffered (3 slots: no gain in
#: v6c). ``UNIFORM``: the short softmax on tiles inside one factor's rows (v10; False: the column-wise form on every
#: tile). ``PROGRAMS_PER_SM``: 0 launches one program per query tile; ``n`` a persistent grid of ``n`` programs per
#: multiprocessor (one fits: ~176 KB of shared memory), each looping over query tiles (``NOTES_fa4.md`` v9);
#: ``PROGRAMS`` (tests), when set, the number of programs itself.
TILES = dict(BM=128, BN=128, NSK=2, NSV=2, PRODUCER_REGS=88, CONSUMER_REGS=208, UNIFORM=True, PROGRAMS_PER_SM=0)


#: Shared memory one CTA may use on Hopper (227 KB, the opt-in maximum of compute capability 9.0).
SHARED_LIMIT = 227 * 1024


def shared_bytes(tiles: dict, D: int) -> int:
    """Shared memory the kernel allocates with ``tiles`` at head_dim ``D`` (bytes, 16-bit elements): the query tile,
    the K and V rings, the epilogue's layout conversion of the output (inside the MMA partitions, so it cannot reuse
    the rings: 8 KB per warpgroup, converted in rounds) and 8 bytes per mbarrier; the compile adds a few bytes of
    alignment (180,312 bytes at the shipped tiles and D 128 against 180,304 here; Triton reports the exact figure)."""
    BM, BN = tiles["BM"], tiles["BN"]
    slots = tiles["NSK"] + tiles["NSV"]
    return 2 * (BM * D + slots * BN * D) + 2 * 8192 + 8 * (2 * slots + 2)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _nvmma_layout(block: tuple, fp16: bool):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float16 if fp16 else gl.bfloat16)


def pooled_unsupported(q: torch.Tensor, k_pooled: torch.Tensor, v_pooled: torch.Tensor, *, block_q: int, block_k: int,
                       factors, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                       tiles: dict = TILES) -> str | None:
    """Why this kernel cannot run a call, or ``None`` if it can (the device and the Triton version are the caller's:
    ``fa4.pooled_engine``).

    Args:
        q: ``[B, Hq, Lq, D]``; k_pooled, v_pooled: ``[B, Hkv, R, D]``; out: ``[B, Hq, Lq, D]`` and lse: float32
            ``[B, Hq, Lq]`` outputs (``None``: not checked); block_q, block_k: ``bq``, ``bk``; factors: the
            pyramid's factors; tiles: the kernel's tiles (``TILES`` with overrides).
    """
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (float16 / bfloat16 only)"
    if k_pooled.dtype != q.dtype or v_pooled.dtype != q.dtype:
        return f"a pyramid in {k_pooled.dtype} / {v_pooled.dtype} with q in {q.dtype} (one dtype only)"
    if D not in (64, 128):
        return f"head_dim {D} (64 or 128 only)"
    if tiles["BM"] != 128:
        return f"tiles BM {tiles['BM']} (128 only: two warpgroups of 64 query rows)"
    if block_q % tiles["BM"]:
        return f"block_q {block_q} (a multiple of {tiles['BM']} only)"
    pooled = [int(p) for p in factors if int(p) != 1]
    pow2 = block_k > 0 and block_k & (block_k - 1) == 0
    if not pooled or not pow2 or block_k // max(pooled) < 8 or block_k // 2 > tiles["BN"]:
        return (f"block_k {block_k} with factors {tuple(factors)} (a power of two, runs of >= 8 pyramid rows, "
                f"bk <= {2 * tiles['BN']})")
    if not (k_pooled.is_contiguous() and v_pooled.is_contiguous()):
        return "a non-contiguous pyramid"
    smem = shared_bytes(tiles, D)
    if smem > SHARED_LIMIT:
        return f"tiles {tiles} need {smem} bytes of shared memory (at most {SHARED_LIMIT} per CTA on Hopper)"
    for name, t in (("out", out), ("lse", lse)):  # q is copied by ``pooled_launch`` if it must be
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"{name} with a non-contiguous last dimension"
    return None


def launch(q, k_pooled, v_pooled, kv_idx, counts, out, lse, *, Lk: int, block_q: int, block_k: int, factors,
           scale: float, tiles: dict = TILES) -> None:
    """Run the kernel (inputs checked by the caller, ``pooled_unsupported(...)`` is ``None``). Asynchronous: nothing is
    read back to the host.

    Args:
        q: ``[B, Hq, Lq, D]`` float16 / bfloat16, last dimension contiguous (any other strides).
        k_pooled, v_pooled: contiguous ``[B, Hkv, R, D]`` pyramid of ``factors`` (``pyramid_pool``).
        kv_idx, counts: int32 ``[B, Hq, nq, nk]`` / ``[B, Hq, nq, 4]`` block list of pooled factors only
            (``fa4.level_block_lists`` tail list: the factor-1 count is 0).
        out: ``[B, Hq, Lq, D]`` (last dimension contiguous) receiving the pooled partial attention.
        lse: float32 ``[B, Hq, Lq]`` (last dimension contiguous) receiving its natural-log log-sum-exp, or None.
        Lk: key length (the pyramid holds ``Lk // block_k`` complete blocks per level).
        factors: the pyramid's factors (ascending); a listed factor outside them gives NaN rows.
        scale: softmax scale, positive and finite (the uniform-tile softmax takes the row maximum of the unscaled
            logits, which is the scaled logits' maximum only for a positive scale).

    Raises:
        ValueError: ``scale`` is not a positive finite number.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    B, Hq, Lq, D = q.shape
    Hkv, R = k_pooled.shape[1], k_pooled.shape[2]
    BM, BN = tiles["BM"], tiles["BN"]
    pooled = [int(p) for p in factors if int(p) != 1]
    CH = block_k // max(pooled)
    fp16 = q.dtype == torch.float16
    layout = _nvmma_layout((BN, D), fp16)
    kp2 = k_pooled.view(B * Hkv * R, D)
    vp2 = v_pooled.view(B * Hkv * R, D)
    # zero padding: runs past the stream's end read past the tensor and must load zeros (NaN-hiding rule)
    k_desc = TensorDescriptor(kp2, list(kp2.shape), list(kp2.stride()), [CH, D], layout, padding="zero")
    v_desc = TensorDescriptor(vp2, list(vp2.shape), list(vp2.stride()), [CH, D], layout, padding="zero")
    rows = level_offsets(Lk // block_k, block_k, factors)
    nq = cdiv(Lq, block_q)
    n_tiles_q = nq * (block_q // BM)
    lse_t, lse_strides = (lse, lse.stride()[:2]) if lse is not None else (out, (0, 0))
    n_items = B * Hq * n_tiles_q
    if n_items == 0:
        return
    per_sm = int(tiles.get("PROGRAMS_PER_SM", 0))
    programs = n_items if per_sm <= 0 else per_sm * _sm_count(q.device.index or 0)
    programs = max(1, min(n_items, int(tiles.get("PROGRAMS", 0)) or programs))
    _pooled_gluon_kernel[(programs,)](
        q, k_desc, v_desc, kv_idx, counts, out, lse_t,
        q.stride(0), q.stride(1), q.stride(2), *kv_idx.stride(), *counts.stride(), out.stride(0), out.stride(1),
        out.stride(2), lse_strides[0], lse_strides[1],
        B * Hq, Hq, Hq // Hkv, Hkv, R, Lq, n_tiles_q, n_items, B * Hkv * R, float(scale) * _LOG2E,
        rows.get(2, 0), rows.get(4, 0), rows.get(8, 0),
        D=D, BM=BM, BN=BN, BLOCK_Q=block_q, BLOCK_KV=block_k, CH=CH, HAS_P2=2 in pooled, HAS_P4=4 in pooled,
        HAS_P8=8 in pooled, HAS_LSE=lse is not None, NSK=tiles["NSK"], NSV=tiles["NSV"],
        PRODUCER_REGS=tiles["PRODUCER_REGS"], Q_LAYOUT=_nvmma_layout((BM, D), fp16), KV_LAYOUT=layout,
        CONSUMER_REGS=tiles["CONSUMER_REGS"], UNIFORM=bool(tiles["UNIFORM"]), num_warps=4)


def pooled_launch(q, k, v, k_pooled, v_pooled, kv_idx, counts, *, out, lse, block_q: int, block_k: int, factors,
                  scale: float, tiles: dict = TILES) -> None:
    """This kernel with ``fa4.triton_pooled_launch``'s signature (``fa4.attend_by_levels``' ``pooled_launch``).

    Args:
        q: ``[B, Hq, Lq, D]`` (copied if its last dimension is not contiguous); k, v: ``[B, Hkv, Lk, D]``, only
            ``Lk`` is read; k_pooled, v_pooled, kv_idx, counts, out, lse, block_q, block_k, factors, scale: as
            ``launch``.
    """
    if q.shape[-1] > 1 and q.stride(-1) != 1:
        q = q.contiguous()
    launch(q, k_pooled, v_pooled, kv_idx, counts, out, lse, Lk=k.shape[2], block_q=block_q, block_k=block_k,
           factors=factors, scale=scale, tiles=tiles)
