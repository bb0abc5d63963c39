import dataclasses

import pytest

from psa_vlm import PRESETS, PSAConfig


def test_paper_preset_matches_spec_section_5():
    c = PSAConfig.preset("paper")
    assert (c.block_q, c.block_k, c.stride, c.mode) == (128, 128, 8, "threshold")
    assert c.thresholds == (0.70, 0.80, 0.90, 0.90)
    assert c.sim_thresholds == (0.75, 0.70, 0.70)
    assert c.pool_factors == (2, 4, 8) and c.factors == (1, 2, 4, 8)
    assert c.min_seq_len == 4096 and c.text_tail == 512 and c.sink_blocks == 1


@pytest.mark.parametrize("d", [0.1, 0.2, 0.3])
def test_quota_presets_hit_their_density(d):
    pyr, binary = PSAConfig.preset(f"quota-{d}"), PSAConfig.preset(f"binary-{d}")
    assert pyr.target_density() == pytest.approx(d)
    assert binary.target_density() == pytest.approx(d)
    assert binary.pool_factors == () and pyr.pool_factors == (2, 4, 8)
    # the pyramid covers more blocks than binary at the same cost
    assert sum(pyr.quotas) > sum(binary.quotas)


def test_presets_listed_and_unknown_rejected():
    assert set(PSAConfig.preset_names()) >= {"paper", "dense", "binary", "quota-0.2", "binary-0.2"}
    assert PSAConfig.preset("dense").dense and PSAConfig.preset("dense").target_density() == 1.0
    with pytest.raises(ValueError, match="unknown PSA preset 'nope'"):
        PSAConfig.preset("nope")


def test_frozen_and_override():
    c = PSAConfig.preset("paper", block_q=64, block_k=64)
    assert c.block_q == 64 and PRESETS["paper"].block_q == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block_q = 32  # type: ignore[misc]
    assert PSAConfig(pool_factors=[8, 2]).pool_factors == (2, 8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(block_q=0), "block_q"),
        (dict(block_k=-128), "block_k"),
        (dict(block_q=100), "stride"),
        (dict(stride=0), "stride"),
        (dict(pool_factors=(3,)), "pool_factors"),
        (dict(pool_factors=(2, 2)), "pool_factors"),
        (dict(block_k=12, stride=4), "block_k"),
        (dict(mode="topk"), "mode"),
        (dict(thresholds=(0.9, 0.8, 0.9, 0.9)), "thresholds"),
        (dict(thresholds=(0.0, 0.8, 0.9, 0.9)), "thresholds"),
        (dict(thresholds=(0.7, 0.8, 0.9)), "thresholds"),
        (dict(mode="quota"), "quotas"),
        (dict(mode="quota", quotas=(0.5, 0.5, 0.5, 0.0)), "quotas"),
        (dict(mode="quota", pool_factors=(), quotas=(0.1, 0.1, 0.0, 0.0)), "quotas"),
        (dict(sim_thresholds=(0.7, 0.7)), "sim_thresholds"),
        (dict(sim_thresholds=(2.0, 0.7, 0.7)), "sim_thresholds"),
        (dict(min_seq_len=-1), "min_seq_len"),
        (dict(text_tail=-5), "text_tail"),
        (dict(sink_blocks=-1), "sink_blocks"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PSAConfig.{field}"):
        PSAConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(block_q=True), "block_q"), (dict(dense="yes"), "dense"), (dict(thresholds=(True,) * 4), "thresholds")],
)
def test_wrong_types_name_the_field(kwargs, field):
    # bools are not numbers and strings are not bools (issue #11 item 8)
    with pytest.raises(TypeError, match=f"PSAConfig.{field}"):
        PSAConfig(**kwargs)
