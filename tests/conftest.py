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


@pytest.fixture
def spy(monkeypatch):
    """``spy(owner, name) -> calls``: wrap ``owner.name`` for one test; each call appends to the returned list
    and then runs the original (restored afterwards)."""

    def install(owner, name: str) -> list:
        calls: list = []
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
        return calls

    return install


@pytest.fixture(scope="session")
def tiny_family_checkpoint(tmp_path_factory):
    """``get(family) -> Path``: the tiny offline checkpoint (model + processor) of a model family, built at
    most once per family per test run. Families: ``psa_vlm.models.tiny.FAMILIES`` (``qwen2_vl``,
    ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe``).

    Example::

        def test_x(tiny_family_checkpoint):
            path = tiny_family_checkpoint("qwen3_vl")
    """
    from psa_vlm.models.tiny import build_tiny_checkpoint

    built = {}

    def get(family: str = "qwen2_5_vl"):
        if family not in built:
            name = "tiny-qwen25vl" if family == "qwen2_5_vl" else f"tiny-{family}"
            built[family] = build_tiny_checkpoint(tmp_path_factory.mktemp(name), family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_family_checkpoint):
    """Directory of the tiny offline Qwen2.5-VL checkpoint (model + processor), built once per test run."""
    return tiny_family_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A short real mp4 (``psa_vlm.video.synth``: 12 frames of 96x64 at 4 fps, a needle-colour question),
    written once per test run; returns its ``VideoQA`` (``.video`` is the path)."""
    from psa_vlm.video.synth import make_clip

    return make_clip(tmp_path_factory.mktemp("tiny-clip") / "clip.mp4", frames=12, width=96, height=64, fps=4.0,
                     seed=1)
