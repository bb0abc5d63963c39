"""Triton sparse attention (``kernels/attention/kernel.py``) against the reference and two anchors.

CPU tier: the kernel runs under the Triton interpreter (``tests/conftest.py``) at tiny, irregular shapes.
GPU tier (``pytest -m gpu`` with ``PSA_VLM_TEST_GPU=1``): Qwen2.5-VL-7B attention shapes in bfloat16.
"""

import math

import pytest
import torch

from psa_vlm.kernels.assign.naive import KV_NEEDS_FULL, KV_SKIP, build_block_lists
from psa_vlm.kernels.attention.kernel import sparse_attention
from psa_vlm.kernels.attention.naive import sparse_attention as sparse_attention_ref
from psa_vlm.kernels.geometry import cdiv
from psa_vlm.kernels.pool.naive import pyramid_pool

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ALL_POOL = (2, 4, 8)


# ---------------------------------------------------------------------------------------------- helpers
def rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, device=DEV):
    q = torch.randn(B, Hq, Lq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, device=device).to(dtype)
    return q, k, v


def random_lists(B, Hq, Lq, Lk, bq, bk, probs=(0.2, 0.2, 0.2, 0.2, 0.2), kv_flags=None, device=DEV):
    """Random factor map over (skip, 1, 2, 4, 8) with the given probabilities, as block lists."""
    nq, nk = cdiv(Lq, bq), cdiv(Lk, bk)
    choice = torch.multinomial(torch.tensor(probs, dtype=torch.float), B * Hq * nq * nk, replacement=True)
    f = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[choice].reshape(B, Hq, nq, nk).to(device)
    return build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk, kv_flags=kv_flags)


def pad_flags(mask, bk):
    """``KV_SKIP`` / ``KV_NEEDS_FULL`` flags ``[B, nk]`` of a ``[B, Lk]`` key padding mask."""
    B, Lk = mask.shape
    nk = cdiv(Lk, bk)
    m = torch.nn.functional.pad(mask, (0, nk * bk - Lk), value=True).reshape(B, nk, bk)
    real = torch.nn.functional.pad(torch.ones_like(mask), (0, nk * bk - Lk), value=False).reshape(B, nk, bk)
    n_valid = (m & real).sum(-1)
    partly = (n_valid > 0) & (n_valid < real.sum(-1))
    return (torch.where(n_valid == 0, KV_SKIP, 0) | torch.where(partly, KV_NEEDS_FULL, 0)).to(torch.int8)


def poisoned_out(B, Hq, Lq, D, dtype, transposed):
    """NaN-filled output buffer; ``transposed`` gives a ``[B, Lq, Hq, D]`` buffer seen as ``[B, Hq, Lq, D]``."""
    if transposed:
        return torch.full((B, Lq, Hq, D), float("nan"), dtype=dtype, device=DEV).transpose(1, 2)
    return torch.full((B, Hq, Lq, D), float("nan"), dtype=dtype, device=DEV)


def run_both(q, k, v, kv_idx, counts, bq, bk, factors=ALL_POOL, mask=None, transposed=False):
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=factors)
    B, Hq, Lq, D = q.shape
    out = poisoned_out(B, Hq, Lq, D, q.dtype, transposed)
    kw = dict(block_q=bq, block_k=bk, factors=factors, key_padding_mask=mask)
    got = sparse_attention(q, k, v, kp, vp, kv_idx, counts, out=out, **kw)
    assert got is out
    ref = sparse_attention_ref(q.float(), k.float(), v.float(), kp.float(), vp.float(), kv_idx, counts, **kw)
    return got, ref


def assert_close(got, ref, atol, rtol):
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN output"
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


def causal_sdpa(q, k, v, mask=None):
    """Dense bottom-right causal attention in float64 through torch SDPA (GQA by repeat, test only)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), o, torch.zeros_like(o)).nan_to_num(0.0)


def explicit_pooled(q, k, v, fmap, bq, bk):
    """Explicit construction: each pooled key of a block at factor p repeated p times, no ln p bias (float64)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, h // G].double(), v[b, h // G].double()
            for i in range(cdiv(Lq, bq)):
                r0, r1 = i * bq, min((i + 1) * bq, Lq)
                qpos = Lk - Lq + torch.arange(r0, r1, device=q.device)
                keys, vals, kpos = [], [], []
                for j in range(cdiv(Lk, bk)):
                    f = int(fmap[b, h, i, j])
                    lo, hi = j * bk, min((j + 1) * bk, Lk)
                    if f == 0:
                        continue
                    if f == 1:
                        keys.append(kh[lo:hi])
                        vals.append(vh[lo:hi])
                        kpos.append(torch.arange(lo, hi, device=q.device))
                    else:
                        km = kh[lo:hi].reshape(-1, f, D).mean(1).repeat_interleave(f, 0)
                        vm = vh[lo:hi].reshape(-1, f, D).mean(1).repeat_interleave(f, 0)
                        keys.append(km)
                        vals.append(vm)
                        kpos.append(torch.full((hi - lo,), -1, device=q.device))  # always in the past
                if not keys:
                    continue
                K, V, P = torch.cat(keys), torch.cat(vals), torch.cat(kpos)
                logits = q[b, h, r0:r1].double() @ K.T / math.sqrt(D)
                logits = logits.masked_fill(P[None, :] > qpos[:, None], float("-inf"))
                out[b, h, r0:r1] = torch.softmax(logits, -1) @ V
    return out


# ---------------------------------------------------------------------------------------------- CPU tier
# Tolerances: float32 matches the float32 reference up to accumulation order (~1e-6). float16 inputs are the
# reference's inputs exactly; the interpreter computes in float32 (tiles upcast), so the only extra error is
# rounding the output to float16 (half an ulp, 2**-11 relative for |o| <= 1): 2e-3. bfloat16 likewise with
# its 2**-8 ulp: 1e-2.
CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, bq, bk, dtype, atol, rtol)
    (1, 4, 2, 17, 17, 32, 16, 16, torch.float32, 2e-5, 2e-5),
    (1, 4, 2, 129, 300, 32, 16, 16, torch.float32, 2e-5, 2e-5),
    (1, 6, 2, 300, 300, 16, 32, 32, torch.float32, 2e-5, 2e-5),
    (2, 4, 2, 17, 129, 32, 16, 32, torch.float32, 2e-5, 2e-5),
    (1, 4, 4, 129, 129, 64, 32, 16, torch.float32, 2e-5, 2e-5),
    (1, 6, 2, 129, 300, 80, 32, 32, torch.float32, 2e-5, 2e-5),
    (1, 4, 2, 300, 300, 32, 32, 32, torch.float16, 2e-3, 2e-3),
    (1, 4, 2, 129, 300, 80, 32, 16, torch.float16, 2e-3, 2e-3),
    (1, 4, 2, 129, 129, 32, 16, 16, torch.bfloat16, 1e-2, 1e-2),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,dtype,atol,rtol", CASES)
def test_matches_reference(B, Hq, Hkv, Lq, Lk, D, bq, bk, dtype, atol, rtol):
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk)
    if Lq >= 129:  # long enough that every level shows up
        assert bool((counts.sum((0, 1, 2)) > 0).all()), counts.sum((0, 1, 2))
    got, ref = run_both(q, k, v, kv_idx, counts, bq, bk)
    assert_close(got, ref, atol, rtol)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)])
def test_strided_inputs_and_out(transposed, dtype, atol, rtol):
    """Inputs as [B, L, H, D] views (the attention module's layout) and a transposed output buffer."""
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 4, 2, 129, 129, 32, 16, 16
    q = torch.randn(B, Lq, Hq, D, device=DEV).to(dtype).transpose(1, 2)
    k = torch.randn(B, Lk, Hkv, D, device=DEV).to(dtype).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, D, device=DEV).to(dtype).transpose(1, 2)
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk)
    got, ref = run_both(q, k, v, kv_idx, counts, bq, bk, transposed=transposed)
    if transposed:
        assert got.stride(1) == D  # written in place through the caller's strides
    assert_close(got, ref, atol, rtol)


def test_last_dim_not_contiguous():
    """A last dimension with stride != 1 (input and output) is copied, not misread."""
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 2, 1, 33, 40, 16, 16, 16
    q = torch.randn(B, Hq, D, Lq, device=DEV).transpose(2, 3)
    k = torch.randn(B, Hkv, D, Lk, device=DEV).transpose(2, 3)
    v = torch.randn(B, Hkv, Lk, D, device=DEV)
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk)
    out = torch.full((B, Hq, D, Lq), float("nan"), device=DEV).transpose(2, 3)
    kw = dict(block_q=bq, block_k=bk, factors=ALL_POOL)
    got = sparse_attention(q, k, v, kp, vp, kv_idx, counts, out=out, **kw)
    ref = sparse_attention_ref(q, k, v, kp, vp, kv_idx, counts, **kw)
    assert got is out
    assert_close(got, ref, 2e-5, 2e-5)


@pytest.mark.parametrize(
    "Lq,Lk,bq,bk,dtype,atol,rtol",
    [
        (129, 129, 16, 16, torch.float32, 2e-5, 2e-5),
        (129, 300, 32, 16, torch.float32, 2e-5, 2e-5),
        (300, 300, 32, 32, torch.float16, 2e-3, 2e-3),
    ],
)
def test_left_padding(Lq, Lk, bq, bk, dtype, atol, rtol):
    """Left padding of different lengths per sequence; the first rows of the longest pad see no real key."""
    B, Hq, Hkv, D = 2, 2, 1, 32
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    n_pad = [Lk - Lq + 37, 5]  # sequence 0: query rows 0..36 see only padding
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
    for b, n in enumerate(n_pad):
        mask[b, :n] = False
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk, kv_flags=pad_flags(mask, bk))
    got, ref = run_both(q, k, v, kv_idx, counts, bq, bk, mask=mask)
    assert_close(got, ref, atol, rtol)
    assert bool((got[0, :, :37] == 0).all()), "a query row with no real key must give zeros"


@pytest.mark.parametrize("Lq,Lk,bq,bk", [(17, 17, 16, 16), (129, 300, 16, 32), (300, 300, 32, 32)])
def test_all_full_equals_causal_sdpa(Lq, Lk, bq, bk):
    """Anchor 1: every visible block at full resolution is plain bottom-right causal attention."""
    B, Hq, Hkv, D = 1, 4, 2, 32
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    f = torch.ones(B, Hq, cdiv(Lq, bq), cdiv(Lk, bk), dtype=torch.int8, device=DEV)
    _, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    kp = k.new_empty(B, Hkv, 0, D)  # binary lists need no pyramid
    out = poisoned_out(B, Hq, Lq, D, q.dtype, False)
    got = sparse_attention(q, k, v, kp, kp, kv_idx, counts, block_q=bq, block_k=bk, factors=(), out=out)
    assert_close(got, causal_sdpa(q, k, v), 2e-5, 2e-5)


def test_all_full_with_padding_equals_masked_sdpa():
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 2, 4, 2, 129, 129, 32, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
    mask[0, :40] = False
    mask[1, :3] = False
    f = torch.ones(B, Hq, cdiv(Lq, bq), cdiv(Lk, bk), dtype=torch.int8, device=DEV)
    _, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk, kv_flags=pad_flags(mask, bk))
    kp = k.new_empty(B, Hkv, 0, D)
    got = sparse_attention(
        q, k, v, kp, kp, kv_idx, counts, block_q=bq, block_k=bk, factors=(), key_padding_mask=mask,
        out=poisoned_out(B, Hq, Lq, D, q.dtype, False),
    )
    assert_close(got, causal_sdpa(q, k, v, mask), 2e-5, 2e-5)


@pytest.mark.parametrize("p", [2, 4, 8, "mixed"])
def test_pooled_equals_explicit_construction(p):
    """Anchor 2: a pooled block at factor p equals its pooled keys each repeated p times (no ln p bias)."""
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 4, 2, 100, 129, 16, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    nq, nk = cdiv(Lq, bq), cdiv(Lk, bk)
    if p == "mixed":
        f = torch.tensor([1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 4, (B, Hq, nq, nk))].to(DEV)
    else:
        f = torch.full((B, Hq, nq, nk), p, dtype=torch.int8, device=DEV)
    fmap, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    assert int(counts[..., 1:].sum()) > 0
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    out = poisoned_out(B, Hq, Lq, D, q.dtype, False)
    got = sparse_attention(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=ALL_POOL, out=out)
    assert_close(got, explicit_pooled(q, k, v, fmap, bq, bk), 2e-5, 2e-5)


@pytest.mark.parametrize("factors", [(), (2,), (4, 8)])
def test_partial_pyramids(factors):
    """Pyramids holding only some levels (level offsets shift) and binary lists with an empty pyramid."""
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 4, 2, 129, 200, 32, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    probs = [0.2, 0.2] + [0.2 if p in factors else 0.0 for p in ALL_POOL]
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk, probs=probs)
    got, ref = run_both(q, k, v, kv_idx, counts, bq, bk, factors=factors)
    assert_close(got, ref, 2e-5, 2e-5)


def test_scale_and_empty_rows():
    """An explicit scale, and query blocks whose list is empty give zeros."""
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 2, 1, 64, 64, 32, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    f = torch.ones(B, Hq, 4, 4, dtype=torch.int8, device=DEV)
    f[:, :, 2] = 0  # query block 2: nothing listed
    _, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    kw = dict(block_q=bq, block_k=bk, factors=ALL_POOL, scale=0.3)
    got = sparse_attention(q, k, v, kp, vp, kv_idx, counts, out=poisoned_out(B, Hq, Lq, D, q.dtype, False), **kw)
    ref = sparse_attention_ref(q, k, v, kp, vp, kv_idx, counts, **kw)
    assert_close(got, ref, 2e-5, 2e-5)
    assert bool((got[:, :, 32:48] == 0).all())


def test_errors():
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 2, 1, 32, 32, 16, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    f = torch.full((B, Hq, 2, 2), 4, dtype=torch.int8, device=DEV)
    _, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=(2,))
    with pytest.raises(ValueError, match="pool factors"):
        sparse_attention(q, k, v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=(2,))
    with pytest.raises(NotImplementedError, match="powers of two"):
        sparse_attention(q, k, v, kp, vp, kv_idx, counts, block_q=24, block_k=bk, factors=(2,))
    with pytest.raises(TypeError, match="int32"):
        sparse_attention(q, k, v, kp, vp, kv_idx.long(), counts, block_q=bq, block_k=bk, factors=(2,))
    with pytest.raises(TypeError, match="dtype"):
        sparse_attention(q, k.half(), v, kp, vp, kv_idx, counts, block_q=bq, block_k=bk, factors=(2,))


# ---------------------------------------------------------------------------------------------- GPU tier
def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("L,mixed", [(8192, True), (8192, False), (8000, True)])
def test_gpu_bf16_qwen_shapes(L, mixed):
    """Qwen2.5-VL-7B attention shapes (28/4 heads, D 128), bf16: rel. error <= 1e-2 vs the fp32 reference."""
    B, Hq, Hkv, D, bq, bk = 1, 28, 4, 128, 128, 128
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, torch.bfloat16, device="cuda")
    probs = (0.5, 0.2, 0.1, 0.1, 0.1) if mixed else (0.7, 0.3, 0.0, 0.0, 0.0)
    _, kv_idx, counts = random_lists(B, Hq, L, L, bq, bk, probs=probs, device="cuda")
    got, ref = run_both(q, k, v, kv_idx, counts, bq, bk, transposed=True)
    assert not torch.isnan(got).any()
    assert _rel(got, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_dense_list_vs_sdpa():
    """All-full lists vs torch SDPA (bf16): error against the fp32 result within 2x SDPA's own (FA-style)."""
    B, Hq, Hkv, L, D, bq, bk = 1, 28, 4, 4096, 128, 128, 128
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, torch.bfloat16, device="cuda")
    f = torch.ones(B, Hq, L // bq, L // bk, dtype=torch.int8, device="cuda")
    _, kv_idx, counts = build_block_lists(f, lq=L, lk=L, block_q=bq, block_k=bk)
    kp = k.new_empty(B, Hkv, 0, D)
    out = poisoned_out(B, Hq, L, D, q.dtype, False)
    got = sparse_attention(q, k, v, kp, kp, kv_idx, counts, block_q=bq, block_k=bk, factors=(), out=out)
    G = Hq // Hkv
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), is_causal=True)
    assert not torch.isnan(got).any()
    err, err_sdpa = (got.float() - ref).abs().max(), (sdpa.float() - ref).abs().max()
    assert err <= 2 * err_sdpa + 1e-5, (float(err), float(err_sdpa))
    assert _rel(got, ref) <= 2 * _rel(sdpa, ref) + 1e-5


@pytest.mark.parametrize("tiles", [(16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_tiles_smaller_than_blocks(tiles, padded):
    """GPU tile choices below the block sizes: query blocks split over programs, KV blocks over key tiles."""
    from psa_vlm.kernels.attention import kernel as K

    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 4, 2, 100, 161, 32, 32, 32
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    mask = None
    if padded:
        mask = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
        mask[:, :70] = False
    _, kv_idx, counts = random_lists(B, Hq, Lq, Lk, bq, bk, kv_flags=None if mask is None else pad_flags(mask, bk))
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=ALL_POOL)
    out = poisoned_out(B, Hq, Lq, D, q.dtype, False)
    kw = dict(block_q=bq, block_k=bk, factors=ALL_POOL, key_padding_mask=mask)
    K._launch(q, k, v, kp, vp, kv_idx, counts, out, scale=1 / math.sqrt(D), tiles=tiles, **kw)
    assert_close(out, sparse_attention_ref(q, k, v, kp, vp, kv_idx, counts, **kw), 2e-5, 2e-5)


def test_missing_level_gives_nan_rows_in_kernel():
    """On CUDA the launcher does not synchronise to check the lists: the kernel marks such rows with NaN."""
    from psa_vlm.kernels.attention import kernel as K

    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 2, 1, 64, 64, 16, 16, 16
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    f = torch.full((B, Hq, 4, 4), 4, dtype=torch.int8, device=DEV)
    _, kv_idx, counts = build_block_lists(f, lq=Lq, lk=Lk, block_q=bq, block_k=bk)
    kp, vp, _ = pyramid_pool(k, v, block_k=bk, factors=(2,))
    out = torch.zeros(B, Hq, Lq, D, device=DEV)
    K._launch(
        q, k, v, kp, vp, kv_idx, counts, out, block_q=bq, block_k=bk, factors=(2,), scale=0.25,
        key_padding_mask=None, tiles=(bq, bk, 4, 1),
    )
    bad = counts[..., 2] > 0  # [B, Hq, nq]: query blocks that list a factor-4 block
    rows_nan = torch.isnan(out).all(-1).reshape(B, Hq, 4, bq).all(-1)
    assert bool(bad.any()) and torch.equal(rows_nan, bad)
