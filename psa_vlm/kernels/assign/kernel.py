"""Triton level assignment and block lists (PSA_SPEC steps 4-6): same contract as ``naive.assign_levels``.

What it computes: per ``(batch, query head, query block)`` row, the factor of every KV block (forced full
resolution for sink, geometry-forced, ``KV_FORCE_FULL``/``KV_NEEDS_FULL`` blocks and text query blocks;
threshold or quota levels for the other visible, non-skipped candidates ranked by score, descending, ties to
the lower block index; the similarity cap on kept candidates), then the row's block list: entries ordered by
factor (1, 2, 4, 8) and block index, ``-1`` after the last, and the per-factor counts.

Grid: ``(B * Hq * nq,)``, one program per row; nothing leaves the GPU and nothing is sorted by torch.

Per program, on a row padded to ``NKP = next_pow2(nk)``:

1. geometry (visible / poolable) from the block indices, flags from ``kv_flags``/``q_flags``;
2. one int64 key per block: candidates ``(float32 bits of the score) << 32 | (NKP-1-j)`` (a non-negative
   float's bits order like the float; the inverted index sends ties to the lower index), then forced blocks,
   then the rest; a descending bitonic sort (``tl.sort``'s network, inlined: ``_bitonic_sort``) ranks them;
3. in ranked order: threshold mode ``before = cumsum(w) - w`` with ``w = score / total`` (as the reference
   computes it), quota mode the rank against ``floor(Q_p * n + 0.5)``; the cap (gathered by block index);
4. the factors are scattered back to their block indices and read back in block order; one exclusive
   ``tl.cumsum`` of four 16-bit per-level counters packed in an int64 (``1 << 16 * level`` per kept block)
   gives each entry's position (its level's base plus its rank within the level); ``-1`` fills the rest.

``_bitonic_sort`` is ``tl.sort``'s network with the partner found by an additive pair reduction instead of an
XOR reduction: identical on the GPU, and 2.5x faster under the interpreter (which runs ``tl.sort``'s XOR
reduction element by element), which keeps the CPU test tier short.

Floating point: the kernel is compiled without FMA contraction and divides with ``div_rn``, so the quota
bounds are bit-identical to the reference and the threshold masses differ from it only by summation order
(a factor can differ only where ``before(j)`` lies within float32 rounding of a threshold).

Limits: scores must be finite (non-negative candidates are ranked; a negative candidate score counts in the
total but is dropped, as in the reference); ``nk < 65536`` (16-bit counters) and up to a few thousand blocks
in practice (the row lives in registers).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...config import PSAConfig
from ..geometry import cdiv
from .naive import KV_FORCE_FULL, KV_NEEDS_FULL, KV_SKIP

__all__ = ["assign_levels"]

logger = logging.getLogger(__name__)

#: Launch overrides (``num_warps``) for benchmarks; empty by default.
_OVERRIDES: dict = {}


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _bitonic_sort(x, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort a 1-D integer tensor of ``2**LOG_N`` elements (``tl.sort``'s bitonic network, inlined).

    The tensor is viewed as a ``[2] * LOG_N`` hypercube; a compare-and-swap at distance ``2**i`` finds each
    element's partner along hypercube axis ``LOG_N-1-i`` as ``pair sum - self`` (integer wrap-around is exact),
    a plain sum that the interpreter evaluates in one numpy call, where ``tl.sort``'s XOR reduction runs
    element by element.
    """
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:
            # merge blocks of 2**stage elements in alternating directions: bit `stage` of the index
            flip = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - stage - 1) + [2] + [1] * stage)
        else:
            flip = tl.full([1] * LOG_N, DESCENDING, tl.int32)
        for sub in tl.static_range(stage):
            # partner at distance 2**(stage-1-sub): hypercube axis LOG_N-stage+sub (no named constexpr:
            # a reassigned constexpr does not compile)
            y = tl.sum(h, axis=LOG_N - stage + sub, keep_dims=True) - h
            right = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - stage + sub) + [2] + [1] * (stage - 1 - sub))
            h = tl.where((h > y) != ((flip ^ right) != 0), y, h)
    return tl.reshape(h, [2**LOG_N])


#: Integer arguments that change with the sequence length: not specialised by Triton (no recompilation when a
#: new length is, or is not, a multiple of 16). Measured cost of a new length: docs/PERFORMANCE.md.
_LENGTH_ARGS = ("stride_sb", "stride_sh", "stride_sq", "stride_cb", "stride_ch", "stride_kfb", "stride_qfb", "stride_fb",
    "stride_fh", "stride_fq", "stride_nb", "stride_nh", "nq", "nk", "lq", "lk")


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _assign_kernel(
    scores_ptr,
    cap_ptr,
    kvf_ptr,
    qf_ptr,
    f_ptr,
    idx_ptr,
    cnt_ptr,
    stride_sb,
    stride_sh,
    stride_sq,
    stride_sk,
    stride_cb,
    stride_ch,
    stride_ck,
    stride_kfb,
    stride_kfk,
    stride_qfb,
    stride_qfq,
    stride_fb,  # factors and kv_idx share their (contiguous) layout
    stride_fh,
    stride_fq,
    stride_nb,
    stride_nh,
    stride_nq,
    Hq,
    nq,
    nk,
    G,
    lq,
    lk,
    sink_blocks,
    t1,  # threshold mode: tau_p; quota mode: cumulative quota Q_p (float32)
    t2,
    t4,
    t8,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    NKP: tl.constexpr,
    LOG_NKP: tl.constexpr,
    HAS_KVF: tl.constexpr,
    HAS_QF: tl.constexpr,
    DENSE: tl.constexpr,
    QUOTA: tl.constexpr,
    EN2: tl.constexpr,
    EN4: tl.constexpr,
    EN8: tl.constexpr,
    FORCE_FULL_BITS: tl.constexpr,
    SKIP_BIT: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid % nq
    h = (pid // nq) % Hq
    b = pid // (nq * Hq)

    # ---- geometry and flags, in block order
    j = tl.arange(0, NKP)
    in_row = j < nk
    first_pos = lk - lq + i * BQ
    last_pos = lk - lq + tl.minimum((i + 1) * BQ, lq) - 1
    first_key = j * BK
    last_key = tl.minimum((j + 1) * BK, lk) - 1
    visible = in_row & (first_key <= last_pos)
    poolable = visible & (last_key - first_key + 1 == BK) & (last_key <= first_pos)
    if HAS_KVF:
        fl = tl.load(kvf_ptr + b.to(tl.int64) * stride_kfb + j * stride_kfk, mask=in_row, other=0).to(tl.int32)
    else:
        fl = tl.zeros([NKP], tl.int32)
    active = visible & ((fl & SKIP_BIT) == 0)
    forced = (visible & ~poolable) | ((fl & FORCE_FULL_BITS) != 0) | (j < sink_blocks)
    if HAS_QF:
        qf = tl.load(qf_ptr + b.to(tl.int64) * stride_qfb + i * stride_qfq).to(tl.int32)
        forced = forced | (qf != 0)
    forced = forced & active

    row_f = b.to(tl.int64) * stride_fb + h.to(tl.int64) * stride_fh + i.to(tl.int64) * stride_fq
    if DENSE:
        js = j
        fs = tl.where(active, 1, 0)
    else:
        cand = active & ~forced
        row_s = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + i.to(tl.int64) * stride_sq
        sc = tl.load(scores_ptr + row_s + j * stride_sk, mask=cand, other=0.0).to(tl.float32)
        sc = tl.where(cand, sc, 0.0)
        total = tl.sum(sc, axis=0)
        rankable = cand & (sc >= 0.0)
        bits = (sc + 0.0).to(tl.int32, bitcast=True).to(tl.int64)  # + 0.0 turns -0.0 into +0.0
        inv = (NKP - 1 - j).to(tl.int64)
        cls = tl.where(forced, -1, -2).to(tl.int64)
        key = tl.where(rankable, (bits << 32) | inv, (cls << 32) + inv)
        skey = _bitonic_sort(key, LOG_NKP, True)  # candidates by score, then forced, then the rest
        hi = skey >> 32
        js = (NKP - 1 - (skey & 0xFFFFFFFF)).to(tl.int32)  # block index of each ranked entry
        ranked = hi >= 0
        pos = tl.arange(0, NKP)  # rank (candidates come first)
        a = tl.zeros([NKP], tl.int32)
        if QUOTA:
            n = tl.sum(active.to(tl.int32), axis=0).to(tl.float32)
            rk = pos + tl.sum(forced.to(tl.int32), axis=0)
            # floor(Q_p * n + 0.5) in float32, no FMA contraction (launch option): the reference's bounds
            if EN8:
                a = tl.where(rk < tl.floor(t8 * n + 0.5), 8, a)
            if EN4:
                a = tl.where(rk < tl.floor(t4 * n + 0.5), 4, a)
            if EN2:
                a = tl.where(rk < tl.floor(t2 * n + 0.5), 2, a)
            a = tl.where(rk < tl.floor(t1 * n + 0.5), 1, a)
        else:
            sval = hi.to(tl.int32).to(tl.float32, bitcast=True)
            pos_total = total > 0.0
            w = tl.math.div_rn(tl.maximum(sval, 0.0), tl.where(pos_total, total, 1.0))
            w = tl.where(ranked, w, 0.0)
            w = tl.where(pos_total, w, 0.0)  # all-zero candidates: every mass 0
            before = tl.cumsum(w, axis=0) - w  # the reference's inclusive-minus-own mass
            if EN8:
                a = tl.where(before < t8, 8, a)
            if EN4:
                a = tl.where(before < t4, 4, a)
            if EN2:
                a = tl.where(before < t2, 2, a)
            a = tl.where(before < t1, 1, a)
        a = tl.where(ranked, a, 0)
        capv = tl.load(
            cap_ptr + b.to(tl.int64) * stride_cb + (h // G).to(tl.int64) * stride_ch + js * stride_ck,
            mask=ranked & (js < nk),
            other=1,
        ).to(tl.int32)
        a = tl.where(a > 0, tl.minimum(a, capv), a)
        fs = tl.where(hi == -1, 1, a)  # forced blocks are full resolution
    tl.store(f_ptr + row_f + js, fs.to(tl.int8), mask=js < nk)

    # ---- block list in block order: level 0..3 for factors 1, 2, 4, 8 (dropped: none). One exclusive
    # cumsum of packed 16-bit per-level counters gives every entry's rank inside its level.
    if not DENSE:
        tl.debug_barrier()  # the factors scattered above are read back by other threads of the program
        fs = tl.load(f_ptr + row_f + j, mask=in_row, other=0).to(tl.int32)
    level = tl.where(fs == 1, 0, tl.where(fs == 2, 1, tl.where(fs == 4, 2, 3)))
    kept = in_row & (fs > 0)
    packed = tl.where(kept, tl.full([NKP], 1, tl.int64) << (16 * level).to(tl.int64), 0)
    before = tl.cumsum(packed, axis=0) - packed  # [NKP] exclusive per-level counts, packed
    total = tl.sum(packed, axis=0)
    n1 = (total & 0xFFFF).to(tl.int32)
    n2 = ((total >> 16) & 0xFFFF).to(tl.int32)
    n4 = ((total >> 32) & 0xFFFF).to(tl.int32)
    n8 = ((total >> 48) & 0xFFFF).to(tl.int32)
    base = tl.where(level == 0, 0, tl.where(level == 1, n1, tl.where(level == 2, n1 + n2, n1 + n2 + n4)))
    pos = base + ((before >> (16 * level).to(tl.int64)) & 0xFFFF).to(tl.int32)
    tl.store(idx_ptr + row_f + pos, j, mask=kept)
    n_all = n1 + n2 + n4 + n8
    tl.store(idx_ptr + row_f + j, tl.full([NKP], -1, tl.int32), mask=in_row & (j >= n_all))
    lv = tl.arange(0, 4)
    cnt = tl.where(lv == 0, n1, tl.where(lv == 1, n2, tl.where(lv == 2, n4, n8)))
    row_n = b.to(tl.int64) * stride_nb + h.to(tl.int64) * stride_nh + i.to(tl.int64) * stride_nq
    tl.store(cnt_ptr + row_n + lv, cnt)


# ---------------------------------------------------------------------------------------------- launcher
def _alloc(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer (a seam for tests, which poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


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
        ``(factors, kv_idx, counts)``: the int8 ``[B, Hq, nq, nk]`` map, int32 ``[B, Hq, nq, nk]`` block
        indices and int32 ``[B, Hq, nq, 4]`` per-factor counts (layout in ``naive``'s module docstring).
    """
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores must be a 4-d tensor [B, Hq, nq, nk], got {getattr(scores, 'shape', scores)}")
    B, Hq, nq, nk = scores.shape
    bq, bk = config.block_q, config.block_k
    if (nq, nk) != (cdiv(lq, bq), cdiv(lk, bk)):
        raise ValueError(f"scores has nq, nk = {(nq, nk)} but lq={lq}, lk={lk} give {(cdiv(lq, bq), cdiv(lk, bk))}")
    if cap.dim() != 3 or cap.shape[0] != B or cap.shape[2] != nk or cap.shape[1] == 0 or Hq % cap.shape[1]:
        raise ValueError(f"cap must be [B, Hkv, nk] with Hq % Hkv == 0, got {tuple(cap.shape)} for Hq={Hq}")
    if kv_flags is not None and tuple(kv_flags.shape) != (B, nk):
        raise ValueError(f"kv_flags must be [B, nk] = {(B, nk)}, got {tuple(kv_flags.shape)}")
    if nk >= 1 << 16:
        raise ValueError(f"assign_levels supports fewer than 65536 KV blocks per row, got nk={nk}")
    if q_flags is not None and tuple(q_flags.shape) != (B, nq):
        raise ValueError(f"q_flags must be [B, nq] = {(B, nq)}, got {tuple(q_flags.shape)}")
    dev = scores.device
    G = Hq // cap.shape[1]
    factors = _alloc((B, Hq, nq, nk), torch.int8, dev)
    kv_idx = _alloc((B, Hq, nq, nk), torch.int32, dev)
    counts = _alloc((B, Hq, nq, 4), torch.int32, dev)
    if B * Hq * nq * nk == 0:
        counts.zero_()
        return factors, kv_idx, counts
    # int1 storage cannot be indexed by Triton pointers everywhere; bool and int8 share their bytes
    qf = q_flags.view(torch.int8) if q_flags is not None and q_flags.dtype == torch.bool else q_flags
    if scores.dtype != torch.float32:
        scores = scores.float()
    quota = config.mode == "quota"
    if quota:
        cum, t = 0.0, []
        for qv in config.quotas:  # cumulative in float64, as the reference; rounded to float32 at launch
            cum += qv
            t.append(cum)
    else:
        t = list(config.thresholds)
    enabled = set(config.factors)
    NKP = max(16, triton.next_power_of_2(nk))
    dummy = factors  # placeholder pointer for absent optional inputs (never read)
    _assign_kernel[(B * Hq * nq,)](
        scores,
        cap,
        kv_flags if kv_flags is not None else dummy,
        qf if qf is not None else dummy,
        factors,
        kv_idx,
        counts,
        *scores.stride(),
        *cap.stride(),
        *(kv_flags.stride() if kv_flags is not None else (0, 0)),
        *(qf.stride() if qf is not None else (0, 0)),
        *factors.stride()[:3],
        *counts.stride()[:3],
        Hq,
        nq,
        nk,
        G,
        lq,
        lk,
        config.sink_blocks,
        *(float(x) for x in t),
        BQ=bq,
        BK=bk,
        NKP=NKP,
        LOG_NKP=NKP.bit_length() - 1,
        HAS_KVF=kv_flags is not None,
        HAS_QF=qf is not None,
        DENSE=config.dense,
        QUOTA=quota,
        EN2=2 in enabled,
        EN4=4 in enabled,
        EN8=8 in enabled,
        FORCE_FULL_BITS=KV_FORCE_FULL | KV_NEEDS_FULL,
        SKIP_BIT=KV_SKIP,
        # one warp per 1024 blocks: v2 (H200, 64k, 512 blocks) 1 warp 0.18 ms vs 4 warps 0.21, 8 warps 0.26;
        # v6 (128k, 1024 blocks) 1 warp 1.63 ms vs 2 warps 2.18, 4 warps 2.87, 8 warps 2.23 (NOTES_stages.md)
        num_warps=_OVERRIDES.get("num_warps", min(8, max(1, NKP // 1024))),
        enable_fp_fusion=False,
    )
    return factors, kv_idx, counts
