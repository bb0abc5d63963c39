"""Two-GPU tier: a model whose decoder layers are split over two GPUs with ``accelerate.dispatch_model``
(what ``from_pretrained(device_map=...)`` does), PSA on every layer, against the same model on one GPU.

Run on a machine with two H100/H200 with ``PSA_VLM_TEST_GPU=1 pytest -m gpu tests/patches/test_multi_gpu.py``
(``bash benchmarks/gpu_all.sh tests2``). For each family, a text model with the real model's attention and MLP
shapes (``gpu_shapes``: Qwen2.5-VL-7B, Qwen3-VL-8B), 4 decoder layers and random bf16 weights (seed 0) is built
once on ``cuda:0``; a copy of the same weights is dispatched over both GPUs (embeddings, rotary embedding and
layers 0-1 on GPU 0, layers 2-3 and the final norm on GPU 1). Each backend available on the machine (Triton;
FlashAttention-4 where ``flash-attn-4`` imports) and each preset (``quota-0.2`` and ``paper`` without the dense
guard, ``dense``; ``min_seq_len=1024``) patches both models; on a video-like input of ``SEQ`` tokens (not a
multiple of the block size) the two-GPU output must equal the one-GPU output within bf16 tolerance, every layer
must report PSA statistics with the same density on both, and the ``dense`` preset must match the unpatched
(SDPA) model. Per-layer state (token types, masks, statistics) has to live on each layer's device for this.
"""

from __future__ import annotations

import copy
import gc
import os
from typing import Any, Dict

import pytest
import torch

import psa_vlm
from psa_vlm import PSAConfig

# tests/patches/gpu_shapes.py (pytest puts this directory on sys.path)
from gpu_shapes import HIDDEN, build_text_model, hidden_states, video_like_embeds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set PSA_VLM_TEST_GPU=1 (no interpreter)"),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

SEQ = 16 * 1024 + 1000  # not a multiple of the block size (64 or 128)
N_LAYERS = 4
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
BACKENDS = ("triton", "fa4")
#: Module name (in the text model) -> GPU. Both families' text models have these four children.
DEVICE_MAP = {"embed_tokens": 0, "rotary_emb": 0, "layers.0": 0, "layers.1": 0, "layers.2": 1, "layers.3": 1,
              "norm": 1}
PRESETS = {
    # the sparse path on both backends: at this length the dense guard may run FlashAttention-4 dense instead of the
    # fa4 engine's host-bound launches (cost.ENGINE_TIMES host floors)
    "quota": dict(name="quota-0.2", dense_guard=False),
    "paper": dict(name="paper", dense_guard=False),  # threshold rule, sparse path even where it keeps most blocks
    "dense": dict(name="dense"),
}
REL_TOL = 2e-2  # bf16 hidden states after 4 layers (the one-GPU tier's bound)
DENSITY_TOL = 1e-3


def _config(preset: str) -> PSAConfig:
    kw = dict(PRESETS[preset])
    return PSAConfig.preset(kw.pop("name"), min_seq_len=1024, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.to(a.device).float()
    return float((a - b).norm() / b.norm())


def _free() -> None:
    gc.collect()
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=FAMILIES)
def models(request) -> Dict[str, Any]:
    """``{"family", "one" (on cuda:0), "two" (dispatched over cuda:0 / cuda:1), "embeds", "reference"}``:
    one family at a time (pytest orders the tests by family), freed before the next family is built."""
    accelerate = pytest.importorskip("accelerate")
    family = request.param
    one = build_text_model(family, N_LAYERS, device="cuda:0")
    two = accelerate.dispatch_model(copy.deepcopy(one), device_map=DEVICE_MAP)
    for name, param in two.named_parameters():
        top = name.split(".")[0] if not name.startswith("layers.") else ".".join(name.split(".")[:2])
        assert param.device == torch.device("cuda", DEVICE_MAP[top]), (name, param.device)
    embeds = video_like_embeds(SEQ, HIDDEN[family], device="cuda:0")
    held = {"family": family, "one": one, "two": two, "embeds": embeds,
            "reference": hidden_states(one, embeds)}  # unpatched SDPA on one GPU
    del one, two, embeds
    # the unpatched model on two GPUs is the one-GPU model (sanity check of the split itself)
    assert _rel(hidden_states(held["two"], held["embeds"]), held["reference"]) < REL_TOL
    yield held
    held.clear()
    _free()


def _psa_run(model, embeds, config: PSAConfig, backend: str):
    psa_vlm.patch(model, config, backend=backend)
    try:
        out = hidden_states(model, embeds)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        stats = psa_vlm.psa_stats(model)
    finally:
        psa_vlm.unpatch(model)
    return out, stats


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_psa_two_gpus_matches_one_gpu(models, backend, preset):
    if backend == "fa4":
        from psa_vlm.kernels.attention.fa4 import fa4_available, fa4_import_error

        err = fa4_import_error()
        if err is not None:
            pytest.skip(f"fa4 backend: flash-attn-4 does not import ({err})")
        if not all(fa4_available(torch.device("cuda", i)) for i in (0, 1)):
            pytest.skip("fa4 backend: needs compute capability 9.x or newer on both GPUs")
    one, two, embeds = models["one"], models["two"], models["embeds"]
    config = _config(preset)

    out1, stats1 = _psa_run(one, embeds, config, backend)
    out2, stats2 = _psa_run(two, embeds, config, backend)

    assert out2.shape == out1.shape == (1, SEQ, HIDDEN[models["family"]]) and out2.dtype == torch.bfloat16
    assert torch.isfinite(out2).all() and torch.isfinite(out1).all()
    # PSA ran on every layer of both, on the whole prefill
    assert sorted(stats1["layers"]) == sorted(stats2["layers"]) == list(range(N_LAYERS)), (stats1, stats2)
    assert all(v["lq"] == v["lk"] == SEQ for v in stats2["layers"].values())
    # the same plan on both: per-layer density (and the dense guard's decision) equal
    for i in range(N_LAYERS):
        a, b = stats1["layers"][i], stats2["layers"][i]
        assert abs(a["density"] - b["density"]) <= DENSITY_TOL, (i, a, b)
        assert abs(a["planned_density"] - b["planned_density"]) <= DENSITY_TOL, (i, a, b)
        assert bool(a["dense_guard"]) == bool(b["dense_guard"]), (i, a, b)
    if preset == "dense":
        assert stats2["density"] == pytest.approx(1.0)
        # and both are dense attention (the unpatched SDPA model on one GPU)
        assert _rel(out2, models["reference"]) < REL_TOL
    elif preset == "quota":
        assert 0.05 < stats2["density"] < 0.5, stats2["density"]
    else:  # paper without the guard: the threshold rule's plan, whatever it keeps on random weights
        assert 0.0 < stats2["density"] <= 1.0, stats2["density"]
    # the split model computes what the one-GPU model computes
    rel = _rel(out2, out1)
    assert rel < REL_TOL, rel
