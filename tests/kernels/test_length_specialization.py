"""Length-dependent integer arguments of every Triton kernel are excluded from Triton's specialisation.

Triton compiles one variant per (is the int 1, is it a multiple of 16) class of each specialised integer
argument; lengths and strides derived from them would recompile a kernel for the first prompt length of a new
class (seconds on a GPU). Every name listed in a kernel's ``do_not_specialize`` must be one of its parameters,
because Triton ignores unknown names silently. The check builds the kernels as the GPU does (interpreter off,
in a subprocess; creating a ``JITFunction`` needs no GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json
from psa_vlm.kernels.assign import kernel as assign_kernel
from psa_vlm.kernels.attention import fa4, kernel as attention_kernel
from psa_vlm.kernels.estimate import kernel as estimate_kernel
from psa_vlm.kernels.pool import kernel as pool_kernel
cases = {
    "attention": (attention_kernel._psa_fwd_kernel, attention_kernel._LENGTH_ARGS),
    "split": (fa4._split_kernel, fa4._SPLIT_LENGTH_ARGS),
    "merge": (fa4._merge_kernel, fa4._MERGE_LENGTH_ARGS),
    "pool": (pool_kernel._pool_kernel, pool_kernel._LENGTH_ARGS),
    "assign": (assign_kernel._assign_kernel, assign_kernel._LENGTH_ARGS),
    "estimate": (estimate_kernel._estimate_kernel, estimate_kernel._LENGTH_ARGS),
    "estimate_gemm": (estimate_kernel._estimate_gemm_kernel, estimate_kernel._GEMM_LENGTH_ARGS),
}
out = {}
for key, (kern, names) in cases.items():
    params = {p.name: p for p in kern.params}
    out[key] = {"type": type(kern).__name__, "unknown": [n for n in names if n not in params],
                "specialised": [n for n in names if n in params and not params[n].do_not_specialize],
                "names": list(names)}
print(json.dumps(out))
"""

REQUIRED = {
    "attention": {"Lq", "Lk", "n_tiles_q", "stride_iq", "stride_lh"},
    "split": {"stride_i", "W1", "W2", "W4", "W8", "WT"},
    "merge": {"Lq", "stride_lh", "stride_uh"},
    "pool": {"nkf", "stride_ch"},
    "assign": {"nq", "nk", "lq", "lk", "stride_sq"},
    "estimate": {"Lq", "Lk", "nk", "Rq", "n_pairs", "n_pg", "n_items", "stride_oq"},
    "estimate_gemm": {"Lq", "Lk", "nq", "nk", "Rq", "Rk", "n_rt", "n_items", "stride_oq"},
}


def test_length_args_are_parameters_and_not_specialised():
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for key, info in got.items():
        assert info["type"] == "JITFunction", info
        assert not info["unknown"], f"{key}: do_not_specialize names that are not parameters: {info['unknown']}"
        assert not info["specialised"], f"{key}: still specialised: {info['specialised']}"
        assert REQUIRED[key] <= set(info["names"]), key
