"""Public PSA operators: ``psa_attention`` and ``build_level_map`` (validate -> dispatch -> kernels).

Causal alignment is bottom-right, as in ``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal=True`` for ``Lq == Lk`` and as in FlashAttention for ``Lq < Lk``: query row ``r`` sits at
absolute position ``Lk - Lq + r``, so the last query sees every key. Example with ``Lq = 2, Lk = 5``::

    keys:     0 1 2 3 4
    query 0:  x x x x .      (position 3)
    query 1:  x x x x x      (position 4)
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from .config import PSAConfig
from .kernels.assign.naive import KV_FORCE_FULL, KV_NEEDS_FULL, KV_SKIP
from .kernels.geometry import FACTOR_ORDER, block_masks, cdiv

__all__ = ["LevelMap", "PSAPlan", "psa_attention", "build_level_map", "run_psa", "check_config_for_backend"]

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "triton", "reference")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------- LevelMap
@dataclass
class LevelMap:
    """Per (batch, query head, query block, KV block) pooling factor.

    Attributes:
        factors: int8 ``[B, Hq, nq, nk]``: 0 (skip) or the pooling factor 1/2/4/8.
        block_q, block_k: Block sizes the map refers to.
        lq, lk: Query and key lengths (needed for the causal geometry).
    """

    factors: torch.Tensor
    block_q: int
    block_k: int
    lq: int
    lk: int

    def _visible(self) -> torch.Tensor:
        vis, _ = block_masks(self.lq, self.lk, self.block_q, self.block_k, self.factors.device)
        return vis

    def density_tensor(self) -> torch.Tensor:
        """PSA_SPEC section 3 density as a 0-d float32 tensor (no host synchronisation)."""
        f = self.factors.float()
        inv = torch.where(f > 0, 1.0 / f.clamp(min=1), torch.zeros_like(f))
        vis = self._visible()
        n = vis.sum() * f.shape[0] * f.shape[1]
        return (inv * vis).sum() / n.clamp(min=1)

    def density(self) -> float:
        """Mean of ``1/p`` (0 if skipped) over causally valid block pairs and heads: FLOP-equivalent density."""
        return float(self.density_tensor())

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def histogram_tensor(self) -> torch.Tensor:
        """Counts over causally valid pairs of factors (1, 2, 4, 8, 0=skip) as int64 ``[5]`` (no sync)."""
        vis = self._visible()  # [nq, nk], broadcast over [B, Hq]; no boolean indexing (that would sync)
        return torch.stack([((self.factors == p) & vis).sum() for p in FACTOR_ORDER + (0,)])

    def histogram(self) -> Dict[str, float]:
        """Fraction of causally valid (head, query block, KV block) pairs at each level."""
        h = self.histogram_tensor().double()
        h = (h / h.sum().clamp(min=1)).tolist()
        return {"full": h[0], "pool2": h[1], "pool4": h[2], "pool8": h[3], "skip": h[4]}

    def __repr__(self) -> str:
        B, H, nq, nk = self.factors.shape
        return (
            f"LevelMap(B={B}, Hq={H}, nq={nq}, nk={nk}, block_q={self.block_q}, block_k={self.block_k}, "
            f"lq={self.lq}, lk={self.lk})"
        )


@dataclass
class PSAPlan:
    """Everything the attention stage consumes, plus the level map for statistics."""

    level_map: LevelMap
    kv_idx: torch.Tensor
    counts: torch.Tensor
    k_pooled: torch.Tensor
    v_pooled: torch.Tensor
    pool_factors: Tuple[int, ...]
    kv_flags: Optional[torch.Tensor]


# ---------------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _validate(q, k, v, scale, key_padding_mask, token_types, backend) -> None:
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if q.dtype not in _DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; PSA supports float16, bfloat16 and float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size mismatch: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k/v have {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv}) for GQA")
    if Lq == 0 or Lk == 0:
        raise ValueError(f"empty sequence: Lq={Lq}, Lk={Lk}")
    if Lq > Lk:
        raise ValueError(
            f"Lq={Lq} > Lk={Lk}: PSA expects the keys to include every query position (prefill appends the "
            "new tokens to the cache before attention)"
        )
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, 2)
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be [B, Lk] = {(B, Lk)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if token_types is not None:
        _check_tensor("token_types", token_types, 2)
        if tuple(token_types.shape) != (B, Lk):
            raise ValueError(f"token_types must be [B, Lk] = {(B, Lk)}, got {tuple(token_types.shape)}")
        if token_types.device != q.device:
            raise ValueError(f"token_types is on {token_types.device}, q on {q.device}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); use backend='reference' on the CPU or set "
            "TRITON_INTERPRET=1 before importing psa_vlm to run the kernels under the Triton interpreter"
        )
    return backend


def check_config_for_backend(
    config: PSAConfig,
    backend: str = "auto",
    *,
    device: Union[torch.device, str, None] = None,
    head_dim: Optional[int] = None,
) -> str:
    """Check that ``backend`` can run ``config`` (and ``head_dim``) on ``device``; return the backend that will.

    Meant for the place where a user sets these (patch time, CLI parse time), so that a bad combination fails
    with one clear line instead of deep inside a kernel launch.

    Args:
        config: The ``PSAConfig`` to run.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        device: Where the attention inputs will live (``None``: the CPU).
        head_dim: The model's attention head dimension ``D``, if known.

    Returns:
        The resolved backend name, ``"triton"`` or ``"reference"`` (``"auto"``: Triton on CUDA).

    Raises:
        TypeError: ``config`` is not a ``PSAConfig``.
        ValueError: Unknown backend, Triton on a CPU device without the interpreter, block sizes the Triton
            kernels cannot tile (powers of two >= 16), or a head_dim outside 1..256 for Triton.
    """
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    dev = torch.device("cpu" if device is None else device)
    resolved = _resolve_backend(backend, dev)
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if resolved == "triton":
        for name in ("block_q", "block_k"):
            b = getattr(config, name)
            if b < 16 or b & (b - 1):
                raise ValueError(
                    f"PSAConfig.{name}={b}: the Triton kernels need a power of two >= 16 (e.g. 64 or 128); "
                    "change the block size or use backend='reference'"
                )
        if head_dim is not None and head_dim > 256:
            raise ValueError(f"head_dim {head_dim} is not supported by the Triton kernels (1..256); use backend='reference'")
    return resolved


def _ops(backend: str):
    """``(pyramid_pool, block_importance, assign_levels, sparse_attention)`` for a backend."""
    if backend == "triton":
        from .kernels.assign.kernel import assign_levels
        from .kernels.attention.kernel import sparse_attention
        from .kernels.estimate.kernel import block_importance
        from .kernels.pool.kernel import pyramid_pool
    else:
        from .kernels.assign.naive import assign_levels
        from .kernels.attention.naive import sparse_attention
        from .kernels.estimate.naive import block_importance
        from .kernels.pool.naive import pyramid_pool
    return pyramid_pool, block_importance, assign_levels, sparse_attention


# ---------------------------------------------------------------------------------------------- flags
def block_flags(
    B: int,
    lq: int,
    lk: int,
    config: PSAConfig,
    device: torch.device,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    token_types: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(kv_flags int8 [B, nk], q_flags bool [B, nq])`` from token types and padding (no host sync).

    ``token_types`` is ``[B, Lk]`` with 0 for text and non-zero for visual (video/image placeholder) tokens;
    without it the last ``config.text_tail`` positions count as text. Padding (``key_padding_mask == False``)
    makes a block ``KV_NEEDS_FULL`` (some keys padded) or ``KV_SKIP`` (all padded).
    """
    bq, bk = config.block_q, config.block_k
    nq, nk = cdiv(lq, bq), cdiv(lk, bk)
    if token_types is not None:
        text = token_types == 0
    else:
        text = (torch.arange(lk, device=device) >= lk - config.text_tail).expand(B, lk)
    pad_k = nk * bk - lk
    text_k = torch.nn.functional.pad(text, (0, pad_k), value=False).reshape(B, nk, bk).any(-1)
    kv_flags = torch.where(text_k, KV_FORCE_FULL, 0).to(torch.int8)
    if key_padding_mask is not None:
        valid = key_padding_mask.bool()
        vb = torch.nn.functional.pad(valid, (0, pad_k), value=True).reshape(B, nk, bk)
        real = torch.nn.functional.pad(torch.ones_like(valid), (0, pad_k), value=False).reshape(B, nk, bk)
        n_valid = (vb & real).sum(-1)
        n_real = real.sum(-1)
        kv_flags = kv_flags | torch.where(n_valid == 0, KV_SKIP, 0).to(torch.int8)
        kv_flags = kv_flags | torch.where((n_valid > 0) & (n_valid < n_real), KV_NEEDS_FULL, 0).to(torch.int8)
    text_q = text[:, lk - lq :]
    q_flags = torch.nn.functional.pad(text_q, (0, nq * bq - lq), value=False).reshape(B, nq, bq).any(-1)
    return kv_flags, q_flags


# ---------------------------------------------------------------------------------------------- entry points
def _coerce_level_map(level_map, B, Hq, lq, lk, config) -> torch.Tensor:
    if isinstance(level_map, LevelMap):
        if (level_map.block_q, level_map.block_k) != (config.block_q, config.block_k):
            raise ValueError(
                f"level_map uses blocks ({level_map.block_q}, {level_map.block_k}) but config has "
                f"({config.block_q}, {config.block_k}); pass a matching config"
            )
        f = level_map.factors
    elif isinstance(level_map, torch.Tensor):
        f = level_map
    else:
        raise TypeError(f"level_map must be a LevelMap or a tensor, got {type(level_map).__name__}")
    shape = (B, Hq, cdiv(lq, config.block_q), cdiv(lk, config.block_k))
    if tuple(f.shape) != shape:
        raise ValueError(f"level_map factors must have shape [B, Hq, nq, nk] = {shape}, got {tuple(f.shape)}")
    if f.dtype.is_floating_point or f.dtype == torch.bool:
        raise TypeError(f"level_map factors must be an integer tensor, got {f.dtype}")
    bad = ~torch.isin(f, torch.tensor([0, 1, 2, 4, 8], device=f.device, dtype=f.dtype))
    if bool(bad.any()):
        raise ValueError(f"level_map factors must be 0, 1, 2, 4 or 8; found {f[bad][0].item()}")
    return f.to(torch.int8)


def _on_q_device(fn):
    """Run ``fn`` with ``q``'s CUDA device current: Triton launches on the *current* device, which is wrong for
    a model spread over several GPUs unless the caller switches to the layer's device."""

    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        if isinstance(q, torch.Tensor) and q.is_cuda:
            with torch.cuda.device(q.device):
                return fn(q, *args, **kwargs)
        return fn(q, *args, **kwargs)

    return wrapper


@_on_q_device
def run_psa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: Optional[PSAConfig] = None,
    *,
    level_map: Union[LevelMap, torch.Tensor, None] = None,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    token_types: Optional[torch.Tensor] = None,
    backend: str = "auto",
    plan_only: bool = False,
    out: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], PSAPlan]:
    """``psa_attention`` that also returns its ``PSAPlan`` (level map, block lists, pyramid).

    With ``plan_only=True`` the attention stage is skipped and the output is ``None``. ``out`` may be a
    ``[B, Hq, Lq, D]`` tensor (any strides, e.g. a transposed ``[B, Lq, Hq, D]`` buffer) to write into.
    Every kernel launches on ``q``'s device.
    """
    config = PSAConfig() if config is None else config
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    _validate(q, k, v, scale, key_padding_mask, token_types, backend)
    be = _resolve_backend(backend, q.device)
    pyramid_pool, block_importance, assign_levels, sparse_attention = _ops(be)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    bq, bk = config.block_q, config.block_k
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    kv_flags, q_flags = block_flags(
        B, Lq, Lk, config, q.device, key_padding_mask=key_padding_mask, token_types=token_types
    )

    if level_map is not None:
        from .kernels.assign.naive import build_block_lists

        f = _coerce_level_map(level_map, B, Hq, Lq, Lk, config)
        pool_factors: Tuple[int, ...] = (2, 4, 8)
        k_pooled, v_pooled, _ = pyramid_pool(k, v, block_k=bk, factors=pool_factors, sim_thresholds=None)
        # padding only: the caller's map is applied as is otherwise
        pad_flags = kv_flags & (KV_SKIP | KV_NEEDS_FULL)
        factors, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk, kv_flags=pad_flags)
    elif config.dense:
        pool_factors = ()
        k_pooled = k.new_empty(B, k.shape[1], 0, D)
        v_pooled = v.new_empty(B, k.shape[1], 0, D)
        nk = cdiv(Lk, bk)
        dummy_scores = torch.zeros(B, Hq, cdiv(Lq, bq), nk, dtype=torch.float32, device=q.device)
        cap = torch.ones(B, k.shape[1], nk, dtype=torch.int8, device=q.device)
        factors, kv_idx, counts = assign_levels(dummy_scores, cap, kv_flags, q_flags, lq=Lq, lk=Lk, config=config)
    else:
        pool_factors = tuple(config.pool_factors)
        k_pooled, v_pooled, cap = pyramid_pool(
            k, v, block_k=bk, factors=pool_factors, sim_thresholds=config.sim_thresholds
        )
        scores = block_importance(q, k, block_q=bq, block_k=bk, stride=config.stride, scale=scale)
        factors, kv_idx, counts = assign_levels(scores, cap, kv_flags, q_flags, lq=Lq, lk=Lk, config=config)

    plan = PSAPlan(
        level_map=LevelMap(factors, bq, bk, Lq, Lk),
        kv_idx=kv_idx,
        counts=counts,
        k_pooled=k_pooled,
        v_pooled=v_pooled,
        pool_factors=pool_factors,
        kv_flags=kv_flags,
    )
    if plan_only:
        return None, plan
    o = sparse_attention(
        q,
        k,
        v,
        k_pooled,
        v_pooled,
        kv_idx,
        counts,
        block_q=bq,
        block_k=bk,
        factors=pool_factors,
        scale=scale,
        key_padding_mask=key_padding_mask,
        out=out,
    )
    return o, plan


def psa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: Optional[PSAConfig] = None,
    *,
    level_map: Union[LevelMap, torch.Tensor, None] = None,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    token_types: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal Pyramid Sparse Attention.

    Args:
        q: Queries ``[B, Hq, Lq, D]`` (float16, bfloat16 or float32; any strides).
        k: Keys ``[B, Hkv, Lk, D]``, ``Hq % Hkv == 0`` (GQA by index, no KV copies), ``Lq <= Lk``.
        v: Values ``[B, Hkv, Lk, D]``.
        config: ``PSAConfig`` (default: the ``"paper"`` preset). ``config.min_seq_len`` is not applied here:
            this operator always runs PSA; the model patch uses dense attention for short inputs.
        level_map: A ``LevelMap`` or int ``[B, Hq, nq, nk]`` factors tensor to apply as is instead of
            estimating one (pooled factors on blocks that are not entirely in the past of every query of the
            query block, or that hold padding, are promoted to full resolution).
        scale: Softmax scale, ``1/sqrt(D)`` if ``None``.
        key_padding_mask: Optional bool ``[B, Lk]``, ``True`` for real tokens; padded keys are never attended
            and a query row that sees no real key gives zeros.
        token_types: Optional int ``[B, Lk]``: 0 text, non-zero visual (video/image placeholder); text blocks
            are kept at full resolution. Without it the last ``config.text_tail`` tokens count as text.
        backend: ``"auto"`` (Triton on CUDA tensors, the PyTorch reference on the CPU), ``"triton"`` or
            ``"reference"``.

    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype.
    """
    out, _ = run_psa(
        q,
        k,
        v,
        config,
        level_map=level_map,
        scale=scale,
        key_padding_mask=key_padding_mask,
        token_types=token_types,
        backend=backend,
    )
    return out


def build_level_map(
    q: torch.Tensor,
    k: torch.Tensor,
    config: Optional[PSAConfig] = None,
    *,
    token_types: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> LevelMap:
    """Estimate importance and assign every block pair a level (PSA_SPEC steps 2-6), without attention.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.
        config: ``PSAConfig`` (default ``"paper"``).
        token_types, key_padding_mask, scale, backend: As in ``psa_attention``.

    Returns:
        ``LevelMap`` with int8 factors ``[B, Hq, nq, nk]``.
    """
    _, plan = run_psa(
        q,
        k,
        k,
        config,
        scale=scale,
        key_padding_mask=key_padding_mask,
        token_types=token_types,
        backend=backend,
        plan_only=True,
    )
    return plan.level_map
