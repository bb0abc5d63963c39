"""PSA attention on FlashAttention-4's block-sparse forward (Hopper and newer): same contract as
``naive.sparse_attention``.

What it computes: the PSA attention of step 7 (``docs/PSA_SEMANTICS.md``) decomposed by level. A block list
(``kv_idx`` / ``counts`` from ``build_block_lists``) holds, per (batch, query head, query block), the kept KV
blocks ordered by factor (1, 2, 4, 8). Each factor becomes one block-sparse FlashAttention launch that returns
its partial output ``O_p`` and log-sum-exp ``lse_p`` (natural log, over ``scale * q . k`` of that launch's keys):

- factor 1: queries against the full-resolution ``k``/``v`` with ``causal=True`` (bottom-right aligned, as
  FlashAttention aligns ``Lq < Lk``), sparse blocks ``(bq, bk)``; the causal diagonal is one of its blocks;
- factor ``p``: queries against the pooled level ``K^p``/``V^p`` of the pyramid (non-causal: pooled blocks lie
  wholly in the past of their query block), sparse blocks ``(bq, bk / p)``.

By default (``TRITON_POOLED_FACTORS = (4, 8)``) the 4x- and 8x-pooled levels instead run together in one launch
that packs several pooled blocks into one 128-row tile (FlashAttention-4 shrinks its KV tile to ``bk / p`` = 32
and 16 rows there): ``pooled_launch``, the Gluon kernel of ``hopper.py`` on Hopper (compute capability 9.x,
Triton >= 3.6; 26% less time than the Triton kernel's pooled stream, outputs within 1e-4), the Triton kernel's
pooled stream elsewhere or where the Gluon kernel cannot run the call (``hopper.pooled_unsupported``, logged once
per reason) or failed to compile with this Triton (logged once; the Triton kernel for the rest of the process).
That launch writes its own log-sum-exp, which already holds the ``+ ln p`` of its pooled logits. Measured on an
H200 the packed launch made the attend stage 0-8% faster than one FlashAttention-4 launch per level, and the
Gluon kernel another 1-5% (1-2% in the final tree's run; ``NOTES_fa4.md`` v2, v6), its warpgroups' ping-pong
another 2-3% of the whole call (v10).

The merge then weights each partial by ``exp(lse_p + ln p - LSE)`` with ``LSE = logsumexp_p(lse_p + ln p)``.
Adding ``ln p`` to a level's log-sum-exp is the same as adding ``ln p`` to every pooled logit (PSA's bias), so no
score modification runs inside the attention kernel. Levels a row does not use (count 0) get weight 0, rows that
see no key give zeros, and a NaN or ``+inf`` in any level's statistics propagates to the row (as in SDPA).

The launches other than factor 1's run on a side stream (``CONCURRENT_LEVELS``), joined before the merge.

``attend_by_levels`` is the decomposition with the level launch and the merge passed in: the GPU path passes
``flash_attn_level`` and the Triton ``merge_levels``; the CPU tests pass ``emulate_level`` (plain PyTorch, the
same block lists) and ``merge_levels_reference``, and check the result against ``naive.sparse_attention``.

Limits of the FlashAttention-4 path (``fa4_unsupported`` names the first one that applies; ``sparse_attention``
then runs the Triton kernel and logs it once per reason): CUDA device of compute capability 9.x or newer,
``flash-attn-4`` importable (``pip install "psa-vlm[fa4]"``), float16/bfloat16, ``bq = bk = 128`` (the blocks
verified on a GPU; FlashAttention-4's SM90 forward tiles queries by 128 and shrinks its KV tile to ``bk / p``),
head_dim a multiple of 8 up to 256, no ``key_padding_mask``
(FlashAttention has no per-key padding for left-padded batches).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import gluon_support
from ..geometry import FACTOR_ORDER, cdiv, level_offsets
from .kernel import _interpreting

__all__ = [
    "FA4_INSTALL_HINT",
    "fa4_import_error",
    "fa4_available",
    "fa4_unsupported",
    "level_block_lists",
    "emulate_level",
    "flash_attn_level",
    "merge_levels_reference",
    "merge_levels",
    "attend_by_levels",
    "TRITON_POOLED_FACTORS",
    "CONCURRENT_LEVELS",
    "POOLED_OVERRIDES",
    "pooled_engine",
    "pooled_launch",
    "triton_pooled_launch",
    "sparse_attention",
    "dense_attention",
]

logger = logging.getLogger(__name__)

#: What to install for this backend.
FA4_INSTALL_HINT = 'pip install "psa-vlm[fa4]"  (FlashAttention-4, package flash-attn-4, CUDA 12.8+/13, Hopper or newer)'

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_warned: set = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


# ---------------------------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def fa4_import_error() -> Optional[str]:
    """``None`` when FlashAttention-4's block-sparse forward imports, else why not (cached; imports on first call).

    The first import takes several seconds (CuTe DSL); nothing imports it at ``import psa_vlm`` time.
    """
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
        from flash_attn.cute.interface import flash_attn_func  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/driver error raised while the DSL loads
        return f"{type(exc).__name__}: {exc}"
    return None


def fa4_available(device: Optional[torch.device] = None) -> bool:
    """Whether the ``"fa4"`` backend can run on ``device`` (default: the current CUDA device).

    Needs a CUDA device of compute capability 9.x or newer and an importable ``flash-attn-4``.
    """
    if not torch.cuda.is_available():
        return False
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return fa4_import_error() is None


def fa4_unsupported(
    q: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    factors: Sequence[int],
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """``None`` if the FlashAttention-4 path can run this call, else the reason (for the fallback's log line)."""
    D = q.shape[-1]
    if q.device.type != "cuda":
        return f"tensors on {q.device} (FlashAttention-4 needs CUDA)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (FlashAttention-4 runs float16/bfloat16)"
    if (block_q, block_k) != (128, 128):
        # FlashAttention-4's SM90 forward tiles queries by 128 and shrinks its KV tile to bk / p; other block
        # sizes are expressible in principle but not verified on a GPU
        return f"blocks ({block_q}, {block_k}) (the fa4 path runs and is verified with 128 x 128 blocks)"
    if D % 8 or not (8 <= D <= 256):
        return f"head_dim={D} (FlashAttention-4 on Hopper needs a multiple of 8 in [8, 256])"
    if key_padding_mask is not None:
        return "a key_padding_mask (FlashAttention-4 has no per-key padding for left-padded batches)"
    if not fa4_available(q.device):
        err = fa4_import_error()
        if err is not None:
            return f"flash-attn-4 is not importable ({err}); {FA4_INSTALL_HINT}"
        return f"compute capability {torch.cuda.get_device_capability(q.device)} < 9.0"
    return None


# ---------------------------------------------------------------------------------------------- block lists
def level_block_lists(
    kv_idx: torch.Tensor, counts: torch.Tensor, n_blocks: Sequence[int], tail_from: Optional[int] = None
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Split PSA block lists into one left-packed list per factor (1, 2, 4, 8).

    Args:
        kv_idx: int32 ``[B, Hq, nq, nk]``, entries ordered by factor then block index (``build_block_lists``).
        counts: int32 ``[B, Hq, nq, 4]``, entries per factor ``FACTOR_ORDER``.
        n_blocks: Index width of each factor's list (``nk`` for factor 1, complete blocks ``Lk // bk`` for the
            pooled ones): the KV blocks of that launch; 0 for a factor that is not launched.

        tail_from: With a factor column ``c`` (1..3), a fifth pair is appended: the entries of factors
            ``FACTOR_ORDER[c:]`` left-packed into a ``[B, Hq, nq, nk]`` list, with counts ``[B, Hq, nq, 4]`` whose
            columns before ``c`` are 0 (a block list of those factors alone, for the Triton kernel).

    Returns:
        Four ``(count int32 [B, Hq, nq], idx int32 [B, Hq, nq, max(n_blocks[c], 1)])`` pairs, contiguous (and the
        tail pair). The factor-1 list is ``kv_idx`` itself (its entries come first); entries past ``count`` are
        unspecified. One Triton launch on CUDA (or under the interpreter), PyTorch gathers otherwise; no host
        synchronisation.
    """
    nk = kv_idx.shape[-1]
    lead = kv_idx.shape[:-1]
    cnts = [counts[..., c].contiguous() for c in range(len(FACTOR_ORDER))]
    widths = [max(int(w), 1) for w in n_blocks]
    first = kv_idx.contiguous() if widths[0] == nk else None
    use_triton = kv_idx.is_cuda or _interpreting()
    outs: List[Optional[torch.Tensor]] = [first]
    for c in range(1, len(FACTOR_ORDER)):
        outs.append(torch.empty(lead + (widths[c],), dtype=torch.int32, device=kv_idx.device))
    if first is None:
        outs[0] = torch.empty(lead + (widths[0],), dtype=torch.int32, device=kv_idx.device)
    tail = None
    if tail_from is not None:
        if not 1 <= tail_from < len(FACTOR_ORDER):
            raise ValueError(f"tail_from must be a pooled factor column 1..3, got {tail_from}")
        tail = torch.full(lead + (max(nk, 1),), -1, dtype=torch.int32, device=kv_idx.device)
    rows = kv_idx.numel() // max(nk, 1)
    if rows and nk and use_triton:
        idx2 = kv_idx.reshape(rows, nk)
        cnt2 = counts.reshape(rows, len(FACTOR_ORDER))
        _split_kernel[(rows,)](
            idx2, cnt2, outs[0], outs[1], outs[2], outs[3], tail if tail is not None else outs[3],
            idx2.stride(0), cnt2.stride(0), *widths, nk, tail_from or 0,
            WRITE_FIRST=first is None, WRITE_TAIL=tail is not None, BLOCK=max(16, triton.next_power_of_2(nk)),
            num_warps=4,
        )
    elif rows and nk:
        c = counts.to(torch.int64)
        starts = torch.cumsum(c, dim=-1) - c
        for col in range(len(FACTOR_ORDER)):
            if col == 0 and first is not None:
                continue
            pos = starts[..., col : col + 1] + torch.arange(widths[col], device=kv_idx.device)
            outs[col] = kv_idx.gather(-1, pos.clamp(max=nk - 1)).to(torch.int32).contiguous()
        if tail is not None:
            pos = starts[..., tail_from : tail_from + 1] + torch.arange(nk, device=kv_idx.device)
            tail = kv_idx.gather(-1, pos.clamp(max=nk - 1)).to(torch.int32).contiguous()
    res = [(cnts[c], outs[c]) for c in range(len(FACTOR_ORDER))]
    if tail is not None:
        tcounts = counts.clone()
        tcounts[..., :tail_from] = 0
        res.append((tcounts, tail))
    return res


#: Integer arguments that change with the sequence length: not specialised by Triton (no recompilation when a
#: new length is, or is not, a multiple of 16). Measured cost of a new length: docs/PERFORMANCE.md.
_SPLIT_LENGTH_ARGS = ("stride_i", "W1", "W2", "W4", "W8", "WT")


@triton.jit(do_not_specialize=_SPLIT_LENGTH_ARGS)
def _split_kernel(
    idx_ptr, cnt_ptr, o1_ptr, o2_ptr, o4_ptr, o8_ptr, tail_ptr, stride_i, stride_c, W1, W2, W4, W8, WT, TAIL_COL,
    WRITE_FIRST: tl.constexpr, WRITE_TAIL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One list row: copy each factor's entries (a contiguous run of the row) to the front of its own list."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    c1 = tl.load(cnt_ptr + row * stride_c + 0)
    c2 = tl.load(cnt_ptr + row * stride_c + 1)
    c4 = tl.load(cnt_ptr + row * stride_c + 2)
    c8 = tl.load(cnt_ptr + row * stride_c + 3)
    total = c1 + c2 + c4 + c8
    e = tl.load(idx_ptr + row * stride_i + offs, mask=offs < total, other=0)  # [BLOCK]
    # every store is bounded by its list's width (a factor that is not launched gets a width-1 list)
    if WRITE_FIRST:
        tl.store(o1_ptr + row * W1 + offs, e, mask=(offs < c1) & (offs < W1))
    s2 = c1
    s4 = s2 + c2
    s8 = s4 + c4
    tl.store(o2_ptr + row * W2 + (offs - s2), e, mask=(offs >= s2) & (offs < s4) & (offs - s2 < W2))
    tl.store(o4_ptr + row * W4 + (offs - s4), e, mask=(offs >= s4) & (offs < s8) & (offs - s4 < W4))
    tl.store(o8_ptr + row * W8 + (offs - s8), e, mask=(offs >= s8) & (offs < total) & (offs - s8 < W8))
    if WRITE_TAIL:
        st = tl.where(TAIL_COL == 1, s2, tl.where(TAIL_COL == 2, s4, s8))
        tl.store(tail_ptr + row * WT + (offs - st), e, mask=(offs >= st) & (offs < total) & (offs - st < WT))


# ---------------------------------------------------------------------------------------------- level launches
def emulate_level(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    count: torch.Tensor,
    idx: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What one block-sparse FlashAttention launch computes, in plain PyTorch (float32; for tests).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (one level: full resolution or one pooled level).
        count, idx: The level's list (``level_block_lists``): query block ``i`` of ``(b, h)`` sees the KV blocks
            ``idx[b, h, i, :count[b, h, i]]`` of ``block_kv`` keys each.
        block_q, block_kv: Sparse block sizes.
        causal: Bottom-right causal mask (key ``j`` visible to query row ``r`` when ``j <= Lk - Lq + r``).
        scale: Softmax scale.

    Returns:
        ``(out [B, Lq, Hq, D] in q's dtype, lse float32 [B, Hq, Lq])``: natural-log log-sum-exp of
        ``scale * q . k`` over the row's visible listed keys, ``-inf`` (and zeros) where none.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nq, nkb = cdiv(Lq, block_q), cdiv(Lk, block_kv)
    slot = torch.arange(idx.shape[-1], device=q.device)
    valid = slot < count[..., None].long()  # [B, Hq, nq, W]
    blocks = torch.zeros(B, Hq, nq, nkb + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(valid, idx.long(), torch.full_like(idx, nkb, dtype=torch.long)), True)
    blocks = blocks[..., :nkb]
    rows = torch.arange(Lq, device=q.device)
    keys = torch.arange(Lk, device=q.device)
    allowed = blocks[:, :, rows // block_q][..., keys // block_kv]  # [B, Hq, Lq, Lk]
    if causal:
        allowed = allowed & (keys[None, :] <= (Lk - Lq + rows)[:, None])
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    logits = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is allowed
    p = torch.exp(logits - torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)[..., None])
    o = torch.matmul(p, vf)
    return o.transpose(1, 2).contiguous().to(q.dtype), lse  # FlashAttention's [B, Lq, Hq, D] layout


def flash_attn_level(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    count: torch.Tensor,
    idx: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block-sparse FlashAttention-4 launch with ``emulate_level``'s contract (CUDA, float16/bfloat16).

    ``q``/``k``/``v`` go in as ``[B, L, H, D]`` transposed views (no copies); the list as the launch's sparse
    blocks of size ``(block_q, block_kv)``. The blocks go in as *full* blocks (no mask_mod; the causal mask of
    ``causal=True`` and the key-length mask still apply in them) with an empty masked list: FlashAttention-4's
    SM90 producer walks the full list whenever the masked list is empty, so that list must exist.
    """
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    sparse = BlockSparseTensorsTorch(
        mask_block_cnt=torch.zeros_like(count),
        mask_block_idx=idx,
        full_block_cnt=count,
        full_block_idx=idx,
        block_size=(block_q, block_kv),
    )
    out, lse = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,
        block_sparse_tensors=sparse,
        return_lse=True,
    )
    return out, lse


# ---------------------------------------------------------------------------------------------- merge
def merge_levels_reference(
    outs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    log_bias: Sequence[float],
    used: Sequence[torch.Tensor],
    block_q: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Merge level partials (plain PyTorch): ``out = sum_l exp(lse_l + b_l - LSE) * O_l``.

    Args:
        outs: Partial outputs ``[B, Lq, Hq, D]``, one per level.
        lses: float32 ``[B, Hq, Lq]`` natural-log log-sum-exps, one per level.
        log_bias: ``ln p`` of each level.
        used: int ``[B, Hq, nq]`` list counts per level; a level with count 0 gets weight 0 for that query block.
        block_q: Query block size (maps rows to query blocks).
        out: ``[B, Hq, Lq, D]`` destination (any strides).

    Returns:
        ``out``. Rows where no level has a key are zeros; NaN/``+inf`` statistics propagate.
    """
    Lq = lses[0].shape[-1]
    qblk = torch.arange(Lq, device=out.device) // block_q
    terms = []
    for lse, b, u in zip(lses, log_bias, used):
        on = (u[..., qblk] > 0)  # [B, Hq, Lq]
        terms.append(torch.where(on, lse.float() + b, torch.full_like(lse, float("-inf"), dtype=torch.float32)))
    t = torch.stack(terms)  # [n, B, Hq, Lq]
    m = t.amax(0)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w = torch.exp(t - m)  # exp(-inf) = 0 for unused levels
    den = w.sum(0)
    acc = sum(wl[..., None] * o.float().transpose(1, 2) for wl, o in zip(w, outs))
    res = torch.where(den[..., None] > 0, acc / torch.where(den > 0, den, torch.ones_like(den))[..., None], acc * 0)
    out.copy_(res.to(out.dtype))
    return out


#: Integer arguments that change with the sequence length: not specialised by Triton (no recompilation when a
#: new length is, or is not, a multiple of 16). Measured cost of a new length: docs/PERFORMANCE.md.
_MERGE_LENGTH_ARGS = ("stride_lb", "stride_lh", "stride_ub", "stride_uh", "Lq")


@triton.jit(do_not_specialize=_MERGE_LENGTH_ARGS)
def _merge_kernel(
    o_ptr,  # 4 partial outputs, stacked pointers via offsets
    o1_ptr,
    o2_ptr,
    o3_ptr,
    l0_ptr,
    l1_ptr,
    l2_ptr,
    l3_ptr,
    u0_ptr,
    u1_ptr,
    u2_ptr,
    u3_ptr,
    out_ptr,
    stride_ob,
    stride_ol,
    stride_oh,  # partial outputs [B, Lq, Hq, D], last dim contiguous (same strides for all)
    stride_lb,
    stride_lh,  # lse [B, Hq, Lq], last dim contiguous
    stride_ub,
    stride_uh,  # used [B, Hq, nq], last dim contiguous
    stride_yb,
    stride_yh,
    stride_yl,
    stride_yd,  # out [B, Hq, Lq, D]
    Hq,
    Lq,
    D,
    b0,
    b1,
    b2,
    b3,  # ln p of each level
    N_LEVELS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < Lq
    qb = (pid_r * BLOCK_R) // BLOCK_Q  # BLOCK_R divides BLOCK_Q: one query block per program
    lbase = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    ubase = b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + qb
    neg = float("-inf")
    t0 = tl.load(l0_ptr + lbase + rows, mask=rmask, other=neg) + b0
    t0 = tl.where(tl.load(u0_ptr + ubase) > 0, t0, neg)
    m = t0
    if N_LEVELS > 1:
        t1 = tl.load(l1_ptr + lbase + rows, mask=rmask, other=neg) + b1
        t1 = tl.where(tl.load(u1_ptr + ubase) > 0, t1, neg)
        m = tl.maximum(m, t1, propagate_nan=tl.PropagateNan.ALL)
    if N_LEVELS > 2:
        t2 = tl.load(l2_ptr + lbase + rows, mask=rmask, other=neg) + b2
        t2 = tl.where(tl.load(u2_ptr + ubase) > 0, t2, neg)
        m = tl.maximum(m, t2, propagate_nan=tl.PropagateNan.ALL)
    if N_LEVELS > 3:
        t3 = tl.load(l3_ptr + lbase + rows, mask=rmask, other=neg) + b3
        t3 = tl.where(tl.load(u3_ptr + ubase) > 0, t3, neg)
        m = tl.maximum(m, t3, propagate_nan=tl.PropagateNan.ALL)
    m = tl.where(m == neg, 0.0, m)  # rows that see nothing: every weight is exp(-inf) = 0
    obase = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    optrs = obase + rows.to(tl.int64)[:, None] * stride_ol + dd[None, :]
    omask = rmask[:, None] & (dd < D)[None, :]
    w = tl.exp(t0 - m)
    den = w
    acc = w[:, None] * tl.load(o_ptr + optrs, mask=omask, other=0.0).to(tl.float32)
    if N_LEVELS > 1:
        w = tl.exp(t1 - m)
        den += w
        acc += w[:, None] * tl.load(o1_ptr + optrs, mask=omask, other=0.0).to(tl.float32)
    if N_LEVELS > 2:
        w = tl.exp(t2 - m)
        den += w
        acc += w[:, None] * tl.load(o2_ptr + optrs, mask=omask, other=0.0).to(tl.float32)
    if N_LEVELS > 3:
        w = tl.exp(t3 - m)
        den += w
        acc += w[:, None] * tl.load(o3_ptr + optrs, mask=omask, other=0.0).to(tl.float32)
    # den == 0 only where every level is unused: zeros (NaN in den propagates through the division)
    res = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    yptrs = (out_ptr + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh
             + rows.to(tl.int64)[:, None] * stride_yl + dd[None, :] * stride_yd)
    tl.store(yptrs, res.to(out_ptr.dtype.element_ty), mask=omask)


def merge_levels(
    outs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    log_bias: Sequence[float],
    used: Sequence[torch.Tensor],
    block_q: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``merge_levels_reference`` as one Triton kernel (one read of every partial, one write of ``out``).

    Partial outputs must share one ``[B, Lq, Hq, D]`` layout with a contiguous last dimension (FlashAttention's
    output layout); ``lse`` and ``used`` need a contiguous last dimension. ``out`` may alias a partial output
    (each program reads its rows before writing them).
    """
    n = len(outs)
    if not 1 <= n <= 4:
        raise ValueError(f"merge_levels takes 1 to 4 levels, got {n}")
    o0 = outs[0]
    B, Lq, Hq, D = o0.shape
    for o in outs:
        if o.stride() != o0.stride() or o.stride(-1) != 1:
            raise ValueError("partial outputs must share one layout with a contiguous last dimension")
    lses = [t if t.stride(-1) == 1 else t.contiguous() for t in lses]
    used = [t if t.stride(-1) == 1 else t.contiguous() for t in used]
    pad = lambda seq: list(seq) + [seq[0]] * (4 - len(seq))  # noqa: E731
    O, L, U, Bi = pad(list(outs)), pad(lses), pad(used), list(log_bias) + [0.0] * (4 - n)
    block_r = min(64, block_q)
    block_d = max(16, triton.next_power_of_2(D))
    grid = (B * Hq, cdiv(Lq, block_r))
    _merge_kernel[grid](
        *O, *L, *U, out,
        o0.stride(0), o0.stride(1), o0.stride(2),
        L[0].stride(0), L[0].stride(1),
        U[0].stride(0), U[0].stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        Hq, Lq, D, *[float(x) for x in Bi],
        N_LEVELS=n, BLOCK_Q=block_q, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------- decomposition
LevelFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
MergeFn = Callable[..., torch.Tensor]

#: Issue the launches other than factor 1's on a second CUDA stream (``attend_by_levels``), so that they run on the
#: SMs the factor-1 launch's last tiles leave idle instead of after it. ``False`` issues everything on the caller's
#: stream. Outputs are the same either way (the same kernels on the same inputs; the merge's order is fixed).
CONCURRENT_LEVELS: bool = True


def _side_stream(q: torch.Tensor) -> Optional["torch.cuda.Stream"]:
    """A stream from PyTorch's per-device pool for ``attend_by_levels``' other launches, or ``None`` (CPU tensors,
    ``CONCURRENT_LEVELS`` off). Drawn per call: no stream is kept between calls."""
    if not (CONCURRENT_LEVELS and q.is_cuda):
        return None
    return torch.cuda.Stream(device=q.device)


def attend_by_levels(
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
    scale: float,
    out: torch.Tensor,
    launch: LevelFn,
    merge: MergeFn,
    pooled_launch: Optional[Callable[..., None]] = None,
    pooled_factors: Sequence[int] = (),
) -> torch.Tensor:
    """PSA attention as one launch per factor plus an LSE merge (module docstring).

    Every enabled factor is launched even where no row lists it (no host synchronisation to find out); its
    count-0 rows cost one early exit per program and get weight 0 in the merge.

    Issue order: the factor-1 launch first, on the caller's stream. With ``CONCURRENT_LEVELS`` (default), CUDA
    tensors and more than one launch, the others go to a side stream from PyTorch's pool, which first waits for
    the caller's stream; the caller's stream waits for the side stream before the merge (the side outputs are
    marked as used there). They then run on the SMs that factor 1's last tiles leave idle. Outputs are the same
    either way. Measured on an H200: 0.6-2.0% less time per ``run_psa`` call at 64k / 128k tokens, 0.5% less
    TTFT at 64k and none at 128k (``eval/results/devcheck_streams_aac386c.json``, interleaved A/B).

    ``pooled_launch`` (with ``pooled_factors``, the largest factors, e.g. ``(4, 8)``) runs those factors in one
    launch instead: ``pooled_launch(q, k, v, k_pooled, v_pooled, kv_idx_t, counts_t, out=[B, Hq, Lq, D] view,
    lse=float32 [B, Hq, Lq])`` over a list of those factors alone; its log-sum-exp already holds the ``+ ln p``
    of every pooled logit (the Triton kernel's), so it enters the merge with bias 0.
    """
    Lk = k.shape[2]
    nkf = Lk // block_k
    factors = tuple(sorted(int(p) for p in factors))
    offs = level_offsets(nkf, block_k, factors)
    tri = tuple(sorted(int(p) for p in pooled_factors if int(p) in factors)) if pooled_launch is not None else ()
    if tri and tri != factors[len(factors) - len(tri):]:
        raise ValueError(f"pooled_factors {tri} must be the largest of the enabled factors {factors}")
    widths = [cdiv(Lk, block_k)] + [nkf if (p in factors and p not in tri) else 0 for p in FACTOR_ORDER[1:]]
    tail_from = FACTOR_ORDER.index(tri[0]) if (tri and nkf) else None
    lists = level_block_lists(kv_idx, counts, widths, tail_from=tail_from)
    # (output slot, launch) with each slot's merge bias and used counts; the merge reads the partials in slot
    # order whatever the order of issue
    jobs: List[Tuple[int, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]] = []
    bias, used = [], []
    first = None  # slot of the factor-1 launch
    if tail_from is not None:
        B, Hq, Lq, D = q.shape
        tcounts, tidx = lists[4]
        o_t = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=q.device)
        lse_t = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)

        def _tail(o_t=o_t, lse_t=lse_t, tidx=tidx, tcounts=tcounts):
            pooled_launch(q, k, v, k_pooled, v_pooled, tidx, tcounts, out=o_t.transpose(1, 2), lse=lse_t)
            return o_t, lse_t

        jobs.append((len(bias), _tail))
        bias.append(0.0)
        used.append(tcounts.sum(-1, dtype=torch.int32))
    for col, p in enumerate(FACTOR_ORDER):
        if p != 1 and (p not in factors or nkf == 0 or p in tri):
            continue
        cnt, idx = lists[col]
        if p == 1:
            kl, vl = k, v
            first = len(bias)
        else:
            rows = nkf * (block_k // p)
            kl = k_pooled[:, :, offs[p] : offs[p] + rows]
            vl = v_pooled[:, :, offs[p] : offs[p] + rows]

        def _level(kl=kl, vl=vl, cnt=cnt, idx=idx, p=p):
            return launch(q, kl, vl, cnt, idx, block_q=block_q, block_kv=block_k // p, causal=p == 1, scale=scale)

        jobs.append((len(bias), _level))
        bias.append(math.log(p))
        used.append(cnt)
    # factor 1 (the largest launch) is issued first on the caller's stream; with a side stream the others go there,
    # where they take the SMs that factor 1's last tiles leave idle
    jobs.sort(key=lambda job: job[0] != first)
    outs: List[Optional[torch.Tensor]] = [None] * len(jobs)
    lses: List[Optional[torch.Tensor]] = [None] * len(jobs)
    side = _side_stream(q) if len(jobs) > 1 else None
    main = torch.cuda.current_stream(q.device) if side is not None else None
    if side is not None:
        side.wait_stream(main)  # the lists, the pyramid and q / k / v are ready
    for n, (slot, fn) in enumerate(jobs):
        if side is None or n == 0:
            outs[slot], lses[slot] = fn()
            continue
        with torch.cuda.stream(side):
            o, lse = fn()
        o.record_stream(main)  # allocated on the side stream, read by the merge on the caller's
        lse.record_stream(main)
        outs[slot], lses[slot] = o, lse
    if side is not None:
        main.wait_stream(side)
    return merge(outs, lses, bias, used, block_q, out)


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
    """Attention of every query block over its listed KV blocks, each at its own resolution (FlashAttention-4).

    Same contract as ``naive.sparse_attention``. Calls the FlashAttention-4 path cannot express
    (``fa4_unsupported``: padding, float32, block sizes, head_dim, no flash-attn-4) run the Triton kernel
    instead, with one log line per reason.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (float16 or bfloat16; any strides with a contiguous
            last dimension).
        k_pooled, v_pooled: ``[B, Hkv, R, D]`` pyramid from ``pyramid_pool`` with ``factors``.
        kv_idx, counts: int32 block lists ``[B, Hq, nq, nk]`` and ``[B, Hq, nq, 4]`` (``assign/naive.py``).
        block_q, block_k: Block sizes ``bq`` (multiple of 128), ``bk``.
        factors: Pool factors present in the pyramid (ascending).
        scale: Softmax scale, ``1/sqrt(D)`` if ``None``.
        key_padding_mask: Optional bool ``[B, Lk]`` (sends the call to the Triton kernel).
        out: Optional ``[B, Hq, Lq, D]`` tensor (any strides) to write into.

    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype (``out`` if given).
    """
    from . import kernel as triton_kernel

    reason = fa4_unsupported(q, block_q=block_q, block_k=block_k, factors=factors, key_padding_mask=key_padding_mask)
    if reason is not None:
        _warn_once(reason, "PSA fa4 backend: Triton kernel for this call: %s", reason)
        return triton_kernel.sparse_attention(
            q, k, v, k_pooled, v_pooled, kv_idx, counts, block_q=block_q, block_k=block_k, factors=factors,
            scale=scale, key_padding_mask=key_padding_mask, out=out,
        )
    # the Triton launcher's validation (shapes, dtypes, list layout) applies unchanged
    factors = triton_kernel._check_inputs(
        q, k, v, k_pooled, v_pooled, kv_idx, counts, block_q, block_k, factors, key_padding_mask, out
    )
    B, Hq, Lq, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    return attend_by_levels(
        q, k, v, k_pooled, v_pooled, kv_idx, counts, block_q=block_q, block_k=block_k, factors=factors,
        scale=float(scale), out=out, launch=flash_attn_level, merge=merge_levels,
        pooled_launch=functools.partial(pooled_launch, block_q=block_q, block_k=block_k, factors=factors,
                                        scale=float(scale)),
        pooled_factors=TRITON_POOLED_FACTORS,
    )


#: Pooled factors that run in one Triton launch (whose pooled stream packs several pooled blocks into one
#: 128-row tile) instead of one FlashAttention-4 launch each (whose KV tile shrinks to ``bk / p`` rows); ``()``
#: runs every factor on FlashAttention-4. Chosen by measurement (``NOTES_fa4.md``).
TRITON_POOLED_FACTORS: Tuple[int, ...] = (4, 8)


#: Overrides of ``pooled_launch``'s engine for benchmarks and tests, empty by default: ``GLUON`` (the Gluon kernel
#: on / off; ``True`` raises where it cannot run instead of falling back), ``GLUON_TILES`` (a dict over
#: ``hopper.TILES``).
POOLED_OVERRIDES: dict = {}
#: Why the pooled Gluon kernel failed to compile in this process (then the Triton kernel runs); ``None`` until then.
_POOLED_GLUON_FAILURE: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _pooled_gluon_import_error() -> Optional[str]:
    """``None`` when ``hopper.py`` imports with this Triton (>= ``gluon_support.GLUON_MIN_TRITON``), else why."""
    return gluon_support.import_error(lambda: importlib.import_module(".hopper", __package__))


def pooled_engine(q: torch.Tensor, k_pooled: torch.Tensor, v_pooled: torch.Tensor, *, block_q: int, block_k: int,
                  factors: Sequence[int], out: Optional[torch.Tensor] = None,
                  lse: Optional[torch.Tensor] = None) -> Tuple[str, Optional[str]]:
    """Which kernel ``pooled_launch`` runs for this call: ``("gluon", None)`` or ``("triton", reason)``.

    The Gluon kernel (``hopper.py``) needs a compute capability 9.x CUDA device outside the interpreter, Triton >= 3.6
    with its Gluon API (``hopper.py`` imports, and has not failed to compile in this process), and a call it supports
    (``hopper.pooled_unsupported``: float16 / bfloat16 throughout, head_dim 64 / 128, ``bq`` a multiple of 128, ``bk``
    a power of two giving runs of >= 8 pyramid rows, a contiguous pyramid, ``out`` / ``lse`` with a contiguous last
    dimension). ``POOLED_OVERRIDES["GLUON"] = False`` always picks the Triton kernel. Arguments as
    ``pooled_launch``; nothing is read back from the GPU.
    """
    if POOLED_OVERRIDES.get("GLUON", True) is False:
        return "triton", "disabled by POOLED_OVERRIDES"
    if not gluon_support.hopper_device(q, _interpreting()):
        return "triton", "not a compute capability 9.x CUDA device"
    reason = _pooled_gluon_import_error()
    if reason is None and _POOLED_GLUON_FAILURE is not None:
        reason = f"failed to compile earlier in this process ({_POOLED_GLUON_FAILURE})"
    if reason is None:
        from . import hopper

        reason = hopper.pooled_unsupported(q, k_pooled, v_pooled, block_q=block_q, block_k=block_k, factors=factors,
                                           out=out, lse=lse, tiles=_pooled_tiles())
    return ("gluon", None) if reason is None else ("triton", reason)


def _pooled_tiles() -> dict:
    from . import hopper

    return dict(hopper.TILES, **POOLED_OVERRIDES.get("GLUON_TILES", {}))


def pooled_launch(
    q, k, v, k_pooled, v_pooled, kv_idx, counts, *, out, lse, block_q: int, block_k: int,
    factors: Sequence[int], scale: float,
) -> None:
    """Attention of every query block over the pooled entries of its block list, in one launch, on the kernel
    ``pooled_engine`` picks (``attend_by_levels``' ``pooled_launch``; the Gluon kernel's outputs agree with the
    Triton kernel's to a relative 1e-4 on an H200: its uniform-tile softmax rounds differently, ``NOTES_fa4.md``
    v10).

    Args:
        q: ``[B, Hq, Lq, D]`` float16 / bfloat16; k, v: ``[B, Hkv, Lk, D]`` (only ``Lk`` is read).
        k_pooled, v_pooled: ``[B, Hkv, R, D]`` pyramid of ``factors`` (``pyramid_pool``).
        kv_idx, counts: int32 ``[B, Hq, nq, nk]`` / ``[B, Hq, nq, 4]`` list of pooled entries only (the tail list
            of ``level_block_lists``; its factor-1 count is 0).
        out: ``[B, Hq, Lq, D]`` receiving the partial attention (rows without entries: zeros).
        lse: float32 ``[B, Hq, Lq]`` receiving its natural-log log-sum-exp, pooled logits with their ``+ ln p``
            (``-inf`` for rows without entries).
        block_q, block_k: ``bq``, ``bk``; factors: the pyramid's factors; scale: softmax scale.

    A Gluon kernel that does not compile with this Triton (its Gluon API changed) logs once and the Triton kernel
    runs from then on in this process.

    Raises:
        RuntimeError: ``POOLED_OVERRIDES["GLUON"] is True`` and the Gluon kernel cannot run the call; the Gluon
            kernel's own compile error is raised instead of falling back when ``POOLED_OVERRIDES["GLUON"] is True``.
        torch.OutOfMemoryError, RuntimeError: errors of the device (out of memory, a CUDA error) always propagate.
    """
    global _POOLED_GLUON_FAILURE
    engine, reason = pooled_engine(q, k_pooled, v_pooled, block_q=block_q, block_k=block_k, factors=factors, out=out,
                                   lse=lse)
    if engine == "gluon":
        from . import hopper

        try:
            hopper.pooled_launch(q, k, v, k_pooled, v_pooled, kv_idx, counts, out=out, lse=lse, block_q=block_q,
                                 block_k=block_k, factors=factors, scale=scale, tiles=_pooled_tiles())
            return
        except gluon_support.GLUON_API_ERRORS as exc:
            if POOLED_OVERRIDES.get("GLUON") is True or gluon_support.device_error(exc):
                raise
            # nothing was launched: ``out`` / ``lse`` are untouched, the Triton kernel writes them
            _POOLED_GLUON_FAILURE = f"{type(exc).__name__}: {str(exc)[-500:]}"
            logger.warning("PSA pooled launch: the Gluon kernel did not compile with Triton %s (%s); the Triton "
                           "kernel runs instead for the rest of this process", triton.__version__,
                           _POOLED_GLUON_FAILURE)
    elif POOLED_OVERRIDES.get("GLUON") is True:
        raise RuntimeError(f"POOLED_OVERRIDES['GLUON'] is True but the Gluon pooled kernel cannot run: {reason}")
    elif q.is_cuda and reason != "not a compute capability 9.x CUDA device":
        key = "pooled:" + str(reason).split(" (")[0]
        if key not in _warned:  # a speed note, not a problem: once per reason
            _warned.add(key)
            logger.info("PSA pooled launch: the Triton kernel runs instead of the Gluon kernel: %s", reason)
    triton_pooled_launch(q, k, v, k_pooled, v_pooled, kv_idx, counts, out=out, lse=lse, block_q=block_q,
                         block_k=block_k, factors=factors, scale=scale)


def triton_pooled_launch(
    q, k, v, k_pooled, v_pooled, kv_idx, counts, *, out, lse, block_q: int, block_k: int,
    factors: Sequence[int], scale: float,
) -> None:
    """The Triton kernel on a list of pooled factors only, writing ``out`` and its log-sum-exp ``lse``."""
    from . import kernel as triton_kernel

    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    triton_kernel._launch(
        q, k, v, k_pooled, v_pooled, kv_idx, counts, out, block_q=block_q, block_k=block_k,
        factors=tuple(factors), scale=scale, key_padding_mask=None,
        tiles=triton_kernel._pick_tiles(block_q, block_k, block_d, q.dtype), lse=lse,
    )


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact causal attention (bottom-right aligned) with FlashAttention-4's dense forward.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (CUDA, float16/bfloat16, ``fa4_available``).
        scale: Softmax scale, ``1/sqrt(D)`` if ``None``.
        out: Optional ``[B, Hq, Lq, D]`` destination.

    Returns:
        ``[B, Hq, Lq, D]``.
    """
    from flash_attn.cute.interface import flash_attn_func

    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    if isinstance(o, tuple):
        o = o[0]
    o = o.transpose(1, 2)
    if out is None:
        return o
    out.copy_(o)
    return out
