"""The Hopper Gluon kernels compile for sm_90a with the installed Triton, on the CPU (no GPU needed).

The GPU tier checks what they compute; this checks, in CI, what a new Triton or a kernel change could silently
break before any GPU run: the kernels still compile through Gluon for ``sm_90a`` (ptxas included: Triton's wheel
carries it), use Hopper's instructions (wgmma, TMA), and fit a CTA's shared memory. The pooled kernel's shared
memory must also match ``hopper.shared_bytes``, which ``pooled_unsupported`` relies on to refuse tiles that would not
launch. Each kernel is compiled from the exact arguments its host launcher passes (the launch is intercepted), so
the test follows the launchers' signatures by itself. The compile runs in a subprocess: the CPU tier imports
Triton with ``TRITON_INTERPRET=1``, under which kernels are interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton.experimental.gluon")

ROOT = Path(__file__).resolve().parents[2]

#: Runs in the subprocess (no interpreter): intercept one launch, compile it for sm_90a, print a JSON report.
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import triton

    DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
              torch.int64: "i64"}

    class Capture:
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((args, kwargs))

    def compile_sm90a(fn, args, kwargs):
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.runtime.jit import mangle_type

        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps")  # a launch option unless the kernel declares it
        if "num_warps" in fn.arg_names:
            kwargs["num_warps"] = num_warps
        signature, attrs = {}, {}
        for i, (name, value) in enumerate(zip(fn.arg_names, args)):
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + DTYPES[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                signature[name] = mangle_type(value)
        for name in kwargs:
            signature[name] = "constexpr"
        src = GluonASTSource(fn=fn, signature=signature, constexprs=dict(kwargs), attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 64),
                              options={"num_warps": num_warps, "num_stages": 1})

    def pooled(D, dtype, factors, tail):
        from psa_vlm.kernels.attention import hopper

        real, capture = hopper._pooled_gluon_kernel, Capture()
        hopper._pooled_gluon_kernel = capture
        B, Hq, Hkv, L, bk = 1, 4, 2, 1024, 128
        nk = L // bk
        R = sum(nk * (bk // p) for p in factors)
        q = torch.zeros(B, Hq, L, D, dtype=dtype)
        kp, vp = torch.zeros(B, Hkv, R, D, dtype=dtype), torch.zeros(B, Hkv, R, D, dtype=dtype)
        idx = torch.zeros(B, Hq, nk, nk, dtype=torch.int32)
        counts = torch.zeros(B, Hq, nk, 4, dtype=torch.int32)
        out, lse = torch.zeros_like(q), torch.zeros(B, Hq, L)
        hopper.launch(q, kp, vp, idx, counts, out, lse, Lk=L, block_q=128, block_k=bk, factors=tail,
                      scale=D ** -0.5, tiles=hopper.TILES)
        assert len(capture.calls) == 1
        c = compile_sm90a(real, *capture.calls[0])
        return dict(ptx_wgmma="wgmma.mma_async" in c.asm["ptx"], ptx_tma="cp.async.bulk.tensor" in c.asm["ptx"],
                    shared=c.metadata.shared, model=hopper.shared_bytes(hopper.TILES, D), limit=hopper.SHARED_LIMIT)

    def estimator():
        from psa_vlm.kernels.estimate import hopper
        from psa_vlm.kernels.estimate import kernel as est

        est._gemm_form = lambda *args: True  # as on Hopper (both need a compute capability 9.x CUDA device)
        est._gluon_hardware = lambda q, interpret: True
        est._num_sms = lambda index: 2
        torch.cuda.current_device = lambda: 0
        real, capture = hopper._estimate_gluon_kernel, Capture()
        hopper._estimate_gluon_kernel = capture
        q = torch.zeros(1, 28, 2048, 128, dtype=torch.bfloat16)  # Qwen2.5-VL-7B heads at a short length
        k = torch.zeros(1, 4, 2048, 128, dtype=torch.bfloat16)
        est.block_importance(q, k, block_q=128, block_k=128, stride=8)
        assert len(capture.calls) == 1, "the estimator did not take its Gluon kernel"
        c = compile_sm90a(real, *capture.calls[0])
        from psa_vlm.kernels.attention.hopper import SHARED_LIMIT  # one CTA's limit on Hopper, whichever kernel

        return dict(ptx_wgmma="wgmma.mma_async" in c.asm["ptx"], ptx_tma="cp.async.bulk.tensor" in c.asm["ptx"],
                    shared=c.metadata.shared, limit=SHARED_LIMIT)

    which = sys.argv[1]
    if which == "pooled":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[3]]
        report = pooled(int(sys.argv[2]), dtype, tuple(map(int, sys.argv[4].split(","))),
                        tuple(map(int, sys.argv[5].split(","))))
    else:
        report = estimator()
    print("REPORT " + json.dumps(report))
""")


def _run(*argv: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode != 0 or not lines:
        if "ImportError" in proc.stderr and "_runtime" in proc.stderr:  # the AOT API this test leans on moved
            pytest.skip("no ahead-of-time Gluon compile API in this Triton")
        raise AssertionError(f"compile for sm_90a failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("D,dtype,factors,tail", [
    (128, "bf16", "2,4,8", "4,8"),  # the shipped configuration
    (64, "fp16", "2,4,8", "2,4,8"),  # head_dim 64, every pooled level in the launch
])
def test_pooled_kernel_compiles_for_sm90a(D, dtype, factors, tail):
    r = _run("pooled", str(D), dtype, factors, tail)
    assert r["ptx_wgmma"] and r["ptx_tma"], "no Hopper instructions (wgmma, TMA) in the PTX"
    assert r["shared"] <= r["limit"], f"{r['shared']} bytes of shared memory do not fit a CTA"
    assert abs(r["shared"] - r["model"]) <= 256, f"shared_bytes says {r['model']}, the compile {r['shared']}"


def test_estimator_kernel_compiles_for_sm90a():
    r = _run("estimator")
    assert r["ptx_wgmma"] and r["ptx_tma"], "no Hopper instructions (wgmma, TMA) in the PTX"
    assert r["shared"] <= r["limit"], f"{r['shared']} bytes of shared memory do not fit a CTA"
