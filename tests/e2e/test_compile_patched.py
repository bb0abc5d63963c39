"""Issue #11 item 12: ``torch.compile`` (Inductor, CPU) of a PSA-patched tiny Qwen2.5-VL runs and matches eager.

PSA keeps itself out of the compiled graph (``run_psa`` runs through ``torch.compiler.disable`` under
compilation); the rest of the model compiles. A subprocess, because an Inductor abort (SIGABRT) would kill
pytest. About two minutes on two CPU cores, most of it Inductor's code generation.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_compiled_patched_model_matches_eager(tiny_checkpoint):
    script = textwrap.dedent(
        f"""
        import torch
        import psa_vlm
        from psa_vlm.inference import load_qwen25vl

        model, _ = load_qwen25vl({str(tiny_checkpoint)!r}, device="cpu")
        cfg = psa_vlm.PSAConfig.preset("paper", block_q=16, block_k=16, stride=4, min_seq_len=0, text_tail=0)
        psa_vlm.patch_qwen25vl(model, cfg)
        torch.manual_seed(0)
        ids = torch.randint(10, 200, (1, 45))
        with torch.no_grad():
            want = model(input_ids=ids).logits
            got = torch.compile(model, backend="inductor")(input_ids=ids).logits
        assert psa_vlm.psa_stats(model)["density"] is not None  # PSA ran inside the compiled model
        err = (got - want).abs().max().item()
        assert err < 1e-4, err
        print("compiled patched model ok", err)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled patched model ok" in r.stdout
