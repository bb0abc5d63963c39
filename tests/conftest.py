"""Test configuration shared by every tier.

CPU tier (default): Triton kernels run under the interpreter, which must be switched on before Triton is
imported anywhere. GPU tier: ``pytest -m gpu`` on a CUDA machine (the interpreter stays off there).
"""

import os

import pytest

if os.environ.get("PSA_VLM_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# never touch the network in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Directory of the tiny offline Qwen2.5-VL checkpoint (model + processor), built once per test run."""
    from psa_vlm.models.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen25vl"))
