"""Synthetic video-like attention inputs: tokens of a frame vary smoothly in space, frames drift slowly in time.

Real video tokens are redundant: neighbouring patches look alike and consecutive frames change little, so
attention concentrates on a few frames and pooled keys summarise the rest well. Uniform random q/k have none
of that structure (every block is equally important, nothing pools well); these tensors have it, so they show
PSA's behaviour on the inputs it is built for.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["video_like_qkv", "video_like_embeddings"]


def _latents(B: int, L: int, tokens_per_frame: int, text_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Video-like latent features ``[B, L, E]`` (E = 64) from generator ``g``."""
    E = 64  # latent feature width
    n_vis = max(L - text_tokens, 0)
    n_frames = -(-n_vis // tokens_per_frame) if n_vis else 0
    side = max(1, int(tokens_per_frame**0.5))
    # smooth spatial field: low-frequency random Fourier features over the patch grid
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(-(-tokens_per_frame // side)), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1)[:tokens_per_frame].float() / side
    freqs = torch.randn(2, E, generator=g) * 3.0
    phase = torch.rand(E, generator=g) * 6.283
    spatial = torch.cos(pos @ freqs + phase)  # [tokens_per_frame, E]
    # slow temporal drift with occasional scene cuts
    steps = torch.randn(max(n_frames, 1), E, generator=g) * 0.15
    cuts = torch.rand(max(n_frames, 1), generator=g) < 0.05
    steps[cuts] = torch.randn(int(cuts.sum()), E, generator=g) * 2.0
    temporal = torch.cumsum(steps, 0)
    feats = []
    if n_vis:
        frames = spatial[None] + temporal[:, None, :]  # [T, P, E]
        feats.append(frames.reshape(-1, E)[:n_vis])
    feats.append(torch.randn(L - n_vis, E, generator=g) * 1.5)
    x = torch.cat(feats)  # [L, E]
    x = x + 0.1 * torch.randn(L, E, generator=g)
    x = x[None].expand(B, L, E) + 0.05 * torch.randn(B, L, E, generator=g)

    return x


def _generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


def video_like_embeddings(
    L: int,
    hidden: int,
    *,
    tokens_per_frame: int = 256,
    text_tokens: int = 64,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: Optional[int] = 0,
) -> torch.Tensor:
    """Input embeddings ``[1, L, hidden]`` with the same video-like structure, scaled to ``std`` per element."""
    g = _generator(seed)
    x = _latents(1, L, tokens_per_frame, text_tokens, g).to(device)
    w = torch.randn(x.shape[-1], hidden, generator=g).to(device)
    e = x @ w
    return (e * (std / e.std().clamp(min=1e-12))).to(dtype)


def video_like_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    L: int,
    D: int,
    *,
    tokens_per_frame: int = 256,
    text_tokens: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: Optional[int] = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[B, H, L, D]`` shaped like a long video followed by a text question.

    Args:
        B, Hq, Hkv, L, D: Shapes (``Hq % Hkv == 0``).
        tokens_per_frame: Visual tokens per frame (a 16x16 patch grid by default).
        text_tokens: Trailing text tokens (the question), unstructured.
        dtype, device: Output dtype and device (generation runs in float32).
        seed: Generator seed (``None``: nondeterministic).

    Returns:
        ``(q, k, v)`` with ``q`` ``[B, Hq, L, D]`` and ``k``, ``v`` ``[B, Hkv, L, D]``.
    """
    g = _generator(seed)
    E = 64
    x = _latents(B, L, tokens_per_frame, text_tokens, g)
    x = x.to(device)

    def proj(H: int, gain: float) -> torch.Tensor:
        w = (torch.randn(H, E, D, generator=g) * (gain / E**0.5)).to(device)
        return torch.einsum("ble,hed->bhld", x, w).to(dtype)

    return proj(Hq, 2.0), proj(Hkv, 2.0), proj(Hkv, 1.0)
