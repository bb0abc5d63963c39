"""``backend="auto"`` picks the attend-stage engine from the plan's level mix (``api._auto_attend_backend``).

On the CPU the resolved backend is forced to ``"fa4"`` (what ``auto`` resolves to on a Hopper GPU with
FlashAttention-4) and the Triton kernels run under the interpreter; FlashAttention-4's ``sparse_attention`` falls
back to the Triton kernel off the GPU, so what is tested is the wiring: which engine's ``sparse_attention`` runs,
what ``PSAPlan.attend_backend`` records, that a quota config decides without a host read and a threshold-mode
plan with one (shared with the dense guard), that the length rule stands where the mix is unknown, and that an
explicit backend is never overridden. The decision function itself is tested in ``tests/test_cost.py``.
"""

import pytest
import torch

import psa_vlm.api as api
import psa_vlm.cost as cost
from psa_vlm import PSAConfig
from psa_vlm.api import LevelMap, run_psa
from psa_vlm.kernels.attention import fa4
from psa_vlm.kernels.attention import kernel as triton_attention
from psa_vlm.kernels.attention.naive import sparse_attention as sparse_ref

QUOTA = PSAConfig.preset("quota-0.2", block_q=16, block_k=16, stride=4)
PAPER = PSAConfig.preset("paper", block_q=16, block_k=16, stride=4)


@pytest.fixture
def auto_fa4(monkeypatch, spy):
    """``auto`` resolves to fa4; the engines' launchers, the decision and the host reads are counted."""
    real_check = api.check_config_for_backend

    def check(config, backend="auto", *, device=None, head_dim=None):
        real_check(config, "reference", device=device, head_dim=head_dim)
        return "fa4" if backend in ("auto", "fa4") else backend

    monkeypatch.setattr(api, "check_config_for_backend", check)
    monkeypatch.setattr(api, "_fa4_attend_reason", lambda *a: None)  # as on a Hopper GPU with flash-attn-4

    class Calls:
        fa4 = spy(fa4, "sparse_attention")
        triton = spy(triton_attention, "sparse_attention")
        decide = spy(cost, "faster_attend_backend")
        reads = spy(LevelMap, "histogram_tensor")

    return Calls


def qkv(L=96, Hq=4, Hkv=2, D=16):
    torch.manual_seed(L)
    return torch.randn(1, Hq, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)


def check_output(o, plan, q, k, v):
    ref = sparse_ref(q, k, v, plan.k_pooled, plan.v_pooled, plan.kv_idx, plan.counts, block_q=16, block_k=16,
                     factors=plan.pool_factors)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("engine", ["fa4", "triton"])
def test_quota_config_decides_by_its_own_mix_without_a_host_read(auto_fa4, monkeypatch, engine):
    seen = []

    def decide(histogram, *args):
        seen.append(tuple(histogram))
        return engine

    monkeypatch.setattr(cost, "faster_attend_backend", decide)
    q, k, v = qkv()
    o, plan = run_psa(q, k, v, QUOTA, backend="auto")
    assert seen == [cost.config_histogram(QUOTA)] and len(auto_fa4.reads) == 0
    assert plan.attend_backend == engine
    assert len(auto_fa4.fa4) == int(engine == "fa4")  # fa4's launcher (it runs the Triton kernel off the GPU)
    assert len(auto_fa4.triton) == 1
    check_output(o, plan, q, k, v)


def test_threshold_plan_decides_by_its_histogram_read_once(auto_fa4, monkeypatch):
    seen, handed = [], []

    def decide(histogram, batch, heads, head_dim, lq, lk):
        seen.append((list(histogram), batch, heads, head_dim, lq, lk))
        return "fa4"

    real_guard = api._guarded_dense

    def guard(*args, **kwargs):
        handed.append(kwargs.get("histogram"))
        return real_guard(*args, **kwargs)

    monkeypatch.setattr(cost, "faster_attend_backend", decide)
    monkeypatch.setattr(api, "_guarded_dense", guard)
    q, k, v = qkv(L=80)
    o, plan = run_psa(q, k, v, PAPER, backend="auto")
    assert len(auto_fa4.reads) == 1  # one host read ...
    hist = plan.level_map.histogram_tensor().tolist()
    assert handed == [hist]  # ... handed to the dense guard, which therefore does not read again
    assert seen == [(hist, 1, 4, 16, 80, 80)]
    assert plan.attend_backend == "fa4" and len(auto_fa4.fa4) == 1
    check_output(o, plan, q, k, v)


def test_plan_only_and_a_callers_level_map_keep_the_length_rule(auto_fa4):
    q, k, v = qkv()
    _, plan = run_psa(q, k, v, PAPER, backend="auto", plan_only=True)  # no dense guard runs: no host read
    assert len(auto_fa4.reads) == 0 and len(auto_fa4.decide) == 0 and plan.attend_backend == "triton"
    o, plan2 = run_psa(q, k, v, QUOTA, backend="auto", level_map=plan.level_map)  # not the config's quotas
    assert len(auto_fa4.decide) == 0 and plan2.attend_backend == "triton"
    check_output(o, plan2, q, k, v)


def test_calls_fa4_cannot_run_are_recorded_as_the_triton_kernel(auto_fa4, monkeypatch):
    monkeypatch.setattr(api, "_fa4_attend_reason", lambda *a: "a key_padding_mask (test)")
    monkeypatch.setattr(cost, "faster_attend_backend", lambda *a: "fa4")
    q, k, v = qkv()
    _, plan = run_psa(q, k, v, QUOTA, backend="auto")  # auto: straight to the Triton kernel, no decision
    assert plan.attend_backend == "triton" and len(auto_fa4.fa4) == 0 and len(auto_fa4.triton) == 1
    o, plan = run_psa(q, k, v, QUOTA, backend="fa4")  # explicit: fa4's launcher falls back (and logs it)
    assert plan.attend_backend == "triton" and len(auto_fa4.fa4) == 1 and len(auto_fa4.triton) == 2
    check_output(o, plan, q, k, v)


def test_unknown_mix_keeps_the_length_rule(auto_fa4):
    q, k, v = qkv()
    o, plan = run_psa(q, k, v, PAPER.replace(dense_guard=False), backend="auto")  # no guard: no host read
    assert len(auto_fa4.decide) == 0 and len(auto_fa4.reads) == 0
    assert plan.attend_backend == "triton" and len(auto_fa4.fa4) == 0  # 96 tokens < AUTO_FA4_MIN_TOKENS
    check_output(o, plan, q, k, v)


def test_real_decision_at_tiny_shapes_is_the_triton_kernel(auto_fa4):
    q, k, v = qkv()
    _, plan = run_psa(q, k, v, QUOTA, backend="auto")
    assert len(auto_fa4.decide) == 1 and plan.attend_backend == "triton" and len(auto_fa4.fa4) == 0


@pytest.mark.parametrize("backend", ["fa4", "triton"])
def test_an_explicit_backend_is_never_overridden(auto_fa4, backend):
    q, k, v = qkv()
    o, plan = run_psa(q, k, v, QUOTA, backend=backend)
    assert len(auto_fa4.decide) == 0 and plan.attend_backend == backend
    assert len(auto_fa4.fa4) == int(backend == "fa4")
    check_output(o, plan, q, k, v)


def test_plan_only_records_the_quota_engine_without_attending(auto_fa4, monkeypatch):
    monkeypatch.setattr(cost, "faster_attend_backend", lambda *a: "fa4")
    q, k, v = qkv()
    o, plan = run_psa(q, k, v, QUOTA, backend="auto", plan_only=True)
    assert o is None and plan.attend_backend == "fa4"
    assert len(auto_fa4.fa4) == 0 and len(auto_fa4.triton) == 0
