"""Triton antidiagonal importance (``kernels/estimate/kernel.py``) against ``kernels/estimate/naive.py``.

CPU tier: the kernel runs under the Triton interpreter (``tests/conftest.py``) at tiny, irregular shapes,
with the tile/launch overrides that force its rarer paths (several work items per persistent program, pair
groups that straddle query blocks, D split into chunks, padded KV-block columns, the flattened loop).
GPU tier (``pytest -m gpu`` with ``PSA_VLM_TEST_GPU=1``): Qwen2.5-VL-7B attention shapes in bfloat16.
"""

import pytest
import torch

from psa_vlm.kernels.estimate import kernel as est_kernel
from psa_vlm.kernels.estimate.kernel import block_importance
from psa_vlm.kernels.estimate.naive import block_importance as block_importance_ref
from psa_vlm.kernels.geometry import block_masks, cdiv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled output buffer: every element must be written (zeros where invisible)."""

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(est_kernel, "_alloc", alloc)


@pytest.fixture
def overrides(monkeypatch):
    """Set tile/launch overrides for one test (restored afterwards)."""

    def apply(**kw):
        monkeypatch.setattr(est_kernel, "_OVERRIDES", dict(kw))

    return apply


def check(q, k, bq, bk, s, scale=None, atol=1e-5, rtol=1e-4):
    got = block_importance(q, k, block_q=bq, block_k=bk, stride=s, scale=scale)
    ref = block_importance_ref(q.float(), k.float(), block_q=bq, block_k=bk, stride=s, scale=scale)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) output"
    vis, _ = block_masks(q.shape[2], k.shape[2], bq, bk, got.device)
    assert (got[..., ~vis] == 0).all(), "invisible block pairs must be exactly 0"
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    return got


def rand(shape, dtype):
    return torch.randn(*shape, device=DEV).to(dtype)


# ---------------------------------------------------------------------------------------------- CPU tier
# float32 / float16 inputs: products are exact in float32 in both; sums and exp2 vs exp differ by rounding only
CASES = [
    # B, Hq, Hkv, Lq, Lk, D, bq, bk, s, dtype
    (1, 2, 1, 17, 17, 16, 16, 16, 4, torch.float32),
    (2, 4, 2, 129, 300, 16, 16, 32, 4, torch.float32),  # Lq < Lk, batch 2, GQA 2
    (1, 6, 2, 300, 300, 32, 32, 16, 8, torch.float16),  # GQA 3
    (1, 4, 2, 100, 129, 16, 32, 32, 8, torch.float32),
    (1, 4, 2, 57, 70, 16, 12, 24, 4, torch.float32),  # bq/s = 3, bk/s = 6: padded tile columns
    (1, 3, 1, 40, 40, 20, 16, 16, 4, torch.float16),  # D not a power of two
    # the default 128 x 128 blocks at the strides PSAConfig offers besides 8 (see PSAConfig.stride)
    (1, 4, 2, 300, 300, 16, 128, 128, 16, torch.float32),  # bq/s = 8 rows, 16 pairs per item on the GPU
    (2, 6, 2, 200, 333, 16, 128, 128, 16, torch.float16),  # s 16: Lq < Lk, batch 2, GQA 3, ragged tails
    (1, 2, 1, 150, 150, 16, 128, 128, 4, torch.float32),  # s 4: bq/s = 32 rows, one pair per item
    (1, 4, 1, 97, 97, 24, 32, 64, 16, torch.float32),  # s 16: bq/s = 2, bk/s = 4, D 24 (not a power of two)
    (1, 3, 1, 100, 150, 16, 16, 32, 16, torch.float32),  # s = bq: one reduced row per query block
    (1, 4, 2, 70, 100, 16, 48, 48, 16, torch.float32),  # s 16: bq/s = bk/s = 3, padded tile columns
    (1, 4, 2, 300, 333, 16, 128, 128, 32, torch.float32),  # s 32: bq/s = 4 rows, Lq < Lk, ragged tails
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,s,dtype", CASES)
def test_matches_reference(poisoned, B, Hq, Hkv, Lq, Lk, D, bq, bk, s, dtype):
    q, k = rand((B, Hq, Lq, D), dtype), rand((B, Hkv, Lk, D), dtype)
    out = check(q, k, bq, bk, s)
    # each reduced row is a distribution: row i sums to its number of reduced rows
    n_rows = torch.tensor([len(range(i * bq, min((i + 1) * bq, Lq), s)) for i in range(cdiv(Lq, bq))])
    torch.testing.assert_close(out.sum(-1), n_rows.float().to(out.device).expand_as(out.sum(-1)), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("s,bq,bk", [(4, 16, 16), (16, 32, 32)])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(PROGRAMS=1),  # one persistent program walks every item (scratch reused)
        dict(PROGRAMS=5, ROWS=64, BN=32),  # pair groups straddle query blocks; several KV blocks per key tile
        dict(FLAT=True, BKD=16),  # flattened loop, D in 2 chunks
        dict(ROWS=2, NJ=16),  # a query block taller than ROWS: one pair per item, BM > ROWS
    ],
)
def test_tile_and_schedule_paths(poisoned, overrides, cfg, s, bq, bk):
    overrides(**cfg)
    q, k = rand((2, 6, 90, 32), torch.float32), rand((2, 2, 130, 32), torch.float32)
    check(q, k, bq, bk, s, scale=0.3)


# GEMM form (16-bit inputs, power-of-two bq/s and bk/s): reduced rows and reversed reduced keys through TMA
# descriptors. Forced on (and, for the same inputs, off) so both forms are compared with the reference.
GEMM_CASES = [
    # B, Hq, Hkv, Lq, Lk, D, bq, bk, s, dtype
    (1, 2, 1, 64, 64, 16, 16, 16, 4, torch.float16),  # lengths multiples of s: q used in place
    (2, 6, 2, 129, 300, 16, 16, 32, 4, torch.float16),  # Lq < Lk, ragged tails (zero-padded copies), GQA 3
    (1, 4, 1, 301, 301, 20, 32, 16, 4, torch.float16),  # D 20: s*D = 80, D chunks past the row (zero-filled)
    (1, 4, 2, 300, 333, 16, 128, 128, 16, torch.float16),  # s 16 on 128 x 128 blocks: bq/s = 8
    (1, 2, 1, 150, 150, 16, 128, 128, 4, torch.float16),  # s 4: bq/s = 32 rows, one query block per item here
    (1, 3, 1, 100, 150, 16, 16, 32, 16, torch.float16),  # s = bq: one reduced row per query block
    (1, 4, 2, 90, 90, 16, 16, 16, 8, torch.bfloat16),  # bf16 (upcast after the descriptor load)
    (1, 6, 2, 290, 333, 16, 128, 128, 32, torch.float16),  # s 32 on 128 x 128 blocks: bq/s = 4, GQA 3
]


@pytest.mark.parametrize("gemm", [True, False])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,s,dtype", GEMM_CASES)
def test_gemm_form_matches_reference(poisoned, overrides, spy, gemm, B, Hq, Hkv, Lq, Lk, D, bq, bk, s, dtype):
    overrides(GEMM=gemm)
    calls = spy(est_kernel, "_launch_gemm")
    q, k = rand((B, Hq, Lq, D), dtype), rand((B, Hkv, Lk, D), dtype)
    check(q, k, bq, bk, s)
    assert len(calls) == int(gemm)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(PROGRAMS=1),  # one persistent program walks every item (scratch reused)
        dict(PROGRAMS=4, ROWS=16, BN=32, NJ=32),  # four query blocks per item, eight KV blocks per key tile
        dict(ROWS=64, BKD=16, FLAT=True),  # 16 query blocks per item (11 past nq), s*D in 4 chunks
    ],
)
def test_gemm_form_tile_and_schedule_paths(poisoned, overrides, spy, cfg):
    overrides(GEMM=True, **cfg)
    calls = spy(est_kernel, "_launch_gemm")
    q = rand((2, 70, 6, 16), torch.float16).transpose(1, 2)  # [B, L, H, D] storage: copied into place
    k = rand((2, 2, 130, 16), torch.float16)
    check(q, k, 16, 16, 4, scale=0.3)
    assert calls


# transformers' layout: [B, Hq, L, D] views of [B, L, Hq, D] storage, read in place (no query copy) when
# L % s == 0 or B == 1; a ragged last group (whose missing rows lie past the storage) is left out of the kernel and
# added by _add_ragged_row
LAYOUT_CASES = [
    # B, Hq, Hkv, Lq, Lk, D, bq, bk, s, ROWS (reduced rows per item), read in place
    (1, 4, 2, 320, 320, 16, 16, 16, 4, 32, True),  # 3 row tiles in place
    (1, 6, 2, 256, 390, 32, 32, 16, 8, 16, True),  # Lq < Lk, D 32 (BKD 32: one chunk per query row), GQA 3
    (2, 4, 1, 256, 300, 16, 16, 32, 4, 32, True),  # batch 2
    (1, 4, 2, 704, 704, 16, 128, 128, 16, 32, True),  # s 16 on 128 x 128 blocks, 2 row tiles
    (1, 2, 1, 96, 120, 16, 32, 32, 8, 16, True),  # bf16 (upcast after the load)
    (1, 4, 2, 301, 301, 16, 16, 16, 4, 32, True),  # ragged, 3 row tiles: the last row added afterwards
    (1, 6, 2, 253, 390, 32, 32, 16, 8, 16, True),  # ragged, Lq < Lk, GQA 3, D 32
    (1, 4, 2, 701, 701, 16, 128, 128, 16, 32, True),  # ragged at s 16
    (1, 2, 1, 129, 129, 16, 16, 16, 4, 32, True),  # ragged row alone in the last row tile (32 * 4 + 1 queries)
    (2, 4, 1, 70, 130, 16, 16, 16, 4, 32, False),  # ragged, batch 2: copied
    (1, 2, 1, 3, 40, 16, 16, 16, 4, 32, False),  # Lq < s: copied
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,s,rows,in_place", LAYOUT_CASES)
def test_gemm_form_reads_transformers_layout_in_place(poisoned, overrides, B, Hq, Hkv, Lq, Lk, D, bq, bk, s, rows,
                                                      in_place):
    overrides(GEMM=True, ROWS=rows, PROGRAMS=2)
    dtype = torch.bfloat16 if Lq == 96 else torch.float16
    q = rand((B, Lq, Hq, D), dtype).transpose(1, 2)
    k = rand((B, Hkv, Lk, D), dtype)
    cfg = est_kernel._gemm_tiles(bq // s, bk // s, s * D, True, est_kernel._OVERRIDES)
    qo = est_kernel._gemm_query(q, s, cfg["BKD"], True)
    assert (qo.view.data_ptr() == q.data_ptr()) == in_place and qo.col_hd == (D if in_place else 0)
    assert qo.rows == (Lq // s if in_place else -(-Lq // s))
    check(q, k, bq, bk, s)


def test_gemm_form_in_place_edge_layouts(poisoned, overrides):
    overrides(GEMM=True, ROWS=32, PROGRAMS=2)
    k = rand((2, 1, 200, 16), torch.float16)
    # one head, batch 2, a partial last row tile
    q = rand((2, 160, 1, 16), torch.float16).transpose(1, 2)
    assert est_kernel._gemm_query(q, 4, 32, True).view.data_ptr() == q.data_ptr()
    check(q, k, 16, 16, 4)
    # a slice along L of transformers' storage (a storage offset), batch 1: still in place
    q = rand((1, 200, 2, 16), torch.float16).transpose(1, 2)[:, :, 40:]
    k1 = rand((1, 1, 200, 16), torch.float16)
    assert est_kernel._gemm_query(q, 4, 32, True).view.data_ptr() == q.data_ptr()
    check(q, k1, 16, 16, 4)
    # a pointer that is not 16-byte aligned: copied
    flat = torch.empty(1 + 160 * 2 * 16, dtype=torch.float16, device=DEV)
    q = flat[1:].view(1, 160, 2, 16).transpose(1, 2)
    q.copy_(rand((1, 2, 160, 16), torch.float16))
    assert q.data_ptr() % 16 and est_kernel._gemm_query(q, 4, 32, True).view.data_ptr() != q.data_ptr()
    check(q, k1[:, :, :160], 16, 16, 4)


def test_gemm_form_copies_what_it_cannot_read_in_place():
    q = rand((1, 72, 4, 24), torch.float16).transpose(1, 2)  # D 24: no chunk of 16 or more divides it
    qo = est_kernel._gemm_query(q, 4, 32, True)
    assert qo.view.data_ptr() != q.data_ptr() and qo.bkd == 32
    q = rand((1, 4, 72, 16), torch.float16)[:, :, :64]  # strided [B, H, L, D]: neither layout
    assert est_kernel._gemm_query(q, 4, 32, True).view.data_ptr() != q.data_ptr()


def test_gemm_form_refuses_what_it_cannot_run(overrides):
    overrides(GEMM=True)
    q, k = rand((1, 2, 32, 16), torch.float32), rand((1, 1, 32, 16), torch.float32)
    with pytest.raises(ValueError, match="GEMM form"):
        block_importance(q, k, block_q=16, block_k=16, stride=4)  # float32: the general form only
    q16, k16 = q.half(), k.half()
    with pytest.raises(ValueError, match="GEMM form"):
        block_importance(q16, k16, block_q=12, block_k=24, stride=4)  # bq/s = 3: not a power of two


def test_strided_inputs(poisoned):
    q = rand((1, 70, 4, 16), torch.float32).transpose(1, 2)  # [B, L, H, D] storage
    k = rand((1, 2, 16, 100), torch.float32).transpose(-1, -2)  # last dim not contiguous: copied
    assert not q.is_contiguous() and k.stride(-1) != 1
    check(q, k, 16, 32, 4)


def test_bf16_inputs_upcast_under_interpreter(poisoned):
    q, k = rand((1, 4, 64, 16), torch.bfloat16), rand((1, 2, 64, 16), torch.bfloat16)
    check(q, k, 16, 16, 4)


def test_program_count_does_not_change_result(poisoned, monkeypatch):
    q, k = rand((1, 4, 80, 16), torch.float32), rand((1, 2, 80, 16), torch.float32)
    a = block_importance(q, k, block_q=16, block_k=16, stride=4)
    monkeypatch.setattr(est_kernel, "_OVERRIDES", dict(PROGRAMS=2))
    b = block_importance(q, k, block_q=16, block_k=16, stride=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_errors():
    q, k = torch.randn(1, 4, 32, 16, device=DEV), torch.randn(1, 2, 32, 16, device=DEV)
    with pytest.raises(ValueError):
        block_importance(q, k, block_q=16, block_k=16, stride=3)
    with pytest.raises(ValueError):
        block_importance(q, k[:, :, :, :8], block_q=16, block_k=16, stride=4)
    with pytest.raises(ValueError):
        block_importance(q[:, :3], k, block_q=16, block_k=16, stride=4)
    with pytest.raises(TypeError):
        block_importance(q.double(), k.double(), block_q=16, block_k=16, stride=4)


# ---------------------------------------------------------------------------------------------- GPU tier
def test_gluon_engine_not_on_cpu(overrides):
    """The Gluon kernel (wgmma) never runs under the interpreter; asking for it there is an error, not a fallback."""
    q = torch.zeros(1, 2, 16, 16, dtype=torch.float16)
    assert not est_kernel._gluon_engine(q, True, {})
    assert not est_kernel._gluon_engine(q, True, {"GLUON": False})
    with pytest.raises(ValueError, match="Gluon"):
        est_kernel._gluon_engine(q, True, {"GLUON": True})


def test_gluon_needs_triton_3_6(monkeypatch):
    monkeypatch.setattr(est_kernel.triton, "__version__", "3.5.1")
    est_kernel._gluon_import_error.cache_clear()
    try:
        assert "3.5.1" in est_kernel._gluon_import_error()
    finally:
        monkeypatch.undo()
        est_kernel._gluon_import_error.cache_clear()


@pytest.fixture
def as_on_hopper(monkeypatch):
    """The estimator as on a Hopper GPU: only the hardware check is patched (the real ``_gluon_engine`` decides,
    including "not again after a failure"), no failure recorded yet; yields the ``hopper`` module to patch."""
    pytest.importorskip("triton.experimental.gluon")
    from psa_vlm.kernels.estimate import hopper

    if est_kernel._gluon_import_error() is not None:
        pytest.skip(f"Gluon kernel unavailable here: {est_kernel._gluon_import_error()}")
    monkeypatch.setattr(est_kernel, "_GLUON_FAILURE", None)
    monkeypatch.setattr(est_kernel, "_gluon_hardware", lambda q, interpret: True)
    monkeypatch.setattr(est_kernel, "_num_sms", lambda index: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return hopper


@pytest.mark.parametrize("error", ["compile", "host"])
def test_gluon_compile_failure_falls_back(monkeypatch, as_on_hopper, poisoned, caplog, error):
    """A Triton whose Gluon API no longer fits the kernel: logged once, the Triton GEMM form runs from then on."""
    from triton.errors import TritonError

    hopper = as_on_hopper
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if error == "compile":
            raise TritonError("gluon API changed")
        raise TypeError("gluon API changed: unexpected keyword")  # host-side descriptor / layout construction

    monkeypatch.setattr(hopper, "launch", broken)
    q, k = rand((1, 4, 70, 16), torch.float16), rand((1, 2, 70, 16), torch.float16)
    with caplog.at_level("WARNING", logger=est_kernel.__name__):
        check(q, k, 16, 16, 4)
    assert calls == [1] and "gluon API changed" in est_kernel._GLUON_FAILURE
    assert any("did not compile" in r.getMessage() for r in caplog.records)
    check(q, k, 16, 16, 4)
    assert calls == [1], "a failed Gluon kernel is not compiled again"
    monkeypatch.setattr(est_kernel, "_GLUON_FAILURE", None)
    monkeypatch.setattr(est_kernel, "_OVERRIDES", {"GLUON": True})
    with pytest.raises((TritonError, TypeError)):  # asked for explicitly: the error, not a fallback
        block_importance(q, k, block_q=16, block_k=16, stride=4)


def test_gluon_device_errors_propagate(monkeypatch, as_on_hopper):
    """Out of memory or a CUDA error at the launch is no API mismatch: raised, and the Gluon kernel stays on."""
    hopper = as_on_hopper
    q, k = rand((1, 4, 64, 16), torch.float16), rand((1, 2, 64, 16), torch.float16)
    for exc in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("Triton Error [CUDA]: an illegal address")):
        def launch(*args, _exc=exc, **kwargs):
            raise _exc

        monkeypatch.setattr(hopper, "launch", launch)
        with pytest.raises(type(exc)):
            block_importance(q, k, block_q=16, block_k=16, stride=4)
        assert est_kernel._GLUON_FAILURE is None


def test_lq_above_lk_rejected():
    q, k = rand((1, 2, 40, 16), torch.float32), rand((1, 2, 32, 16), torch.float32)
    with pytest.raises(ValueError, match="Lq=40 > Lk=32"):
        block_importance(q, k, block_q=16, block_k=16, stride=4)


@pytest.mark.gpu
# the GEMM form as the Gluon kernel (Hopper) and as the Triton kernel (TMA: 9.0+), the general form (older GPUs)
@pytest.mark.parametrize("engine", ["gluon", "triton", "general"])
@pytest.mark.parametrize("s", [8, 16, 32])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])  # blhd: transformers' storage, read in place by the GEMM form
@pytest.mark.parametrize("Lq,Lk", [(8192, 8192), (8192 - 1000 - 3, 8192), (12288 + 77, 12288 + 77)])
def test_gpu_bf16_qwen_shapes(overrides, poisoned, Lq, Lk, layout, s, engine):
    from psa_vlm.bench.synthetic import video_like_qkv

    major = torch.cuda.get_device_capability()[0]
    if engine != "general" and major < 9:
        pytest.skip("the GEMM form needs TMA (compute capability 9.0+)")
    if engine == "gluon" and major != 9:
        pytest.skip("the Gluon kernel needs wgmma (compute capability 9.x)")
    gemm = engine != "general"
    overrides(GEMM=gemm, GLUON=engine == "gluon")

    q, k, _ = video_like_qkv(1, 28, 4, Lk, 128, dtype=torch.bfloat16, device="cuda", seed=None)
    q = q[:, :, Lk - Lq :]
    if layout == "blhd":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        if gemm:  # read in place; a ragged last group is added after the kernel
            cfg = est_kernel._gemm_tiles(128 // s, 128 // s, s * 128, False, est_kernel._OVERRIDES)
            qo = est_kernel._gemm_query(q, s, cfg["BKD"], False)
            assert qo.view.data_ptr() == q.data_ptr() and qo.rows == Lq // s
    got = block_importance(q, k, block_q=128, block_k=128, stride=s)
    ref = block_importance_ref(q.float(), k.float(), block_q=128, block_k=128, stride=s)
    assert torch.isfinite(got).all()
    # bf16 products are exact in float32: only the summation order differs from the float32 reference
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,s,dtype", [
    (2, 8, 2, 3000 - 5, 3000, 64, 64, 128, 4, torch.float16),  # batch 2 ragged: one padded copy
    (1, 4, 4, 4096, 4096, 80, 128, 128, 8, torch.bfloat16),  # D 80: s*D = 640, ten 64-element chunks
    (1, 4, 2, 1024, 1024, 40, 64, 64, 4, torch.float16),  # s*D = 160: a partial last chunk (TMA zero-fills it)
    (1, 6, 2, 777, 5000, 128, 128, 64, 16, torch.float16),  # Lq << Lk
])
def test_gpu_gluon_shapes(overrides, poisoned, B, Hq, Hkv, Lq, Lk, D, bq, bk, s, dtype):
    """The Gluon kernel beyond the model shapes: fp16, batch 2, head_dim 64 / 80, Lq < Lk, 64-wide blocks."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs wgmma (compute capability 9.x)")
    overrides(GEMM=True, GLUON=True)
    q = rand((B, Hq, Lq, D), dtype)
    k = rand((B, Hkv, Lk, D), dtype)
    check(q, k, bq, bk, s, atol=1e-4, rtol=1e-3)
