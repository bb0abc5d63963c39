"""Triton pyramid pooling (``kernels/pool/kernel.py``) against the reference ``kernels/pool/naive.py``.

CPU tier: the kernel runs under the Triton interpreter (``tests/conftest.py``) at tiny, irregular shapes.
GPU tier (``pytest -m gpu`` with ``PSA_VLM_TEST_GPU=1``): Qwen2.5-VL-7B KV shapes in bfloat16.
"""

import itertools

import pytest
import torch

from psa_vlm.kernels.geometry import cdiv, level_offsets
from psa_vlm.kernels.pool import kernel as pool_kernel
from psa_vlm.kernels.pool.kernel import pyramid_pool
from psa_vlm.kernels.pool.naive import COS_EPS
from psa_vlm.kernels.pool.naive import pyramid_pool as pyramid_pool_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SIMS = (0.75, 0.70, 0.70)
ALL_SUBSETS = [s for n in range(4) for s in itertools.combinations((2, 4, 8), n)]


# ---------------------------------------------------------------------------------------------- helpers
def smooth_kv(B, H, L, D, bk, dtype, device=DEV):
    """Keys whose blocks range from near-constant to noisy, so every cap value occurs; random values."""
    nk = cdiv(L, bk)
    sigma = torch.tensor([0.02, 0.3, 0.8, 3.0])[torch.randint(0, 4, (B, H, nk))]
    sigma = sigma.repeat_interleave(bk, dim=2)[:, :, :L, None]
    k = 2.0 * torch.randn(B, H, 1, D) + torch.cumsum(sigma * torch.randn(B, H, L, D), dim=2)
    v = torch.randn(B, H, L, D)
    return k.to(dtype).to(device), v.to(dtype).to(device)


@pytest.fixture
def poisoned(monkeypatch):
    """Make the kernel's output buffers NaN (floats) / 99 (int8) so an unwritten element fails."""

    def alloc(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, 99, dtype=dtype, device=device)

    monkeypatch.setattr(pool_kernel, "_alloc", alloc)


def mean_cos(k, bk, p):
    """Float64 mean first/last cosine of every length-``p`` window, per complete block ``[B, H, nkf]``."""
    B, H, L, D = k.shape
    nkf = L // bk
    w = k[:, :, : nkf * bk].double().reshape(B, H, nkf, bk // p, p, D)
    a, b = w[..., 0, :], w[..., p - 1, :]
    cos = (a * b).sum(-1) / torch.clamp(a.norm(dim=-1) * b.norm(dim=-1), min=COS_EPS)
    return cos.mean(-1)


def check_cap(cap, ref_cap, k, bk, factors, sims, tol=1e-5):
    """Caps must be equal, except where some factor's mean cosine lies within ``tol`` of its threshold."""
    mism = cap != ref_cap
    if not mism.any():
        return
    nkf = k.shape[2] // bk
    near = torch.zeros_like(mism)
    if sims is not None:
        for p in factors:
            thr = dict(zip((2, 4, 8), sims))[p]
            near[:, :, :nkf] |= (mean_cos(k.float(), bk, p) - thr).abs() < tol
    assert not (mism & ~near).any(), f"cap differs away from a threshold at {torch.nonzero(mism & ~near)[:5]}"


def check_pool(k, v, bk, factors, sims, atol, rtol):
    got = pyramid_pool(k, v, block_k=bk, factors=factors, sim_thresholds=sims)
    ref = pyramid_pool_ref(k.float(), v.float(), block_k=bk, factors=factors, sim_thresholds=sims)
    kp, vp, cap = got
    rkp, rvp, rcap = ref
    B, H, L, D = k.shape
    rows = level_offsets(L // bk, bk, factors)[0] if factors else 0
    assert kp.shape == vp.shape == (B, H, rows, D) and kp.dtype == k.dtype and vp.dtype == v.dtype
    assert cap.shape == (B, H, cdiv(L, bk)) and cap.dtype == torch.int8
    assert not torch.isnan(kp).any() and not torch.isnan(vp).any(), "unwritten pooled rows"
    torch.testing.assert_close(kp.float(), rkp.to(k.dtype).float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(vp.float(), rvp.to(v.dtype).float(), atol=atol, rtol=rtol)
    assert set(cap.unique().tolist()) <= {1, 2, 4, 8}, "unwritten or invalid cap"
    check_cap(cap, rcap, k, bk, factors, sims)
    return cap, rcap


# ---------------------------------------------------------------------------------------------- CPU tier
# fp32: means of <= 8 values in another summation order differ by a few ulp; fp16: one rounding of that
CASES = [
    # B, H, L, D, bk, dtype, atol, rtol
    (2, 2, 300, 24, 32, torch.float32, 1e-5, 1e-5),
    (2, 2, 129, 16, 16, torch.float32, 1e-5, 1e-5),
    (1, 2, 17, 32, 16, torch.float16, 2e-3, 2e-3),
    (2, 1, 300, 20, 32, torch.float16, 2e-3, 2e-3),
    (1, 2, 296, 16, 48, torch.float32, 1e-5, 1e-5),  # bk not a power of two: a partial chunk per block
]


@pytest.mark.parametrize("B,H,L,D,bk,dtype,atol,rtol", CASES)
def test_matches_reference(poisoned, B, H, L, D, bk, dtype, atol, rtol):
    k, v = smooth_kv(B, H, L, D, bk, dtype)
    _, rcap = check_pool(k, v, bk, (2, 4, 8), SIMS, atol, rtol)
    if L >= 4 * bk:  # the similarity inputs must exercise more than one cap value
        assert len(rcap.unique()) >= 2


@pytest.mark.parametrize("factors", ALL_SUBSETS)
@pytest.mark.parametrize("with_sims", [True, False])
def test_every_factor_subset(poisoned, factors, with_sims):
    k, v = smooth_kv(1, 2, 129, 16, 32, torch.float32)
    sims = (0.6, 0.55, 0.5) if with_sims else None
    cap, _ = check_pool(k, v, 32, factors, sims, 1e-5, 1e-5)
    if not factors:
        assert (cap == 1).all()
    elif not with_sims:
        assert (cap[:, :, :4] == max(factors)).all() and (cap[:, :, 4:] == 1).all()


def test_strided_and_noncontiguous_inputs(poisoned):
    k, v = smooth_kv(2, 2, 100, 16, 16, torch.float32)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] storage seen as [B, H, L, D]
    vt = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dimension not contiguous: copied
    assert not kt.is_contiguous() and vt.stride(-1) != 1
    check_pool(kt, vt, 16, (2, 4, 8), SIMS, 1e-5, 1e-5)


def test_only_incomplete_block(poisoned):
    k, v = smooth_kv(1, 2, 17, 16, 32, torch.float32)
    kp, vp, cap = pyramid_pool(k, v, block_k=32, factors=(2, 4, 8), sim_thresholds=SIMS)
    assert kp.shape == (1, 2, 0, 16) and vp.shape == (1, 2, 0, 16)
    assert (cap == 1).all()


def test_cap_near_threshold_tolerance_is_narrow():
    """The cap check can fail: a wrong cap away from every threshold is reported."""
    k, v = smooth_kv(1, 1, 128, 16, 32, torch.float32)
    _, _, rcap = pyramid_pool_ref(k, v, block_k=32, factors=(2, 4, 8), sim_thresholds=SIMS)
    bad = rcap.clone()
    bad[0, 0, 0] = 1 if bad[0, 0, 0] != 1 else 8
    with pytest.raises(AssertionError):
        check_cap(bad, rcap, k, 32, (2, 4, 8), SIMS)


def test_errors():
    k = torch.randn(1, 2, 64, 16, device=DEV)
    with pytest.raises(ValueError):
        pyramid_pool(k, k, block_k=12, factors=(8,))
    with pytest.raises(ValueError):
        pyramid_pool(k, k, block_k=16, factors=(3,))
    with pytest.raises(ValueError):
        pyramid_pool(k, k[:, :1], block_k=16, factors=(2,))
    with pytest.raises(TypeError):
        pyramid_pool(k.double(), k.double(), block_k=16, factors=(2,))
    with pytest.raises(ValueError):
        pyramid_pool(k, k, block_k=16, factors=(2,), sim_thresholds=(0.5,))


# ---------------------------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("L", [8192, 8192 + 77])
def test_gpu_bf16_qwen_shapes(L):
    from psa_vlm.bench.synthetic import video_like_qkv

    _, k, v = video_like_qkv(1, 4, 4, L, 128, dtype=torch.bfloat16, device="cuda", seed=None)
    for factors, sims in (((2, 4, 8), SIMS), ((4, 8), None)):
        # bf16 outputs: the reference's float32 means rounded once to bf16 (one bf16 ulp)
        check_pool(k, v, 128, factors, sims, atol=1e-2, rtol=1e-2)
