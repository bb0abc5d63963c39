"""Triton forward of PSA sparse attention (PSA_SPEC step 7): same contract as ``naive.sparse_attention``.

What it computes: for every query block ``i`` of every ``(batch, query head)``, FlashAttention-style online
softmax (exp2 domain, float32 statistics and accumulator) over the KV blocks listed in ``kv_idx`` / ``counts``,
each read at its own resolution: factor-1 blocks from ``k``/``v`` (token-causal, key padding), factor-``p``
blocks from the pyramid ``k_pooled``/``v_pooled`` with ``+ ln p`` on every pooled logit. Rows that see no key
give zeros; a NaN/inf that a row attends to leaves the row non-finite, as in SDPA (the max guard only replaces
``-inf``; the epilogue tests ``l == 0``, which a NaN fails). GQA by index: query head ``h`` reads KV head ``h // G``; nothing is repeated.

Grid: ``(B * Hq, nq * bq / BLOCK_M)``. Axis 0 runs fastest in launch order, so the ``G`` heads of one KV group
(adjacent in axis 0) run side by side and share their K/V tiles through L2; axis 1 walks the query tiles from
the last (longest list) to the first, so the heaviest programs start first.

Tiles: ``BLOCK_M`` query rows (``bq`` or a power-of-two slice of it) x ``BLOCK_N`` key rows (``bk`` or a
power-of-two slice of it) x ``BLOCK_D`` (``D`` rounded up to a power of two, masked). Each program runs two
software-pipelined loops over its list:

1. *full-resolution* entries (sorted by block index): first those entirely in the past of the tile's first
   query, unmasked (a per-column ``-inf`` where ``key_padding_mask`` says padding), then the last few (the
   causal diagonal, an incomplete last block) under a runtime branch that applies the token-causal mask;
   running them in the same loop rather than a loop of their own saved 8-13% (``NOTES.md``);
2. *pooled* entries, all levels as one stream of pyramid rows ("decoupled block tiles"): a ``BLOCK_N``-row
   tile gathers ``BLOCK_N / (bk/p)`` consecutive list entries of ``bk/p`` rows each, and may cross from one
   level into the next; each column gets ``log2 p`` (``-inf`` past the end of the stream), so pooled work runs
   on full tensor-core tiles and a row wastes at most one partial tile for all its levels together. The
   gathered list entries of the next tile are loaded one iteration ahead.

Limits: ``bq`` and ``bk`` powers of two >= 16; ``D <= 256``; inputs float16, bfloat16 or float32 with the last
dimension contiguous (copied otherwise); ``kv_idx``/``counts`` int32 as built by ``build_block_lists``. Under
``TRITON_INTERPRET=1`` loaded tiles are upcast to float32 (the interpreter's bfloat16 arithmetic is wrong).
A list that uses a factor missing from ``factors`` is an error: on CPU tensors the launcher raises like the
reference; on CUDA the launcher never synchronises with the host, so the kernel fills the affected query
rows with NaN instead.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..geometry import FACTOR_ORDER, cdiv, level_offsets

__all__ = ["sparse_attention"]

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _online_softmax_step(
    acc, m_i, l_i, s, vt, qk_scale, PRESCALED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr
):
    """One online-softmax update with a ``[BM, BN]`` logit tile ``s`` and a ``[BN, BD]`` value tile ``vt``.

    ``s`` is raw ``q . k`` (``PRESCALED`` false: scaled here, fused into the exp2 argument) or already
    ``q . k * scale * log2(e) + bias`` with ``-inf`` where masked (``PRESCALED`` true).
    """
    if PRESCALED:
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])  # [BM, BN]
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)  # [BM]; 0 while the row has seen nothing
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, vt, acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _stream_entry(vr, c1, c2, c4, r2, e4, RP2: tl.constexpr, RP4: tl.constexpr, RP8: tl.constexpr):
    """List position of the entry that holds row ``vr`` ``[BN]`` of the pooled stream (levels 2, 4, 8)."""
    return tl.where(
        vr < r2, c1 + vr // RP2, tl.where(vr < e4, c1 + c2 + (vr - r2) // RP4, c1 + c2 + c4 + (vr - e4) // RP8)
    )


#: Integer arguments that change with the sequence length: not specialised by Triton (no recompilation when a
#: new length is, or is not, a multiple of 16). Measured cost of a new length: docs/PERFORMANCE.md.
_LENGTH_ARGS = ("stride_ib", "stride_ih", "stride_iq", "stride_cb", "stride_ch", "stride_pb", "stride_lb", "stride_lh",
    "Lq", "Lk", "n_tiles_q", "off2", "off4", "off8")


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _psa_fwd_kernel(
    Q, K, V, KP, VP, KV_IDX, COUNTS, PAD, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_ib, stride_ih, stride_iq, stride_ie,
    stride_cb, stride_ch, stride_cq, stride_cc,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    Hq, G, Lq, Lk, n_tiles_q, qk_scale, off2, off4, off8,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    MASK_W: tl.constexpr,
    HAS_P2: tl.constexpr,
    HAS_P4: tl.constexpr,
    HAS_P8: tl.constexpr,
    HAS_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_LSE: tl.constexpr = False,
):
    M_PER_Q: tl.constexpr = BLOCK_Q // BLOCK_M  # program tiles per query block
    SUB: tl.constexpr = BLOCK_KV // BLOCK_N  # key tiles per full-resolution KV block
    RP2: tl.constexpr = BLOCK_KV // 2  # pyramid rows per block at factor 2, 4, 8
    RP4: tl.constexpr = BLOCK_KV // 4
    RP8: tl.constexpr = BLOCK_KV // 8

    pid_bh = tl.program_id(0)
    tile_m = n_tiles_q - 1 - tl.program_id(1)  # heaviest (last) query tiles first
    i = tile_m // M_PER_Q  # query block
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)

    q_base = Q + b64 * stride_qb + h64 * stride_qh
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    kp_base = KP + b64 * stride_kpb + hk64 * stride_kph
    vp_base = VP + b64 * stride_vpb + hk64 * stride_vph
    idx_base = KV_IDX + b64 * stride_ib + h64 * stride_ih + i.to(tl.int64) * stride_iq
    cnt_base = COUNTS + b64 * stride_cb + h64 * stride_ch + i.to(tl.int64) * stride_cq
    pad_base = PAD + b64 * stride_pb

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    qpos = Lk - Lq + offs_m  # [BM] absolute query positions
    first_pos = Lk - Lq + tile_m * BLOCK_M

    q_ptrs = q_base + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BM, BD]
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    c1 = tl.load(cnt_base)
    c2 = tl.load(cnt_base + stride_cc)
    c4 = tl.load(cnt_base + 2 * stride_cc)
    c8 = tl.load(cnt_base + 3 * stride_cc)

    # Factor-1 entries are sorted by block index, so those not entirely in the past of this tile's first
    # query (or incomplete) form a suffix of at most MASK_W entries: count them.
    j_lo = (first_pos + 1) // BLOCK_KV
    w = c1 - MASK_W + tl.arange(0, MASK_W)  # [MASK_W] list positions
    tail = tl.load(idx_base + w * stride_ie, mask=w >= 0, other=-1)
    n_diag = tl.sum(((tail >= j_lo) & (w >= 0)).to(tl.int32), axis=0)
    n_past = c1 - n_diag

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Pooled levels form one stream of pyramid rows (factor 2 rows, then 4, then 8).
    n_bad = c1 * 0  # listed entries of a factor missing from the pyramid
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
    # ---- 1. full-resolution blocks: those in the past unmasked, then the diagonal ones (the list's last
    # factor-1 entries) with the token-causal mask, as the last iterations of the same pipelined loop
    n_past_tiles = n_past * SUB
    for it in tl.range(0, c1 * SUB):
        blk = tl.load(idx_base + (it // SUB) * stride_ie)
        kpos = blk * BLOCK_KV + (it % SUB) * BLOCK_N + offs_n  # [BN] key positions
        kpos64 = kpos.to(tl.int64)
        kin = kpos < Lk  # only the last block can be incomplete
        k_ptrs = k_base + kpos64[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + kpos64[:, None] * stride_vn + offs_d[None, :]
        if EVEN_D:
            kt = tl.load(k_ptrs, mask=kin[:, None], other=0.0)  # [BN, BD]
            vt = tl.load(v_ptrs, mask=kin[:, None], other=0.0)
        else:
            kt = tl.load(k_ptrs, mask=kin[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_ptrs, mask=kin[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC)  # [BM, BN] raw logits
        if HAS_PAD:
            real = tl.load(pad_base + kpos64 * stride_pn, mask=kin, other=0) != 0  # [BN]
            s = tl.where(real[None, :], s, float("-inf"))  # a select, so a padded NaN key stays hidden
        if it >= n_past_tiles:  # diagonal / incomplete block (runtime branch, last iterations only)
            s = tl.where((kpos[None, :] <= qpos[:, None]) & kin[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, vt, qk_scale, False, UPCAST, DOT_PREC)

    # ---- 2. the pooled stream; each tile's list entries are loaded one iteration ahead
    blk_nx = tl.load(
        idx_base + _stream_entry(offs_n, c1, c2, c4, r2, e4, RP2, RP4, RP8) * stride_ie,
        mask=offs_n < n_rows, other=0,
    )
    for t in tl.range(0, tl.cdiv(n_rows, BLOCK_N)):
        vr = t * BLOCK_N + offs_n  # [BN] row of the stream
        ok = vr < n_rows
        in2 = vr < r2
        in4 = vr < e4
        blk = blk_nx  # [BN] block index of each row's entry
        lpos_nx = _stream_entry(vr + BLOCK_N, c1, c2, c4, r2, e4, RP2, RP4, RP8)
        blk_nx = tl.load(idx_base + lpos_nx * stride_ie, mask=vr + BLOCK_N < n_rows, other=0)
        prow = tl.where(
            in2,
            off2 + blk * RP2 + vr % RP2,
            tl.where(in4, off4 + blk * RP4 + (vr - r2) % RP4, off8 + blk * RP8 + (vr - e4) % RP8),
        )  # [BN] pyramid row
        bias = tl.where(in2, 1.0, tl.where(in4, 2.0, 3.0))  # log2 p
        bias = tl.where(ok, bias, float("-inf"))
        prow64 = prow.to(tl.int64)
        k_ptrs = kp_base + prow64[:, None] * stride_kpn + offs_d[None, :]
        v_ptrs = vp_base + prow64[:, None] * stride_vpn + offs_d[None, :]
        if EVEN_D:
            kt = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
            vt = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
        else:
            kt = tl.load(k_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC)
        s = s * qk_scale + bias[None, :]
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, vt, qk_scale, True, UPCAST, DOT_PREC)

    # ---- epilogue: rows that saw no key give zeros; a NaN/inf the row attended to stays visible (l_i or acc
    # non-finite, as in SDPA); rows of a malformed list give NaN
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o = tl.where(l_i[:, None] == 0.0, 0.0, o)
    o = tl.where(n_bad > 0, float("nan"), o)
    o_ptrs = (
        OUT + b64 * stride_ob + h64 * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    if EVEN_D:
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if HAS_LSE:  # natural-log log-sum-exp of the row's logits (pooled ones with their + ln p); -inf if none
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------- launcher
def _pow2_at_least_16(x: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 16 and (x & (x - 1)) == 0


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _pick_tiles(block_q: int, block_k: int, block_d: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: one fixed choice per (bq, bk, D, dtype) class.

    Sequence lengths never enter the choice. 128 x 128 tiles, 8 warps, 3 stages measured fastest for D 128
    in bf16 on an H200 (``NOTES.md``); larger heads or float32 shrink the tiles until Q plus the K/V stages
    fit in shared memory. Under the interpreter the tiles are the blocks themselves.
    """
    if _interpreting():
        return block_q, block_k, 4, 1
    elem = torch.empty((), dtype=dtype).element_size()
    bm = min(block_q, 128 if block_d <= 128 else 64)
    bn = min(block_k, 128 if block_d <= 128 else 64)
    stages = 3

    def smem(bm: int, bn: int, st: int) -> int:
        return (bm + 2 * st * bn) * block_d * elem

    while smem(bm, bn, stages) > 224 * 1024:
        if stages > 2:
            stages -= 1
        elif bn > 32:
            bn //= 2
        elif bm > 64:
            bm //= 2
        else:
            break
    return bm, bn, (8 if bm >= 128 else 4), stages


def _check_inputs(q, k, v, k_pooled, v_pooled, kv_idx, counts, block_q, block_k, factors, key_padding_mask, out):
    for name, t in (("q", q), ("k", k), ("v", v), ("k_pooled", k_pooled), ("v_pooled", v_pooled)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move every input to one device")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("k_pooled", k_pooled), ("v_pooled", v_pooled)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast the inputs to one dtype")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} (batch, head_dim)")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if Lq == 0 or Lq > Lk:
        raise ValueError(f"need 0 < Lq <= Lk, got Lq={Lq}, Lk={Lk}")
    if D > 256 or D < 1:
        raise NotImplementedError(f"head_dim {D} is not supported by the Triton kernel (1..256); use the reference")
    if not _pow2_at_least_16(block_q) or not _pow2_at_least_16(block_k):
        raise NotImplementedError(
            f"the Triton kernel needs block_q and block_k to be powers of two >= 16, got ({block_q}, {block_k}); "
            "use such block sizes or the reference backend"
        )
    factors = tuple(sorted(int(p) for p in factors))
    if any(p not in (2, 4, 8) for p in factors) or len(set(factors)) != len(factors):
        raise ValueError(f"factors must be distinct values from (2, 4, 8), got {factors}")
    nq, nk = cdiv(Lq, block_q), cdiv(Lk, block_k)
    rows = level_offsets(Lk // block_k, block_k, factors)[0]
    for name, t in (("k_pooled", k_pooled), ("v_pooled", v_pooled)):
        if t.shape[0] != B or t.shape[1] != Hkv or t.shape[2] < rows or (rows and t.shape[3] != D):
            raise ValueError(
                f"{name} must be [B, Hkv, >= {rows}, D] = [{B}, {Hkv}, {rows}, {D}] for factors {factors}, "
                f"got {tuple(t.shape)}"
            )
    for name, t, shape in (("kv_idx", kv_idx, (B, Hq, nq, nk)), ("counts", counts, (B, Hq, nq, len(FACTOR_ORDER)))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor (from build_block_lists)")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be a [B, Lk] = [{B}, {Lk}] tensor")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, Hq, Lq, D):
            raise ValueError(f"out must be a [B, Hq, Lq, D] = {(B, Hq, Lq, D)} tensor")
        if out.device != q.device or out.dtype not in _DTYPES:
            raise ValueError(f"out must be a float tensor on {q.device}, got {out.dtype} on {out.device}")
    if q.device.type != "cuda":
        # Checking costs nothing on the CPU; on the GPU the kernel marks such rows with NaN instead.
        missing = [c for c, p in enumerate(FACTOR_ORDER) if p != 1 and p not in factors]
        if missing and bool((counts[..., missing] != 0).any()):
            used = [FACTOR_ORDER[c] for c in missing if bool((counts[..., c] != 0).any())]
            raise ValueError(f"block list uses pool factors {used} but the pyramid holds only {factors}")
    return factors


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pooled: torch.Tensor,
    v_pooled: torch.Tensor,
    kv_idx: torch.Tensor,
    counts: torch.Tensor,
    out: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    factors: Tuple[int, ...],
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    tiles: Tuple[int, int, int, int],
    lse: Optional[torch.Tensor] = None,
) -> object:
    """Launch the kernel with explicit ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (inputs already checked).

    ``lse``: optional float32 ``[B, Hq, Lq]`` (last dimension contiguous) that receives each row's natural-log
    log-sum-exp (``-inf`` for rows that see no key), for merging with other partial attentions.

    Returns what the Triton launch returns (the compiled kernel).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bm, bn, num_warps, num_stages = tiles
    assert block_q % bm == 0 and block_k % bn == 0 and bm >= 16 and bn >= 16
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    rows = level_offsets(Lk // block_k, block_k, factors)
    if rows[0] > 0:
        kp, vp = _last_dim_contiguous(k_pooled), _last_dim_contiguous(v_pooled)
    else:  # no pyramid: never read, any valid pointer will do
        kp, vp = k, v
    if key_padding_mask is not None:
        pad = key_padding_mask
        if pad.dtype != torch.bool:
            pad = pad != 0
        pad = pad.view(torch.uint8)
        pad_strides = (pad.stride(0), pad.stride(1))
    else:
        pad, pad_strides = kv_idx, (0, 0)
    nq = cdiv(Lq, block_q)
    n_tiles_q = nq * (block_q // bm)
    if n_tiles_q > 65535:
        raise NotImplementedError(f"{n_tiles_q} query tiles exceed the grid limit 65535; use a larger block_q")
    block_d = max(16, triton.next_power_of_2(D))
    mask_w = triton.next_power_of_2((block_q - 1) // block_k + 2)
    upcast = _interpreting()
    grid = (B * Hq, n_tiles_q)
    lse_t, lse_strides = (lse, (lse.stride(0), lse.stride(1))) if lse is not None else (out, (0, 0))
    return _psa_fwd_kernel[grid](
        q, k, v, kp, vp, kv_idx, counts, pad, out, lse_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2),
        kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2), kv_idx.stride(3),
        counts.stride(0), counts.stride(1), counts.stride(2), counts.stride(3),
        pad_strides[0], pad_strides[1],
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse_strides[0], lse_strides[1],
        Hq, Hq // Hkv, Lq, Lk, n_tiles_q, float(scale) * _LOG2E,
        rows.get(2, 0), rows.get(4, 0), rows.get(8, 0),
        D=D,
        BLOCK_D=block_d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_Q=block_q,
        BLOCK_KV=block_k,
        MASK_W=mask_w,
        HAS_P2=2 in factors,
        HAS_P4=4 in factors,
        HAS_P8=8 in factors,
        HAS_PAD=key_padding_mask is not None,
        EVEN_D=block_d == D,
        UPCAST=upcast,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_LSE=lse is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )


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
    """Attention of every query block over its listed KV blocks, each at its own resolution (Triton).

    Same contract as ``naive.sparse_attention``: a full-resolution block is token-causal (key position
    ``<=`` query position ``Lk - Lq + r``) and honours ``key_padding_mask``; a block at factor ``p`` is read
    from the pyramid and every pooled logit gets ``+ ln p``. The list must come from ``build_block_lists``
    (pooled entries only on poolable blocks). Rows with no key to attend to give zeros.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (same dtype: float16, bfloat16 or float32; any strides).
        k_pooled, v_pooled: ``[B, Hkv, R, D]`` pyramid from ``pyramid_pool`` with ``factors``.
        kv_idx, counts: int32 block lists ``[B, Hq, nq, nk]`` and ``[B, Hq, nq, 4]`` (``assign/naive.py``).
        block_q, block_k: Block sizes ``bq``, ``bk`` (powers of two >= 16).
        factors: Pool factors present in the pyramid (ascending); a listed factor not in it is an error
            (``ValueError`` on CPU tensors; NaN rows on CUDA, where checking would synchronise).
        scale: Softmax scale, ``1/sqrt(D)`` if ``None``.
        key_padding_mask: Optional bool ``[B, Lk]``, ``True`` for real keys.
        out: Optional ``[B, Hq, Lq, D]`` tensor (any strides, e.g. a transposed ``[B, Lq, Hq, D]`` buffer).

    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype (``out`` if given).
    """
    factors = _check_inputs(
        q, k, v, k_pooled, v_pooled, kv_idx, counts, block_q, block_k, factors, key_padding_mask, out
    )
    B, Hq, Lq, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    target = out
    if out is None:
        target = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    elif D > 1 and out.stride(-1) != 1:
        target = torch.empty(B, Hq, Lq, D, dtype=out.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    _launch(
        q, k, v, k_pooled, v_pooled, kv_idx, counts, target,
        block_q=block_q,
        block_k=block_k,
        factors=factors,
        scale=scale,
        key_padding_mask=key_padding_mask,
        tiles=_pick_tiles(block_q, block_k, block_d, q.dtype),
    )
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
