"""The estimator's GEMM form as a Gluon kernel for Hopper (compute capability 9.x): same contract as
``kernel._launch_gemm``, same estimates (the float32 arithmetic of ``kernel._gemm_item``, summed in another order).

Why a second implementation of the same GEMM form: Gluon (Triton's explicit-layout dialect,
``triton.experimental.gluon``) lets the kernel keep one flat TMA / mbarrier ring across the key tiles of a work
item (the next tile's first chunks load while the current tile's epilogue runs), store each row's per-KV-block
log-sum-exps as vectors from a one-row-per-thread layout, and read back in the second pass only the KV blocks the
item can see. With the Triton GEMM form's MMA tiles (128 reduced rows x 256 reduced keys x 64-element chunks, 8
warps, 3 stages, one program per SM) it ran 14% faster on an H200 at 64k and 128k tokens (3.71 against 4.32 ms,
14.4 against 16.7 ms, same run; ``NOTES_stages.md`` v8). Two 4-warp programs per SM, smaller tiles and a producer
warp (warp specialisation) were measured and were slower or no faster.

Used by ``kernel.block_importance`` on CUDA devices of compute capability 9.x with Triton >= 3.6 (run on the H200
with 3.6, compiled for sm_90 with 3.8); wgmma does not exist on other architectures, which keep the Triton GEMM
form, as do older Triton versions; a newer Triton whose Gluon API no longer fits falls back at the first compile with
a warning (``kernel._gluon_failed``). Not runnable under ``TRITON_INTERPRET=1``: the CPU tests cover the Triton forms
and the engine choice and compile this kernel for sm_90a without a GPU (``tests/kernels/test_gluon_compile.py``), the
GPU tier compares it with the float32 reference (``benchmarks/devcheck_gluon_estimate.py`` also with the Triton GEMM
form). Nothing here is imported by
``import psa_vlm``.
"""

from __future__ import annotations

import functools

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ..geometry import cdiv

# the CTA-wide barrier: ``thread_barrier`` in Triton 3.6, ``barrier`` from 3.7 on
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.jit
def _issue(q_desc, k_desc, q_smem, k_smem, bars, g, c, total, q_row, col_h, k_row, col_t,
           DH: gl.constexpr, BN: gl.constexpr, BKD: gl.constexpr, NKD: gl.constexpr, NS: gl.constexpr):
    """TMA loads of the item's chunk ``c`` (the program's ``g``-th) into ring slot ``g % NS``; none past ``total``."""
    slot = g % NS
    jt = c // NKD
    e = (c % NKD) * BKD
    ok = c < total
    bar = bars.index(slot)
    mbarrier.expect(bar, q_desc.block_type.nbytes + k_desc.block_type.nbytes, pred=ok)
    # element e of a reduced row: query sub-row e // DH at offset e % DH (the launcher keeps a chunk in one sub-row)
    tma.async_copy_global_to_shared(q_desc, [q_row, (e // DH) * col_t + col_h + e % DH], bar, q_smem.index(slot),
                                    pred=ok)
    tma.async_copy_global_to_shared(k_desc, [k_row + jt * BN, e], bar, k_smem.index(slot), pred=ok)


@gluon.jit
def _chunk(acc, kk, jt, g, q_desc, k_desc, q_smem, k_smem, bars, total, q_row, col_h, k_row, col_t,
           DH: gl.constexpr, BN: gl.constexpr, BKD: gl.constexpr, NKD: gl.constexpr, NS: gl.constexpr):
    """Chunk ``kk`` of key tile ``jt`` (the program's ``g``-th): wait for its loads, issue its MMA, and refill the
    slot of the chunk before it (complete once at most one MMA is in flight) with the chunk ``NS - 1`` ahead."""
    c = jt * NKD + kk
    slot = g % NS
    mbarrier.wait(bars.index(slot), (g // NS) & 1)
    acc = warpgroup_mma(q_smem.index(slot), k_smem.index(slot).permute((1, 0)), acc, use_acc=kk != 0, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
    _issue(q_desc, k_desc, q_smem, k_smem, bars, g + NS - 1, c + NS - 1, total, q_row, col_h, k_row, col_t, DH, BN,
           BKD, NKD, NS)
    return acc


#: Length-derived integer arguments: not specialised, so a new prompt length does not compile again (as the Triton
#: forms' ``_GEMM_LENGTH_ARGS``).
_LENGTH_ARGS = ("stride_ob", "stride_oh", "stride_oq", "Lq", "Lk", "nq", "nk", "Rrows", "Rk", "n_rt", "n_items",
                "row_b", "row_h")


@gluon.jit(do_not_specialize=_LENGTH_ARGS)
def _estimate_gluon_kernel(
    q_desc, k_desc, out_ptr, scr_ptr,
    stride_ob, stride_oh, stride_oq, Lq, Lk, nq, nk, Rrows, Rk, n_rt, n_items, row_b, row_h, col_t, col_hd,
    Hq, G, BH, qk_scale, pitch,
    S: gl.constexpr, SD: gl.constexpr, DH: gl.constexpr, RB: gl.constexpr, PP: gl.constexpr, BM: gl.constexpr,
    BN: gl.constexpr, KPB: gl.constexpr, BKD: gl.constexpr, NJ: gl.constexpr, NS: gl.constexpr,
    UNROLL: gl.constexpr, num_warps: gl.constexpr,
):
    """Persistent program: items in the snake order of ``kernel._estimate_gemm_kernel``, the same two passes
    (online per-(row, KV block) log-sum-exps into the program's scratch, then the block sums)."""
    NBT: gl.constexpr = BN // KPB  # KV blocks per key tile
    NKD: gl.constexpr = (SD + BKD - 1) // BKD  # chunks per reduced row (TMA zero-fills a partial last chunk)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    st_l: gl.constexpr = gl.BlockedLayout([1, NBT], [32, 1], [num_warps, 1], [1, 0])  # one row per thread
    blk: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [num_warps, 1], [1, 0])
    out_l: gl.constexpr = gl.SliceLayout(1, gl.BlockedLayout([1, 1, 2], [1, 1, 32], [1, num_warps, 1], [2, 1, 0]))
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [NS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NS] + k_desc.block_type.shape, k_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(bars.index(i), count=1)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    scr_base = scr_ptr + pid.to(gl.int64) * (BM * pitch)
    g = pid * 0  # chunks consumed by this program: ring slot g % NS, barrier phase (g // NS) & 1
    for rnd in range(0, gl.cdiv(n_items, nprog)):
        item = rnd * nprog + gl.where(rnd % 2 == 0, pid, nprog - 1 - pid)
        if item < n_items:
            rt = n_rt - 1 - item // BH  # heaviest (latest) row tile first
            bh = item % BH
            b = bh // Hq
            h = bh % Hq
            r = rt * BM + gl.arange(0, BM, layout=rows_l)
            row_ok = r < Rrows
            last_m = Lk - Lq + gl.minimum(r * S + S - 1, Lq - 1)  # last visible key position of each row
            min_last = gl.min(gl.where(row_ok, last_m, Lk), axis=0)
            last_max = gl.max(gl.where(row_ok, last_m, 0), axis=0)
            nvis = last_max // (KPB * S) + 1
            n_tiles = gl.cdiv(nvis, NBT)
            total = n_tiles * NKD
            k_row = (bh // G) * Rk
            q_row = b * row_b + h * row_h + rt * BM
            col_h = h * col_hd
            rr_s = gl.arange(0, BM, layout=gl.SliceLayout(1, st_l))
            rok_s = (rt * BM + rr_s) < Rrows
            for c0 in gl.static_range(NS - 1):
                _issue(q_desc, k_desc, q_smem, k_smem, bars, g + c0, c0, total, q_row, col_h, k_row, col_t, DH, BN,
                       BKD, NKD, NS)
            m_i = gl.full([BM], float("-inf"), gl.float32, rows_l)
            l_i = gl.zeros([BM], gl.float32, rows_l)
            for jt in range(0, n_tiles):
                acc = gl.zeros([BM, BN], gl.float32, mma)
                if NKD <= UNROLL:
                    for kk in gl.static_range(NKD):
                        acc = _chunk(acc, kk, jt, g, q_desc, k_desc, q_smem, k_smem, bars, total, q_row, col_h, k_row,
                                     col_t, DH, BN, BKD, NKD, NS)
                        g += 1
                else:  # a rolled loop: unrolled, the hoisted chunk coordinates spill (s 16: NKD 32)
                    for kk in range(NKD):
                        acc = _chunk(acc, kk, jt, g, q_desc, k_desc, q_smem, k_smem, bars, total, q_row, col_h, k_row,
                                     col_t, DH, BN, BKD, NKD, NS)
                        g += 1
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                # epilogue (log2 domain), as kernel._tile_lse: the causal mask only on tiles past some row's limit
                x = acc * qk_scale
                if (jt + 1) * (NBT * KPB * S) - S > min_last:
                    cc = jt * (NBT * KPB) + gl.arange(0, BN, layout=cols_l)
                    vis = gl.expand_dims(cc * S, 0) <= gl.expand_dims(last_m, 1)
                    x = gl.where(vis, x, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(x, axis=1))
                p = gl.exp2(x - gl.expand_dims(m_new, 1))
                bs = gl.sum(gl.reshape(p, [BM, NBT, KPB]), axis=2)  # [BM, NBT] per-KV-block sums
                l_i = l_i * gl.exp2(m_i - m_new) + gl.convert_layout(gl.sum(bs, axis=1), rows_l)
                bs = gl.convert_layout(bs, st_l)
                m_b = gl.convert_layout(m_new, gl.SliceLayout(1, st_l))
                pos = bs > 0.0
                lse = gl.where(pos, gl.expand_dims(m_b, 1) + gl.log2(gl.where(pos, bs, 1.0)), -float("inf"))
                jj = jt * NBT + gl.arange(0, NBT, layout=gl.SliceLayout(0, st_l))
                ptrs = scr_base + gl.expand_dims(rr_s.to(gl.int64) * pitch, 1) + gl.expand_dims(jj, 0)
                # no column mask: the launcher pads scratch rows to whole tiles, so a row's NBT values are stored
                # as vectors (columns >= nvis are never read back)
                gl.store(ptrs, lse, mask=gl.expand_dims(rok_s, 1) & gl.expand_dims(jj >= 0, 0))
                m_i = m_new

            # second pass: S[i, j] = sum over the query block's reduced rows of 2^(lse_rj - LSE_r)
            lse_row = gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, blk))
            rok2 = gl.convert_layout(row_ok, gl.SliceLayout(1, blk))
            _cta_barrier()  # the scratch written above is read back by other threads
            rr2 = gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
            offs_j = gl.arange(0, NJ, layout=gl.SliceLayout(0, blk))
            i_p = rt * PP + gl.arange(0, PP, layout=gl.SliceLayout(1, out_l))
            oj = gl.arange(0, NJ, layout=gl.SliceLayout(0, out_l))
            dst = (out_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                   + gl.expand_dims(i_p.to(gl.int64) * stride_oq, 1))
            n_full = gl.cdiv(nvis, NJ) * NJ
            for j0 in range(0, n_full, NJ):
                jj2 = j0 + offs_j
                lse2 = gl.load(scr_base + gl.expand_dims(rr2.to(gl.int64) * pitch, 1) + gl.expand_dims(jj2, 0),
                               mask=gl.expand_dims(rok2, 1) & gl.expand_dims(jj2 < nvis, 0), other=float("-inf"))
                pr = gl.where(gl.expand_dims(rok2, 1), gl.exp2(lse2 - gl.expand_dims(lse_row, 1)), 0.0)
                val = gl.convert_layout(gl.sum(gl.reshape(pr, [PP, RB, NJ]), axis=1), out_l)
                ojj = j0 + oj
                gl.store(dst + gl.expand_dims(ojj, 0), val,
                         mask=gl.expand_dims(i_p < nq, 1) & gl.expand_dims(ojj < nk, 0))
            zero = gl.zeros([PP, NJ], gl.float32, out_l)
            for j0 in range(n_full, nk, NJ):  # KV blocks no row of the item sees: zeros, nothing to read
                ojj = j0 + oj
                gl.store(dst + gl.expand_dims(ojj, 0), zero,
                         mask=gl.expand_dims(i_p < nq, 1) & gl.expand_dims(ojj < nk, 0))
            _cta_barrier()  # the next item overwrites the scratch


#: Tiles of the Gluon kernel (v8, H200): the Triton GEMM form's MMA tiles, a 64-block-wide second pass (``NJ``), the
#: chunk loop unrolled up to 16 chunks (s 8 at D 128); variants in ``NOTES_stages.md``.
TILES = dict(BM=128, BN=256, BKD=64, NS=3, NJ=64, UNROLL=16, num_warps=8)


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple, fp16: bool):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float16 if fp16 else gl.bfloat16)


def launch(qo, kr, out, *, Lq: int, Lk: int, Hq: int, Hkv: int, D: int, s: int, RB: int, KPB: int, qk_scale: float,
           programs: int, pitch: int, scratch, fp16: bool, tiles: dict) -> None:
    """Run the kernel on the operands ``kernel._launch_gemm`` prepared (``qo``: ``_GemmQuery``, ``kr``: reversed
    reduced keys, ``out`` float32 ``[B, Hq, nq, nk]``, ``scratch`` of ``programs * BM * pitch`` float32, ``pitch`` a
    multiple of ``BN // KPB``). Requires ``Lq <= Lk`` (``block_importance`` checks it): every item then sees a key."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    BM, BN, BKD = tiles["BM"], tiles["BN"], qo.bkd
    B = out.shape[0]
    nq, nk = out.shape[2], out.shape[3]
    Rk = kr.shape[0] // (B * Hkv)
    n_rt = cdiv(cdiv(Lq, s), BM)  # row tiles per head
    q_desc = TensorDescriptor(qo.view, list(qo.view.shape), list(qo.view.stride()), [BM, BKD],
                              _shared_layout((BM, BKD), fp16))
    k_desc = TensorDescriptor(kr, list(kr.shape), list(kr.stride()), [BN, BKD], _shared_layout((BN, BKD), fp16))
    _estimate_gluon_kernel[(programs,)](
        q_desc, k_desc, out, scratch, *out.stride()[:3], Lq, Lk, nq, nk, qo.rows, Rk, n_rt, n_rt * B * Hq,
        qo.row_b, qo.row_h, qo.col_t, qo.col_hd, Hq, Hq // Hkv, B * Hq, qk_scale, pitch,
        S=s, SD=s * D, DH=D, RB=RB, PP=BM // RB, BM=BM, BN=BN, KPB=KPB, BKD=BKD, NJ=tiles["NJ"], NS=tiles["NS"],
        UNROLL=tiles["UNROLL"], num_warps=tiles["num_warps"])
