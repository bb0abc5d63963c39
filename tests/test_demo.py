"""`psa-vlm demo` (synthetic video-like tensors) and the equal-density binary baseline it compares with."""

import re

import pytest

from psa_vlm import PSAConfig
from psa_vlm.bench.common import binary_config_at_density
from psa_vlm.bench.synthetic import video_like_qkv
from psa_vlm.cli import main


def test_binary_config_matches_a_measured_density():
    q, k, _ = video_like_qkv(1, 4, 2, 1024, 16, tokens_per_frame=64, seed=None)
    base = PSAConfig.preset("paper", block_q=32, block_k=32, stride=4, text_tail=64)
    for target in (0.35, 0.6):
        cfg, measured = binary_config_at_density(q, k, target, base=base)
        assert cfg.pool_factors == () and cfg.mode == "quota" and (cfg.block_q, cfg.block_k) == (32, 32)
        assert abs(measured - target) < 0.02, (target, measured)


def test_demo_prints_levels_density_and_errors(capsys):
    rc = main(["demo", "--seq-len", "1024", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
               "--tokens-per-frame", "64", "--block", "32", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {m.group(1): m for m in re.finditer(r"^(dense|psa|binary)\s+([\d.]+)((?:\s+[\d.]+){5})\s+([\d.]+)", out, re.M)}
    assert set(rows) == {"dense", "psa", "binary"}
    d_psa, d_bin = float(rows["psa"].group(2)), float(rows["binary"].group(2))
    assert 0 < d_psa < 1 and abs(d_psa - d_bin) < 0.03
    hist = [float(x) for x in rows["psa"].group(3).split()]
    assert sum(hist) == pytest.approx(1.0, abs=2e-3)
    assert float(rows["dense"].group(4)) == 0.0 and float(rows["psa"].group(4)) > 0
    assert "sparsity" in out


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--preset", "nope"]) == 2
    assert "unknown PSA preset" in capsys.readouterr().err
    assert main(["demo", "--heads", "3", "--kv-heads", "2"]) == 2
