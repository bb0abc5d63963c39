"""lmms-eval models of every family on the CPU: ``qwen2_vl_psa`` and ``qwen3_vl_psa`` (dense and MoE) beside
``qwen2_5_vl_psa``, in-process ``simple_evaluate`` on the offline synthetic task with tiny checkpoints of each
family, the prompts lmms-eval's own model of the family builds, the attention names, and the sweep.

The ``lmms_eval.models`` entry point is the existing ``qwen2_5_vl_psa = psa_vlm.eval:lmms_eval_manifest``, which
now returns all three manifests, so no reinstall is needed for ``get_model("qwen3_vl_psa")``.
"""

import csv
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[2]
ARGS = dict(device="cpu", device_map="cpu", max_num_frames=16, min_pixels=3136, max_pixels=37632)
PSA = dict(block_size=32, min_seq_len=64)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """The repo's offline task folder next to a fresh data folder, with a temporary HF_HOME."""
    root = tmp_path_factory.mktemp("lmms_families")
    shutil.copytree(REPO / "eval" / "tasks" / "psa_synth", root / "tasks" / "psa_synth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf_home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield root / "tasks"


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _prompts(lm, task_manager, limit=1):
    """Run the task; return (results, the input_ids of every prefill the model saw)."""
    from lmms_eval.evaluator import simple_evaluate

    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:  # the prefill, not a one-token decode step
            seen.append(ids.tolist())

    handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        res = simple_evaluate(model=lm, tasks=["psa_synth_short"], task_manager=task_manager, limit=limit,
                              bootstrap_iters=0, log_samples=True)
    finally:
        handle.remove()
    return res, seen


def test_manifests_register_every_model():
    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from psa_vlm.eval import lmms_eval_manifest, manifest
    from psa_vlm.eval.lmms_model import (
        Qwen2_VL_PSASimple,
        Qwen3_VL_PSA,
        Qwen3_VL_PSASimple,
    )

    manifests = ModelRegistryV2()._coerce_payload_to_manifests(lmms_eval_manifest)
    assert [m.model_id for m in manifests] == ["qwen2_vl_psa", "qwen2_5_vl_psa", "qwen3_vl_psa"]
    assert manifest("qwen2_vl_psa").chat_class_path is None  # lmms-eval has no chat qwen2_vl
    with pytest.raises(ValueError, match="unknown psa_vlm lmms-eval model 'qwen4_vl_psa'"):
        manifest("qwen4_vl_psa")
    assert get_model("qwen3_vl_psa") is Qwen3_VL_PSA and not Qwen3_VL_PSA.is_simple
    assert get_model("qwen3_vl_psa", force_simple=True) is Qwen3_VL_PSASimple
    assert get_model("qwen2_vl_psa") is Qwen2_VL_PSASimple  # no chat class: lmms-eval falls back to the simple one
    from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as LmmsQwen3Chat
    from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as LmmsQwen2Simple

    assert issubclass(Qwen3_VL_PSA, LmmsQwen3Chat) and issubclass(Qwen2_VL_PSASimple, LmmsQwen2Simple)


@pytest.mark.parametrize("family,cls_name,lmms_path", [
    ("qwen2_vl", "Qwen2_VL_PSASimple", "lmms_eval.models.simple.qwen2_vl:Qwen2_VL"),
    ("qwen3_vl", "Qwen3_VL_PSA", "lmms_eval.models.chat.qwen3_vl:Qwen3_VL"),
])
def test_same_prompts_as_lmms_eval_and_psa_runs(family, cls_name, lmms_path, tiny_family_checkpoint, task_manager):
    """The prompt token ids equal those lmms-eval's own model of the family feeds its model; with a sparse
    preset PSA engages and the per-sample records carry its density."""
    import importlib

    from psa_vlm import is_patched
    from psa_vlm.eval import lmms_model

    path = str(tiny_family_checkpoint(family))
    module, name = lmms_path.split(":")
    own = getattr(importlib.import_module(module), name)(pretrained=path, **ARGS)
    _, own_prompts = _prompts(own, task_manager)
    own.clean()

    lm = getattr(lmms_model, cls_name)(pretrained=path, preset="dense", dtype="float32", **ARGS, **PSA)
    lm.keep_model_loaded = True
    _, dense_prompts = _prompts(lm, task_manager)
    assert dense_prompts == own_prompts and len(own_prompts) == 1
    ids = own_prompts[0][0]
    if family == "qwen3_vl":  # the per-frame timestamps lmms-eval's qwen3_vl prompt has
        text = lm.processor.tokenizer.decode(ids)
        assert text.count(" seconds>") == 8 and text.startswith("<|im_start|>system\nYou are a helpful assistant.")

    lm.set_psa("quota-0.2", **PSA)
    assert is_patched(lm.model)
    res, psa_prompts = _prompts(lm, task_manager)
    assert psa_prompts == own_prompts
    tc = res["samples"]["psa_synth_short"][0]["token_counts"][0]
    assert tc["psa_preset"] == "quota-0.2" and tc["psa_engaged"] is True
    assert tc["input_tokens"] == len(ids) and 0.0 < tc["psa_density"] < 0.9
    assert [r["psa_preset"] for r in lm.psa_records] == ["dense", "quota-0.2"]
    lm.keep_model_loaded = False
    lm.clean()


def test_qwen3_moe_loads_the_moe_class_whatever_the_path(tiny_family_checkpoint, task_manager, tmp_path):
    """lmms-eval's qwen3_vl decides MoE from an ``A<n>B`` in the path; qwen3_vl_psa from the config."""
    import lmms_eval.models.simple.qwen3_vl as lmms_qwen3

    from psa_vlm.eval.lmms_model import Qwen3_VL_PSASimple

    resolver = lmms_qwen3._resolve_model_class
    path = tmp_path / "my-finetune"  # no A3B in the name
    shutil.copytree(tiny_family_checkpoint("qwen3_vl_moe"), path)
    lm = Qwen3_VL_PSASimple(pretrained=str(path), preset="paper", dtype="float32", **ARGS, **PSA)
    assert type(lm.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert lmms_qwen3._resolve_model_class is resolver  # restored
    res, prompts = _prompts(lm, task_manager)
    tc = res["samples"]["psa_synth_short"][0]["token_counts"][0]
    assert tc["psa_engaged"] is True and 0.0 < tc["psa_density"] <= 1.0 and tc["input_tokens"] == len(prompts[0][0])
    lm.clean()


def test_attention_names_and_wrong_family(tiny_family_checkpoint):
    from psa_vlm import is_patched
    from psa_vlm.eval.lmms_model import Qwen2_5_VL_PSA, Qwen2_VL_PSASimple, Qwen3_VL_PSASimple

    q2 = str(tiny_family_checkpoint("qwen2_vl"))
    # lmms-eval's qwen2_vl takes no attn_implementation: eager is set after loading, PSA falls back to it
    lm = Qwen2_VL_PSASimple(pretrained=q2, attn_implementation="eager", preset="paper", dtype="float32", **ARGS,
                            **PSA)
    text_cfg = lm.model.config.get_text_config()
    assert is_patched(lm.model) and text_cfg._attn_implementation == "psa_eager"
    assert lm.model.config.vision_config._attn_implementation == "eager"
    lm.set_psa("dense")
    assert lm.model.config.get_text_config()._attn_implementation == "eager"
    lm.clean()
    for cls in (Qwen2_VL_PSASimple, Qwen3_VL_PSASimple):  # no flash-attn on this machine: one clear error
        fam = "qwen2_vl" if cls is Qwen2_VL_PSASimple else "qwen3_vl"
        with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not usable.*sdpa"):
            cls(pretrained=str(tiny_family_checkpoint(fam)), attn_implementation="flash_attention_2", **ARGS)
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not usable"):
        Qwen2_VL_PSASimple(pretrained=q2, use_flash_attention_2=True, **ARGS)  # lmms-eval qwen2_vl's own flag
    with pytest.raises(ValueError, match="attn_implementation='psa'"):
        Qwen3_VL_PSASimple(pretrained=q2, attn_implementation="psa", **ARGS)
    with pytest.raises(ValueError, match="qwen2_5_vl_psa serves qwen2_5_vl checkpoints.*'qwen3_vl'.*qwen3_vl_psa"):
        Qwen2_5_VL_PSA(pretrained=str(tiny_family_checkpoint("qwen3_vl")), **ARGS)
    with pytest.raises(ValueError, match="qwen3_vl_psa serves qwen3_vl/qwen3_vl_moe .*'qwen2_vl'.*qwen2_vl_psa"):
        Qwen3_VL_PSASimple(pretrained=q2, **ARGS)


def test_sweep_with_every_lmms_model(tiny_family_checkpoint, tasks_dir, tmp_path, capsys):
    from psa_vlm.cli import main

    include = str(tasks_dir)
    out = tmp_path / "q3"
    argv = ["eval-sweep", "--model", str(tiny_family_checkpoint("qwen3_vl")), "--tasks", "psa_synth_short",
            "--presets", "dense,quota-0.2", "--limit", "1", "--out", str(out), "--include-path", include]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["preset"], r["samples"]) for r in rows] == [("dense", "1"), ("quota-0.2", "1")]
    assert float(rows[0]["sparsity"]) == 0.0 and 0.1 < float(rows[1]["sparsity"]) < 1.0
    assert "model `qwen3_vl_psa` (Qwen3_VL_PSA)" in (out / "sweep.md").read_text()
    out2 = tmp_path / "q2"
    assert main(["eval-sweep", "--model", str(tiny_family_checkpoint("qwen2_vl")), "--model-family", "qwen2_vl",
                 "--tasks", "psa_synth_short", "--presets", "paper", "--limit", "1", "--out", str(out2),
                 "--include-path", include]) == 0
    assert "model `qwen2_vl_psa` (Qwen2_VL_PSASimple)" in (out2 / "sweep.md").read_text()
    capsys.readouterr()
    assert main(argv[:3] + ["--lmms-model", "qwen2_5_vl_psa"] + argv[3:]) == 2
    assert main(argv[:3] + ["--lmms-model", "llava"] + argv[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not serve qwen3_vl checkpoints" in err[0] and "use qwen3_vl_psa" in err[0]
    assert "'llava' is none of qwen2_vl_psa, qwen2_5_vl_psa, qwen3_vl_psa" in err[1]
