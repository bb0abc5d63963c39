"""lmms-eval integration on the CPU: the ``qwen2_5_vl_psa`` entry point, in-process ``simple_evaluate`` on the
offline synthetic task (tiny model, presets dense and paper), and ``psa-vlm eval-sweep`` (table, figure,
resume). Nothing of PSA is stubbed: the reference backend runs inside the tiny model.
"""

import csv
import logging
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[2]
TINY_ARGS = ("device=cpu,device_map=cpu,dtype=float32,max_num_frames=16,min_pixels=3136,max_pixels=37632,"
             "block_size=32,min_seq_len=64")


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """The repo's task folder copied next to a fresh data folder, and a temporary HF_HOME, all offline."""
    root = tmp_path_factory.mktemp("lmms")
    shutil.copytree(REPO / "eval" / "tasks" / "psa_synth", root / "tasks" / "psa_synth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf_home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def task_manager(offline_env):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(offline_env / "tasks"), include_defaults=False)


def test_entry_point_resolves():
    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "qwen2_5_vl_psa"]
    assert len(eps) == 1 and eps[0].value == "psa_vlm.eval:lmms_eval_manifest"
    from lmms_eval.models import get_model, get_model_manifest

    from psa_vlm.eval.lmms_model import Qwen2_5_VL_PSA, Qwen2_5_VL_PSASimple

    manifest = get_model_manifest("qwen2_5_vl_psa")
    assert manifest.chat_class_path == "psa_vlm.eval.lmms_model.Qwen2_5_VL_PSA"
    assert get_model("qwen2_5_vl_psa") is Qwen2_5_VL_PSA and not Qwen2_5_VL_PSA.is_simple
    assert get_model("qwen2_5_vl_psa", force_simple=True) is Qwen2_5_VL_PSASimple
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as LmmsChat

    assert issubclass(Qwen2_5_VL_PSA, LmmsChat)  # same video loading and prompting as the dense baseline


def test_bad_model_args_fail_before_loading(tiny_checkpoint):
    from psa_vlm.eval.lmms_model import Qwen2_5_VL_PSA

    with pytest.raises(ValueError, match="unknown PSA preset"):
        Qwen2_5_VL_PSA(pretrained=str(tiny_checkpoint), device="cpu", device_map="cpu", preset="nope")
    with pytest.raises(ValueError, match="thresholds"):
        Qwen2_5_VL_PSA(pretrained=str(tiny_checkpoint), device="cpu", device_map="cpu", thresholds="0.9/0.8")
    with pytest.raises(ValueError, match="attn_implementation"):
        Qwen2_5_VL_PSA(pretrained=str(tiny_checkpoint), device="cpu", device_map="cpu",
                       attn_implementation="flash_attention_2")
    with pytest.raises(FileNotFoundError):
        Qwen2_5_VL_PSA(pretrained=str(tiny_checkpoint), device="cpu", device_map="cpu", psa_config="/nonexistent.json")
    with pytest.raises(ValueError, match="preset or psa_config"):
        Qwen2_5_VL_PSA(pretrained=str(tiny_checkpoint), device="cpu", device_map="cpu", preset="paper",
                       psa_config="/nonexistent.json")


def test_simple_evaluate_dense_and_paper(tiny_checkpoint, task_manager):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model

    from psa_vlm import is_patched

    lm = get_model("qwen2_5_vl_psa").create_from_arg_string(
        f"pretrained={tiny_checkpoint},preset=dense,{TINY_ARGS.replace('device=cpu,', '')}",
        {"batch_size": 1, "device": "cpu"},  # what `--batch_size 1 --device cpu` hands over
    )
    lm.keep_model_loaded = True  # one load for both presets
    for preset in ("dense", "paper"):
        lm.set_psa(preset, block_size=32, min_seq_len=64)
        assert is_patched(lm.model) == (preset != "dense")
        res = simple_evaluate(model=lm, tasks=["psa_synth_short"], task_manager=task_manager, limit=2,
                              bootstrap_iters=0, log_samples=True)
        acc = res["results"]["psa_synth_short"]["accuracy,none"]
        assert 0.0 <= acc <= 1.0
        samples = res["samples"]["psa_synth_short"]
        assert len(samples) == 2
        for s in samples:
            tc = s["token_counts"][0]
            assert tc["psa_preset"] == preset
            assert tc["input_tokens"] > 384  # 8 temporal patches x 48 merged tokens, plus the question
            assert tc["prefill_s"] > 0 and tc["vision_s"] > 0
            if preset == "dense":
                assert tc["psa_density"] == 1.0 and tc["psa_engaged"] is False
            else:
                assert tc["psa_engaged"] is True and 0.0 < tc["psa_density"] <= 1.0
    assert len(lm.psa_records) == 4
    lm.keep_model_loaded = False
    lm.clean()


def test_sweep_writes_table_and_figure_and_resumes(tiny_checkpoint, offline_env, tmp_path, caplog):
    from psa_vlm.cli import main

    from psa_vlm import PSAConfig

    caplog.set_level(logging.INFO, logger="psa_vlm")
    out = tmp_path / "sweep"
    layered = tmp_path / "layered.json"  # a saved per-layer config as one more sweep entry
    PSAConfig.preset("quota-0.1", block_q=32, block_k=32, min_seq_len=64, layer_overrides={0: {"dense": True}}).save(layered)
    argv = ["eval-sweep", "--model", str(tiny_checkpoint), "--tasks", "psa_synth_short", "--presets", "dense,paper",
            "--limit", "1", "--out", str(out), "--include-path", str(offline_env / "tasks"), "--psa-config", str(layered)]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["task"], r["preset"], r["family"]) for r in rows] == [
        ("psa_synth_short", "dense", "dense"), ("psa_synth_short", "paper", "pyramid"),
        ("psa_synth_short", "layered", "config")]
    assert float(rows[0]["sparsity"]) == 0.0 and 0.0 <= float(rows[1]["sparsity"]) < 1.0
    assert 0.0 < float(rows[2]["sparsity"]) < 1.0
    assert all(float(r["prefill_s"]) > 0 and r["samples"] == "1" and r["metric"] == "accuracy" for r in rows)
    # 95% Wilson interval of one 0/1 answer
    assert all(float(r["accuracy_lo"]) <= float(r["accuracy"]) <= float(r["accuracy_hi"]) for r in rows)
    assert {(float(r["accuracy_lo"]), float(r["accuracy_hi"])) for r in rows} <= {(0.0, 0.7935), (0.2065, 1.0)}
    md = (out / "sweep.md").read_text()
    assert "| psa_synth_short | paper | pyramid |" in md and "limit 1" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    dense_file, paper_file = out / "runs" / "psa_synth_short__dense.json", out / "runs" / "psa_synth_short__paper.json"
    dense_mtime = dense_file.stat().st_mtime_ns
    paper_file.unlink()  # an interrupted sweep: one run missing
    caplog.clear()
    assert main(argv) == 0
    assert "3 (task, preset) runs, 2 already done, 1 to run" in caplog.text
    assert dense_file.stat().st_mtime_ns == dense_mtime and paper_file.is_file()

    caplog.clear()
    assert main(argv) == 0  # all done: nothing runs, the model is not even loaded
    assert "0 to run" in caplog.text and "loading qwen2_5_vl_psa" not in caplog.text
    assert dense_file.stat().st_mtime_ns == dense_mtime
    assert len(list(csv.DictReader(open(out / "sweep.csv")))) == 3


def test_sweep_rejects_bad_input(tmp_path, capsys):
    from psa_vlm.cli import main

    assert main(["eval-sweep", "--presets", "dense,nope"]) == 2
    assert main(["eval-sweep", "--model", str(tmp_path)]) == 2
    assert main(["eval-sweep", "--model-args", "novalue"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("psa-vlm eval-sweep: error:") for line in err)


def test_sweep_weights_fingerprint_tracks_retrained_weights(tiny_checkpoint, tmp_path):
    """A resumed sweep must not reuse runs of other weights under the same directory name."""
    import shutil

    from psa_vlm.eval.sweep import weights_fingerprint

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_checkpoint)
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor, as retraining would change it
    f.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_checkpoint)


def test_fidelity_prompts_from_an_lmms_eval_task(offline_env):
    """``eval-fidelity --lmms-task``: the task's own doc_to_visual / doc_to_text / doc_to_target."""
    from pathlib import Path as _Path

    from psa_vlm.eval.fidelity import load_prompts
    from psa_vlm.video.synth import load_dataset

    prompts = load_prompts(lmms_task="psa_synth_short", include_path=[str(offline_env / "tasks")], limit=3)
    items = load_dataset(offline_env / "data" / "psa_synth_short" / "test.jsonl")[:3]
    assert [p.answer for p in prompts] == [i.answer for i in items]
    assert [p.kind for p in prompts] == [i.kind for i in items]
    for p, item in zip(prompts, items):
        assert _Path(p.video).is_file() and p.video == item.video
        assert p.prompt == item.prompt()  # the task's prompt is the generator's
