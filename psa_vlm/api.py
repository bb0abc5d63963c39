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
import numbers
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from .config import PSAConfig, _scalar
from .kernels.assign.naive import KV_FORCE_FULL, KV_NEEDS_FULL, KV_SKIP
from .kernels.geometry import FACTOR_ORDER, block_masks, cdiv

__all__ = [
    "BACKENDS", "LevelMap", "PSAPlan", "psa_attention", "build_level_map", "run_psa", "resolve_backend",
    "attend_backend", "causal_equivalent_len",
    "check_config_for_backend",
]

logger = logging.getLogger(__name__)

#: Backend names accepted by every entry point: ``"auto"`` (FlashAttention-4 where it runs, else Triton, on CUDA
#: tensors; the PyTorch reference on the CPU), ``"fa4"``, ``"triton"``, ``"reference"``.
BACKENDS = ("auto", "fa4", "triton", "reference")
_BACKENDS = BACKENDS
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Largest head dimension the Triton kernels support (``kernels/attention/kernel.py``).
TRITON_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------- LevelMap
@dataclass
class LevelMap:
    """Per (batch, query head, query block, KV block) pooling factor.

    Attributes:
        factors: int8 ``[B, Hq, nq, nk]``: 0 (skip) or the pooling factor 1/2/4/8.
        block_q, block_k: Block sizes the map refers to.
        lq, lk: Query and key lengths (needed for the causal geometry).
        valid: Optional bool ``[B, nq, nk]``: the pairs that hold real work. ``False`` for a fully padded KV
            block or a query block whose queries are all padding (``key_padding_mask``); such pairs are left
            out of ``density`` and ``histogram``, since skipping padding is not work PSA saved. ``None``
            (a map built without padding): every causally visible pair counts. ``run_psa`` and
            ``build_level_map`` fill it when a ``key_padding_mask`` is given.
    """

    factors: torch.Tensor
    block_q: int
    block_k: int
    lq: int
    lk: int
    valid: Optional[torch.Tensor] = None

    def _counted(self) -> torch.Tensor:
        """Bool ``[nq, nk]`` or ``[B, 1, nq, nk]``: the pairs statistics count (visible, and valid if known)."""
        vis, _ = block_masks(self.lq, self.lk, self.block_q, self.block_k, self.factors.device)
        if self.valid is None:
            return vis
        return vis & self.valid.to(device=self.factors.device, dtype=torch.bool)[:, None]

    def density_tensor(self) -> torch.Tensor:
        """PSA_SPEC section 3 density as a 0-d float32 tensor (no host synchronisation)."""
        f = self.factors.float()
        inv = torch.where(f > 0, 1.0 / f.clamp(min=1), torch.zeros_like(f))
        counted = self._counted()
        n = counted.expand(f.shape).sum()
        return (inv * counted).sum() / n.clamp(min=1)

    def _check_factors(self) -> None:
        """Host-side check (synchronises) that every counted factor is 0, 1, 2, 4 or 8."""
        allowed = torch.tensor((0,) + FACTOR_ORDER, dtype=self.factors.dtype, device=self.factors.device)
        bad = self._counted().expand(self.factors.shape) & ~torch.isin(self.factors, allowed)
        if bool(bad.any()):
            raise ValueError(
                f"LevelMap holds the factor {int(self.factors[bad][0])}; factors must be 0 (skip), 1, 2, 4 or 8"
            )

    def density(self) -> float:
        """Mean of ``1/p`` (0 if skipped) over the counted block pairs and heads: FLOP-equivalent density.

        Counted pairs are the causally visible ones, less padding (``valid``). Raises ``ValueError`` if the map
        holds a factor other than 0, 1, 2, 4, 8.
        """
        self._check_factors()
        return float(self.density_tensor())

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def histogram_tensor(self) -> torch.Tensor:
        """Counts over the counted pairs of factors (1, 2, 4, 8, 0=skip) as int64 ``[5]`` (no sync).

        Counts of a map holding another factor do not sum to the number of counted pairs; ``histogram()``
        raises on such a map.
        """
        counted = self._counted()  # broadcast over [B, Hq]; no boolean indexing (that would sync)
        return torch.stack([((self.factors == p) & counted).sum() for p in FACTOR_ORDER + (0,)])

    def histogram(self) -> Dict[str, float]:
        """Fraction of the counted (head, query block, KV block) pairs at each level.

        Raises:
            ValueError: The map holds a factor other than 0, 1, 2, 4, 8.
        """
        self._check_factors()
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
    #: Set when the dense guard ran dense attention instead of the sparse stage (``PSAConfig.dense_guard``).
    dense_reason: Optional[str] = None
    #: The engine whose attend stage runs (or, where the dense guard ran dense attention, would run) this plan:
    #: ``"fa4"``, ``"triton"`` (also where the fa4 backend falls back to the Triton kernel) or ``"reference"``;
    #: ``None`` where dense attention ran instead of any attend stage (the dense guard's shortcut before planning,
    #: the dense preset on FlashAttention-4's dense forward).
    attend_backend: Optional[str] = None


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
    if D == 0:
        raise ValueError(f"head_dim is 0 (q has shape {tuple(q.shape)}); attention needs at least one feature per head")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv}) for GQA")
    if Lq == 0 or Lk == 0:
        raise ValueError(f"empty sequence: Lq={Lq}, Lk={Lk}")
    if Lq > Lk:
        raise ValueError(
            f"Lq={Lq} > Lk={Lk}: PSA expects the keys to include every query position (prefill appends the "
            "new tokens to the cache before attention)"
        )
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, 2)
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be [B, Lk] = {(B, Lk)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
        _check_padding_values(key_padding_mask)
    if token_types is not None:
        _check_tensor("token_types", token_types, 2)
        if tuple(token_types.shape) != (B, Lk):
            raise ValueError(f"token_types must be [B, Lk] = {(B, Lk)}, got {tuple(token_types.shape)}")
        if token_types.device != q.device:
            raise ValueError(f"token_types is on {token_types.device}, q on {q.device}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _as_scale(scale) -> Optional[float]:
    """``scale`` as a positive finite ``float`` (or ``None``): Python, NumPy and 0-d tensor numbers; no bools."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor) and scale.dim() != 0:
        raise TypeError(f"scale must be a number or a 0-d tensor, got a tensor of shape {tuple(scale.shape)}")
    v = _scalar(scale)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(
            f"scale must be a positive number or None (meaning 1/sqrt(D)), got {scale!r} ({type(scale).__name__})"
        )
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"scale must be a positive finite number or None (meaning 1/sqrt(D)), got {scale!r}")
    return v


def _check_padding_values(mask: torch.Tensor) -> None:
    """``key_padding_mask`` convention: bool (``True`` = real token) or a 0/1 integer tensor (1 = real token).

    Float masks are refused rather than converted: an additive mask (0 keep, ``-inf`` pad) would read the
    other way round, and a fraction has no meaning. Integer masks are checked for values other than 0/1 (a
    host synchronisation; pass a bool mask to avoid it).
    """
    if mask.dtype == torch.bool:
        return
    if mask.dtype not in _INT_MASK_DTYPES:
        raise TypeError(
            f"key_padding_mask has dtype {mask.dtype}; it must be bool (True = real token, False = padding) or an "
            "integer tensor of 0/1 (1 = real token). For an additive float mask (0 keep, -inf pad) pass "
            "`mask == 0`"
        )
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"key_padding_mask holds the value {int(mask[bad][0])}; integer masks must be 0 (padding) or 1 "
            "(real token)"
        )


def resolve_backend(backend: str, device: Optional[torch.device] = None) -> str:
    """The backend a call on ``device`` runs: ``"fa4"``, ``"triton"`` or ``"reference"``.

    ``device=None`` means the current CUDA device when one is available, else the CPU.

    ``"auto"``: on CUDA, ``"fa4"`` when FlashAttention-4 imports and the device has compute capability 9.x or
    newer (its first import takes a few seconds), else ``"triton"``; on the CPU, ``"reference"``. Under
    ``"auto"`` the attend stage of each call runs on the engine predicted faster for its plan's level mix
    (``psa_vlm.cost.faster_attend_backend``: the Triton kernel's single launch for low-density plans and short
    prompts, FlashAttention-4's level launches for dense ones), by length where the mix is not known on the host
    (``attend_backend``); FlashAttention-4's dense forward stays the dense path.
    ``"fa4"`` runs pooling, estimation and level assignment in Triton and the attention stage on
    FlashAttention-4's block-sparse forward (calls it cannot express go to the Triton kernel, with a log line).

    Raises:
        ValueError: Unknown name, or ``"triton"``/``"fa4"`` on a device they cannot run on.
        ImportError: ``"fa4"`` asked for but flash-attn-4 does not import (the message names the install).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        from .kernels.attention.fa4 import fa4_available

        return "fa4" if fa4_available(device) else "triton"
    if backend in ("triton", "fa4") and device.type != "cuda" and not interpret:
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors (got {device}); use backend='reference' on the CPU or set "
            "TRITON_INTERPRET=1 before importing psa_vlm to run the Triton kernels under the Triton interpreter"
        )
    if backend == "fa4" and device.type == "cuda":
        from .kernels.attention.fa4 import FA4_INSTALL_HINT, fa4_import_error

        err = fa4_import_error()
        if err is not None:
            raise ImportError(f"backend='fa4' needs FlashAttention-4, which does not import ({err}); {FA4_INSTALL_HINT}")
        if torch.cuda.get_device_capability(device)[0] < 9:
            raise ValueError(
                f"backend='fa4' needs a GPU of compute capability 9.0 or newer (Hopper), got "
                f"{torch.cuda.get_device_capability(device)} on {device}; use backend='triton'"
            )
    return backend


def causal_equivalent_len(lq: int, lk: int) -> int:
    """Length of the square causal call with the same attention work as ``lq`` queries over ``lk`` keys.

    A bottom-right-aligned causal call reads ``lq * (2*lk - lq) / 2`` (query, key) pairs; a square call of length
    ``L`` reads ``L^2 / 2``. So a 16k-token chunk over a 128k-token cache counts as ~63k tokens. The length rules
    of ``psa_vlm.cost`` are stated for square calls and applied to this length.
    """
    lq, lk = int(lq), int(lk)
    return int(math.isqrt(max(0, lq * (2 * lk - lq))))


def attend_backend(backend: str, resolved: str, seq_len: int) -> str:
    """The backend whose attend stage runs a call of ``seq_len`` tokens (``causal_equivalent_len``), before planning.

    ``resolved`` (``resolve_backend(backend, device)``), except that ``backend="auto"`` keeps the Triton attend
    stage below ``psa_vlm.cost.AUTO_FA4_MIN_TOKENS``, where FlashAttention-4's per-call costs (four level
    launches, the list split, the merge) weigh most (H200 measurements in ``psa_vlm.cost``). Once the plan's
    level mix is known on the host (a quota config, or a threshold-mode plan whose histogram the dense guard
    reads), ``run_psa`` replaces this length rule by ``cost.faster_attend_backend`` and records the engine in
    ``PSAPlan.attend_backend``. An explicit
    ``backend="fa4"`` keeps FlashAttention-4's attend stage at every length (the dense guard may still run dense
    attention, ``PSAConfig.dense_guard``). Planning (pool, estimate, assign) runs the same Triton kernels either
    way.
    """
    from .cost import AUTO_FA4_MIN_TOKENS

    if backend == "auto" and resolved == "fa4" and seq_len < AUTO_FA4_MIN_TOKENS:
        return "triton"
    return resolved


_resolve_backend = resolve_backend


def _pow2_at_least_16(x: int) -> bool:
    return x >= 16 and (x & (x - 1)) == 0


def check_config_for_backend(
    config: PSAConfig,
    backend: str = "auto",
    *,
    device: Union[torch.device, str, None] = None,
    head_dim: Optional[int] = None,
) -> str:
    """Check that the backend that will run ``config`` supports it, where the config is chosen.

    ``psa_attention`` / ``run_psa`` call it before any kernel, ``psa-vlm run`` at argument-parse time, the
    lmms-eval model in its constructor and the model patch at patch time, so that an unsupported block size
    fails with one clear line instead of deep inside ``generate``.

    Limits (``kernels/attention/kernel.py``): the Triton kernels need ``block_q`` and ``block_k`` to be
    powers of two >= 16 and ``head_dim <= 256``. The PyTorch reference runs every valid ``PSAConfig``
    (block sizes multiples of ``stride`` and of the largest pool factor, which ``PSAConfig`` checks).

    Args:
        config: The ``PSAConfig`` to check.
        backend: ``"auto"``, ``"fa4"``, ``"triton"`` or ``"reference"`` (``resolve_backend``).
        device: Device the attention will run on; ``None`` means CUDA if ``torch.cuda.is_available()``.
        head_dim: Head dimension ``D`` of the attention, if known.

    Returns:
        The backend that will run: ``"fa4"``, ``"triton"`` or ``"reference"`` (``"fa4"`` runs its planning
        stages in Triton, so Triton's limits apply to it too; attend calls FlashAttention-4 cannot express go to
        the Triton kernel).

    Raises:
        TypeError: ``config`` is not a ``PSAConfig``, or ``head_dim`` is not an int.
        ValueError: Unknown backend, ``backend="triton"`` without CUDA (and no ``TRITON_INTERPRET=1``), or a
            config/head_dim the chosen backend cannot run; the message names the value and the remedy.
    """
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if device is not None and not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a torch device (e.g. 'cuda', 'cuda:1', 'cpu')") from None
    if head_dim is not None:
        d = _scalar(head_dim)
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"head_dim must be an int, got {head_dim!r}")
        if d < 1:
            raise ValueError(f"head_dim must be positive, got {d}")
        head_dim = int(d)
    try:
        resolved = resolve_backend(backend, device)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    if resolved in ("triton", "fa4"):
        if not (_pow2_at_least_16(config.block_q) and _pow2_at_least_16(config.block_k)):
            raise ValueError(
                f"block sizes block_q={config.block_q}, block_k={config.block_k} are not supported by the Triton "
                "kernels, which need powers of two >= 16 (16, 32, 64, 128, 256); choose such a block size or "
                "backend='reference'"
            )
        if head_dim is not None and head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(
                f"head_dim={head_dim} is not supported by the Triton kernels (at most {TRITON_MAX_HEAD_DIM}); "
                "use backend='reference'"
            )
    return resolved


def _finite_tokens(x: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: every feature of every head of the token is finite (one pass, no host sync)."""
    lo, hi = torch.aminmax(x, dim=-1)  # NaN propagates into both; +-inf shows in one of them
    return (torch.isfinite(lo) & torch.isfinite(hi)).all(1)


def _nonfinite_value_blocks(v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], bk: int) -> torch.Tensor:
    """Bool ``[B, nk]``: KV blocks whose values (at real keys) hold NaN or +-inf."""
    B, _, Lk, _ = v.shape
    bad = ~_finite_tokens(v)
    if key_padding_mask is not None:
        bad = bad & key_padding_mask
    nk = cdiv(Lk, bk)
    return torch.nn.functional.pad(bad, (0, nk * bk - Lk), value=False).reshape(B, nk, bk).any(-1)


def _ops(backend: str):
    """``(pyramid_pool, block_importance, assign_levels, sparse_attention)`` for a backend."""
    if backend in ("triton", "fa4"):
        from .kernels.assign.kernel import assign_levels
        from .kernels.estimate.kernel import block_importance
        from .kernels.pool.kernel import pyramid_pool

        if backend == "fa4":
            from .kernels.attention.fa4 import sparse_attention
        else:
            from .kernels.attention.kernel import sparse_attention
    else:
        from .kernels.assign.naive import assign_levels
        from .kernels.attention.naive import sparse_attention
        from .kernels.estimate.naive import block_importance
        from .kernels.pool.naive import pyramid_pool
    return pyramid_pool, block_importance, assign_levels, sparse_attention


def estimator_queries(q: torch.Tensor, num_kv_heads: int, config: PSAConfig) -> torch.Tensor:
    """The queries the importance estimator reads (``PSAConfig.estimate_heads``).

    Args:
        q: ``[B, Hq, Lq, D]`` queries (any strides).
        num_kv_heads: ``Hkv``, a divisor of ``Hq``.
        config: The PSA configuration.

    Returns:
        ``q`` itself for ``estimate_heads="query"`` or when ``Hq == Hkv``; for ``"kv"`` the mean of each GQA
        group's query heads, ``[B, Hkv, Lq, D]`` of ``q``'s dtype: group ``g`` averages query heads
        ``g*G .. g*G+G-1`` (``G = Hq / Hkv``, the heads that read KV head ``g``, as in SDPA's ``enable_gqa``),
        accumulated in float32 by ``torch.mean`` and rounded once. A non-finite query stays visible in its
        group's mean (NaN/inf propagate), so the non-finite rule of ``run_psa`` still sees it.

    Raises:
        ValueError: ``num_kv_heads`` does not divide ``Hq``.
    """
    B, Hq, Lq, D = q.shape
    if num_kv_heads <= 0 or Hq % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide the {Hq} query heads")
    G = Hq // num_kv_heads
    if config.estimate_heads != "kv" or G == 1:
        return q
    return q.unflatten(1, (num_kv_heads, G)).mean(dim=2)


def share_in_groups(
    lists: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_heads: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(factors, kv_idx, counts)`` assigned per KV head, repeated for every query head of its group.

    ``assign_levels`` on ``[B, Hkv, ...]`` scores (``estimate_heads="kv"``) returns per-KV-head lists: int8 factors
    ``[B, Hkv, nq, nk]``, int32 ``kv_idx`` ``[B, Hkv, nq, nk]`` and int32 ``counts`` ``[B, Hkv, nq, 4]``. Query
    head ``h`` gets KV head ``h // G``'s (``G = num_heads / Hkv``), in new tensors of ``num_heads`` heads; lists
    that already have ``num_heads`` heads are returned as they are.

    Raises:
        ValueError: The three tensors' head counts differ or do not divide ``num_heads``.
    """
    heads = lists[0].shape[1]
    if any(t.shape[1] != heads for t in lists) or heads <= 0 or num_heads % heads:
        raise ValueError(f"lists with {[t.shape[1] for t in lists]} heads cannot be shared by {num_heads} query heads")
    if heads == num_heads:
        return lists
    G = num_heads // heads
    factors, kv_idx, counts = (t.repeat_interleave(G, dim=1) for t in lists)
    return factors, kv_idx, counts


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


def _padding_valid(key_padding_mask: torch.Tensor, kv_flags: torch.Tensor, lq: int, bq: int) -> torch.Tensor:
    """Bool ``[B, nq, nk]``: pairs of a query block holding a real query and a KV block holding a real key."""
    B, lk = key_padding_mask.shape
    nq = cdiv(lq, bq)
    q_real = key_padding_mask[:, lk - lq :]
    q_real = torch.nn.functional.pad(q_real, (0, nq * bq - lq), value=False).reshape(B, nq, bq).any(-1)
    kv_real = (kv_flags & KV_SKIP) == 0
    return q_real[:, :, None] & kv_real[:, None, :]


def _empty_plan(q: torch.Tensor, k: torch.Tensor, config: PSAConfig) -> PSAPlan:
    """The plan of an empty batch (``B == 0`` or ``Hq == 0``): empty tensors of the right shapes."""
    B, Hq, Lq, D = q.shape
    nq, nk = cdiv(Lq, config.block_q), cdiv(k.shape[2], config.block_k)
    dev = q.device
    factors = torch.zeros(B, Hq, nq, nk, dtype=torch.int8, device=dev)
    return PSAPlan(
        level_map=LevelMap(factors, config.block_q, config.block_k, Lq, k.shape[2]),
        kv_idx=torch.full((B, Hq, nq, nk), -1, dtype=torch.int32, device=dev),
        counts=torch.zeros(B, Hq, nq, len(FACTOR_ORDER), dtype=torch.int32, device=dev),
        k_pooled=k.new_empty(B, k.shape[1], 0, D),
        v_pooled=k.new_empty(B, k.shape[1], 0, D),
        pool_factors=(),
        kv_flags=torch.zeros(B, nk, dtype=torch.int8, device=dev),
    )


def _eager_only(fn):
    """Keep ``torch.compile`` out of ``fn``: under compilation it runs through ``torch.compiler.disable``.

    The disabled wrapper is made on the first compiled call, so that importing psa_vlm does not import
    ``torch._dynamo`` (seconds of start-up) for users who never compile.
    """
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


@_eager_only
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
    ``[B, Hq, Lq, D]`` tensor of ``q``'s dtype and device (any strides, e.g. a transposed ``[B, Lq, Hq, D]``
    buffer) to write into; another shape, dtype or device raises. Every kernel launches on ``q``'s device.

    ``torch.compile`` does not trace into this function (``torch.compiler.disable``): the stages are Triton
    launches or, in the reference, shape-dependent PyTorch with host reads, and Inductor's CPU code generation
    aborted the process on the reference path (SIGABRT at 40 tokens, torch 2.14). A compiled caller gets a
    graph break here and runs PSA eagerly, with the same values.
    """
    config = PSAConfig() if config is None else config
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    _validate(q, k, v, scale, key_padding_mask, token_types, backend)
    scale = _as_scale(scale)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    be = check_config_for_backend(config, backend, device=q.device, head_dim=D)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (B, Hq, Lq, D):
            raise ValueError(f"out must have shape [B, Hq, Lq, D] = {(B, Hq, Lq, D)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise TypeError(f"out has dtype {out.dtype} but q has {q.dtype}; pass an out tensor of q's dtype")
        if out.device != q.device:
            raise ValueError(f"out is on {out.device} but q is on {q.device}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0  # a checked 0/1 integer mask
    if B == 0 or Hq == 0:  # empty batch: every path returns an empty output
        plan = _empty_plan(q, k, config)
        if plan_only:
            return None, plan
        return (out if out is not None else q.new_empty(B, Hq, Lq, D)), plan
    attend_be = attend_backend(backend, be, causal_equivalent_len(Lq, Lk))
    pyramid_pool, block_importance, assign_levels, _ = _ops(attend_be)  # planning: the same kernels for both
    bq, bk = config.block_q, config.block_k
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    kv_flags, q_flags = block_flags(
        B, Lq, Lk, config, q.device, key_padding_mask=key_padding_mask, token_types=token_types
    )
    guarded = config.dense_guard and level_map is None and not config.dense and key_padding_mask is None
    if guarded and not plan_only:
        # a short threshold-mode prompt (FlashAttention-4 dense), or a quota mix that cannot beat dense attention
        # once planned: dense attention before any planning; the plan is the all-full map dense attention computes
        reason = _short_prompt_reason(be, config, q, k)
        early = (reason, "fa4") if reason is not None else _quota_dense_reason(backend, be, config, q, k)
        if early is not None:
            reason, dense = early
            logger.debug("PSA dense guard: %s", reason)
            o = _run_dense(dense, q, k, v, scale, out)
            plan = _full_plan(q, k, kv_flags, q_flags, config, assign_levels)
            plan.dense_reason = reason
            return o, plan

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
        factors, kv_idx, counts = _all_full_lists(q, k, kv_flags, q_flags, config, assign_levels)
    else:
        pool_factors = tuple(config.pool_factors)
        k_pooled, v_pooled, cap = pyramid_pool(
            k, v, block_k=bk, factors=pool_factors, sim_thresholds=config.sim_thresholds
        )
        # per query head, or per KV head from its group's mean query (estimate_heads="kv")
        scores = block_importance(estimator_queries(q, k.shape[1], config), k, block_q=bq, block_k=bk,
                                  stride=config.stride, scale=scale)
        # Non-finite inputs stay visible, as in SDPA (no host sync): a query block whose scores are not finite
        # (a NaN/inf in its queries or in a key it sees) attends every visible block at full resolution, and a
        # KV block holding a non-finite value is kept at full resolution wherever it is visible.
        q_flags = q_flags | ~torch.isfinite(scores).all(-1).all(1)
        bad_v = _nonfinite_value_blocks(v, key_padding_mask, bk)
        kv_flags = kv_flags | torch.where(bad_v, KV_FORCE_FULL, 0).to(torch.int8)
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        factors, kv_idx, counts = share_in_groups(
            assign_levels(scores, cap, kv_flags, q_flags, lq=Lq, lk=Lk, config=config), Hq
        )

    valid = None if key_padding_mask is None else _padding_valid(key_padding_mask, kv_flags, Lq, bq)
    plan = PSAPlan(
        level_map=LevelMap(factors, bq, bk, Lq, Lk, valid),
        kv_idx=kv_idx,
        counts=counts,
        k_pooled=k_pooled,
        v_pooled=v_pooled,
        pool_factors=pool_factors,
        kv_flags=kv_flags,
    )
    fa4_reason = _fa4_attend_reason(q, config, pool_factors, key_padding_mask) if be == "fa4" else None
    if fa4_reason is None:
        attend_be, hist = _auto_attend_backend(backend, be, attend_be, plan, config, q, k,
                                               may_read=guarded and not plan_only, given_map=level_map is not None)
    elif backend == "auto":
        attend_be, hist = "triton", None  # the only engine that can run this call's sparse stage
    else:
        hist = None  # explicit fa4: its launcher logs the reason and runs the Triton kernel
    # what runs the attend stage: the Triton kernel also where fa4's launcher falls back to it
    plan.attend_backend = "triton" if (fa4_reason is not None and attend_be == "fa4") else attend_be
    if plan_only:
        return None, plan
    sparse_attention = _ops(attend_be)[3]
    if config.dense and be == "fa4" and level_map is None and key_padding_mask is None:
        # exact causal attention: FlashAttention-4's dense forward is the fastest form of the all-full plan
        from .kernels.attention.fa4 import dense_attention, fa4_unsupported

        if fa4_unsupported(q, block_q=128, block_k=128, factors=()) is None:
            plan.attend_backend = None  # dense attention, no attend stage
            return dense_attention(q, k, v, scale=scale, out=out), plan
    if guarded:
        dense = _guarded_dense(plan.attend_backend, plan.level_map, q, k, v, scale, config, fa4_dense=be == "fa4",
                               histogram=hist, out=out)
        if dense is not None:
            plan.dense_reason, o = dense
            return o, plan
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


def _fa4_attend_reason(q, config: PSAConfig, pool_factors, key_padding_mask) -> Optional[str]:
    """Why FlashAttention-4's attend stage cannot run this call (``fa4.fa4_unsupported``), or ``None``."""
    from .kernels.attention.fa4 import fa4_unsupported

    return fa4_unsupported(q, block_q=config.block_q, block_k=config.block_k, factors=pool_factors,
                           key_padding_mask=key_padding_mask)


def _auto_attend_backend(backend: str, be: str, attend_be: str, plan: PSAPlan, config: PSAConfig, q, k,
                         may_read: bool, given_map: bool) -> Tuple[str, Optional[list]]:
    """``(attend-stage backend, level histogram read on the host or None)`` once the plan exists.

    Under ``backend="auto"`` with FlashAttention-4 available and able to run the call, the engine whose predicted
    attend time is lower for the plan's level mix (``cost.faster_attend_backend``): a quota config's own mix (no
    host read), or the plan's histogram where ``may_read`` (the dense guard will run and read it: returned so it
    is read once). A caller's level map, and threshold mode without the guard or under ``plan_only``, keep the
    length rule of ``attend_backend``.
    """
    from .cost import config_histogram, faster_attend_backend

    if backend != "auto" or be != "fa4" or config.dense or given_map:
        return attend_be, None
    mix = config_histogram(config)
    hist = None
    if mix is None:
        if not may_read:
            return attend_be, None
        hist = mix = plan.level_map.histogram_tensor().tolist()
    B, Hq, Lq, D = q.shape
    return faster_attend_backend(mix, B, Hq, D, Lq, k.shape[2]), hist


def _dense_path(be: str, q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """The dense attention that can replace this call's sparse stage (a ``cost.DENSE_TIMES`` key), or ``None``:
    FlashAttention-4's dense forward where ``be`` is ``"fa4"`` and it supports the call, else SDPA (cuDNN / flash)
    where ``Lq == Lk`` (SDPA's ``is_causal`` is top-left aligned)."""
    if be == "fa4":
        from .kernels.attention.fa4 import fa4_unsupported

        if fa4_unsupported(q, block_q=128, block_k=128, factors=()) is None:
            return "fa4"
    return "cudnn" if q.shape[2] == k.shape[2] else None


def _run_dense(path: str, q, k, v, scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact causal attention by ``path`` (``_dense_path``), written into ``out`` when given."""
    if path == "fa4":
        from .kernels.attention.fa4 import dense_attention

        return dense_attention(q, k, v, scale=scale, out=out)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if out is None:
        return o
    out.copy_(o)
    return out


def _has_time_model(be: str, q: torch.Tensor) -> bool:
    """Whether ``psa_vlm.cost`` models this call: the ``fa4`` / ``triton`` engines on CUDA float16 / bfloat16."""
    return be in ("fa4", "triton") and q.device.type == "cuda" and q.dtype != torch.float32


def _quota_dense_reason(backend: str, be: str, config: PSAConfig, q, k) -> Optional[Tuple[str, str]]:
    """``(reason, dense path)`` when a quota-mode call's own mix plus its planning is predicted no faster than dense
    attention (``cost.planning_dense_reason``), else ``None``. Needs no host read: the mix is the config's. On CUDA
    float16 / bfloat16 calls with a time model (``be`` ``"fa4"`` / ``"triton"``) only, as the dense guard."""
    from .cost import config_histogram, planning_dense_reason, predict_estimate_ms

    mix = config_histogram(config)
    if mix is None or not _has_time_model(be, q):
        return None
    dense = _dense_path(be, q, k)
    if dense is None:
        return None
    fa4_ok = be == "fa4" and _fa4_attend_reason(q, config, tuple(config.pool_factors), None) is None
    engines = ("fa4", "triton") if (backend == "auto" and fa4_ok) else ("fa4",) if fa4_ok else ("triton",)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    heads = Hkv if config.estimate_heads == "kv" else Hq
    planning = predict_estimate_ms(config.stride, B, heads, D, Lq, k.shape[2])
    reason = planning_dense_reason(engines, mix, planning, dense, B, Hq, D, Lq, k.shape[2])
    return None if reason is None else (reason, dense)


def _guarded_dense(backend: str, level_map: "LevelMap", q, k, v, scale: float, config: PSAConfig,
                   fa4_dense: bool = False, histogram: Optional[list] = None, out: Optional[torch.Tensor] = None):
    """``(reason, dense output)`` when the cost model says dense attention is faster than the plan, else ``None``
    (the output written into ``out`` when given).

    ``backend`` is the engine that runs the attend stage (``PSAPlan.attend_backend``: already ``"triton"`` where
    the fa4 backend falls back to the Triton kernel); ``fa4_dense`` says FlashAttention-4 is installed and usable
    on this device. Reads the level histogram on the host (one synchronisation) unless ``histogram``
    (already read) is given. Dense attention is the
    fastest available: FlashAttention-4's where ``fa4_dense`` and it supports the call, else SDPA (cuDNN/flash)
    when ``Lq == Lk``; without FlashAttention-4 the Triton backend keeps the sparse stage for ``Lq < Lk`` (SDPA's
    ``is_causal`` is top-left). The prediction compares the engine's attend time with that dense path's
    (``cost.attend_cost_ratio``).
    """
    from .cost import dense_guard_reason, quota_cost_ratio

    if not _has_time_model(backend, q):
        return None
    dense = _dense_path("fa4" if fa4_dense else "triton", q, k)
    if dense is None:
        return None
    B, Hq, Lq, D = q.shape
    shapes = (B, Hq, D, Lq, k.shape[2])
    # quota mode fixes the level mix: far below the break-even there is nothing to decide, and skipping the host
    # read keeps the attend stage's launches queued behind the planning (the read costs ~1 ms at 64k)
    if quota_cost_ratio(backend, config, *shapes, dense=dense) < 0.8:
        return None
    if histogram is None:
        histogram = level_map.histogram_tensor().tolist()
    reason = dense_guard_reason(backend, histogram, *shapes, dense=dense)
    if reason is None:
        return None
    logger.debug("PSA dense guard: %s", reason)
    return reason, _run_dense(dense, q, k, v, scale, out)


def _short_prompt_reason(be: str, config: PSAConfig, q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """``cost.short_prompt_reason`` (at ``causal_equivalent_len``) where FlashAttention-4's dense forward can run
    this call, else ``None``."""
    from .cost import short_prompt_reason

    reason = short_prompt_reason(be, config.mode, causal_equivalent_len(q.shape[2], k.shape[2]))
    if reason is None or q.device.type != "cuda":
        return None
    from .kernels.attention.fa4 import fa4_unsupported

    return reason if fa4_unsupported(q, block_q=128, block_k=128, factors=()) is None else None


def _all_full_lists(q, k, kv_flags, q_flags, config: PSAConfig, assign_levels):
    """``assign_levels`` of a dense ``config`` (every visible block at factor 1): no scores or caps are needed."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    nk = cdiv(Lk, config.block_k)
    scores = torch.zeros(B, Hq, cdiv(Lq, config.block_q), nk, dtype=torch.float32, device=q.device)
    cap = torch.ones(B, k.shape[1], nk, dtype=torch.int8, device=q.device)
    return assign_levels(scores, cap, kv_flags, q_flags, lq=Lq, lk=Lk, config=config)


def _full_plan(q, k, kv_flags, q_flags, config: PSAConfig, assign_levels) -> PSAPlan:
    """The plan dense causal attention computes: every visible block at full resolution, no pooling."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    dense_cfg = PSAConfig.preset("dense", block_q=config.block_q, block_k=config.block_k, stride=config.stride)
    factors, kv_idx, counts = _all_full_lists(q, k, kv_flags, q_flags, dense_cfg, assign_levels)
    return PSAPlan(
        level_map=LevelMap(factors, config.block_q, config.block_k, Lq, Lk),
        kv_idx=kv_idx,
        counts=counts,
        k_pooled=k.new_empty(B, k.shape[1], 0, D),
        v_pooled=k.new_empty(B, k.shape[1], 0, D),
        pool_factors=(),
        kv_flags=kv_flags,
    )


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
            this operator always runs PSA; the model patch uses dense attention for short inputs. With
            ``config.estimate_heads="kv"`` every query head of a GQA group gets its KV head's level map.
        level_map: A ``LevelMap`` or int ``[B, Hq, nq, nk]`` factors tensor to apply as is instead of
            estimating one (pooled factors on blocks that are not entirely in the past of every query of the
            query block, or that hold padding, are promoted to full resolution).
        scale: Softmax scale, ``1/sqrt(D)`` if ``None``: a positive finite number (Python, NumPy or 0-d
            tensor; ``bool`` is refused).
        key_padding_mask: Optional ``[B, Lk]``: bool (``True`` = real token) or integer 0/1 (1 = real token);
            float masks raise ``TypeError`` (an additive 0/-inf mask would read backwards). Padded keys are
            never attended and a query row that sees no real key gives zeros.
        token_types: Optional int ``[B, Lk]``: 0 text, non-zero visual (video/image placeholder); text blocks
            are kept at full resolution. Without it the last ``config.text_tail`` tokens count as text.
        backend: ``"auto"`` (FlashAttention-4 where installed on a Hopper-or-newer GPU, else Triton, on CUDA
            tensors; the PyTorch reference on the CPU), ``"fa4"``, ``"triton"`` or ``"reference"``
            (``resolve_backend``). On the GPU backends ``config.dense_guard`` may run dense attention instead
            of the sparse stage when that is predicted faster (``psa_vlm.cost``).

    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype (empty when ``B == 0``). A NaN or infinity in ``q``, ``k`` or
        ``v`` propagates as in SDPA: every row that attends to it is non-finite (the affected query blocks run
        at full resolution, so no level map hides it); rows that see no key give zeros.

    Raises:
        TypeError: Wrong types or dtypes (tensors, ``scale``, ``key_padding_mask``, ``config``).
        ValueError: Inconsistent shapes/devices, ``D == 0``, ``Lq > Lk``, or a config the backend cannot run
            (``check_config_for_backend``).
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
        ``LevelMap`` with int8 factors ``[B, Hq, nq, nk]`` (with ``config.estimate_heads="kv"`` equal within
        each GQA group of query heads).
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
