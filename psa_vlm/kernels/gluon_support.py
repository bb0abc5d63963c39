"""What the Gluon kernels for Hopper (``estimate/hopper.py``, ``attention/hopper.py``) share: when they can run,
and which errors mean "this Triton's Gluon API does not fit" (fall back to the Triton kernel) rather than a device
error (propagate). Nothing here imports Gluon; each caller keeps its own fallback state and log line.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
from triton.errors import TritonError

__all__ = ["GLUON_MIN_TRITON", "GLUON_API_ERRORS", "hopper_device", "triton_version_error", "import_error",
           "device_error"]

#: The Gluon kernels are written against Triton 3.6's ``triton.experimental.gluon`` (run on an H200 with 3.6,
#: compiled for sm_90 with 3.8); older versions lack parts of it (``warp_specialize``, ``NVMMADistributedLayout``).
GLUON_MIN_TRITON = (3, 6)

#: What another Triton's Gluon API raises before anything runs: its front end, MLIR passes or ptxas
#: (``TritonError``, ``RuntimeError``), or the host-side descriptors and layouts (``TypeError``,
#: ``AttributeError``, ``AssertionError``). Callers re-raise those for which ``device_error`` is true.
GLUON_API_ERRORS = (TritonError, RuntimeError, TypeError, AttributeError, AssertionError)


def hopper_device(t: torch.Tensor, interpret: bool) -> bool:
    """A CUDA tensor on a compute capability 9.x device, outside the interpreter (wgmma is Hopper's; Gluon has
    no interpreter)."""
    return not interpret and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


def triton_version_error() -> Optional[str]:
    """``None`` when the installed Triton is new enough for the Gluon kernels, else the reason."""
    version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    if version < GLUON_MIN_TRITON:
        return f"Triton {triton.__version__} < {'.'.join(map(str, GLUON_MIN_TRITON))}"
    return None


def import_error(load: Callable[[], object]) -> Optional[str]:
    """``None`` when this Triton is new enough and ``load()`` (importing a Gluon kernel module) succeeds, else the
    reason: any failure to import means the caller's Triton kernel runs."""
    reason = triton_version_error()
    if reason is None:
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - any failure to import means: use the Triton kernel
            reason = f"{type(exc).__name__}: {exc}"
    return reason


def device_error(exc: BaseException) -> bool:
    """Out of memory or a CUDA error (torch's, or Triton's launcher's "Triton Error [CUDA]"): not an API mismatch."""
    if isinstance(exc, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
        return True
    return isinstance(exc, RuntimeError) and "CUDA" in str(exc)
