"""psa_vlm: Pyramid Sparse Attention for fast long-video prefill in Qwen VL models.

Importing this package imports torch only: no transformers, no Triton compilation, no GPU work.
The model patch (``patch``, ``unpatch``, ``patch_qwen25vl`` and friends) is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from .api import LevelMap, build_level_map, psa_attention
from .config import PRESETS, PSAConfig

__version__ = "0.1.0"

_PATCH_API = (
    "patch",
    "unpatch",
    "patch_qwen2vl",
    "unpatch_qwen2vl",
    "patch_qwen25vl",
    "unpatch_qwen25vl",
    "patch_qwen3vl",
    "unpatch_qwen3vl",
    "psa_stats",
    "observe",
    "register_attention",
    "is_patched",
)

__all__ = [
    "PSAConfig",
    "PRESETS",
    "LevelMap",
    "psa_attention",
    "build_level_map",
    *_PATCH_API,
    "__version__",
]


def __getattr__(name: str) -> Any:  # PEP 562: keep `import psa_vlm` free of transformers
    if name in _PATCH_API:
        from . import patches

        return getattr(patches, name)
    raise AttributeError(f"module 'psa_vlm' has no attribute {name!r}")
