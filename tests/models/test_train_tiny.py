"""The tiny-model trainer (``psa_vlm.models.train_tiny``): inputs equal the processor's, the curriculum's text
hints state the answer, the shipped checkpoint's tokenizer is the builder's, and a short run writes a checkpoint
that loads like any other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from psa_vlm.models import train_tiny as T  # noqa: E402
from psa_vlm.video import synth  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


def test_answer_words_are_single_tokens(processor):
    """Colour, shape and option words are one token each (a split word costs the model an extra hop)."""
    tok = processor.tokenizer
    words = list(synth.COLORS) + list(synth.SHAPES) + ["the", "then", "square"]
    for w in words:
        assert len(tok(" " + w)["input_ids"]) == 1, w
    for letter in synth.LETTERS:
        assert len(tok(letter)["input_ids"]) == 1, letter


def test_shipped_checkpoint_uses_the_builders_tokenizer(processor):
    from transformers import AutoProcessor

    from psa_vlm.models.trained import trained_tiny_checkpoint

    try:
        shipped = AutoProcessor.from_pretrained(trained_tiny_checkpoint()).tokenizer
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert shipped.get_vocab() == processor.tokenizer.get_vocab()


@pytest.mark.parametrize("kind", synth.KINDS)
def test_hint_states_the_answer_and_only_when_asked(kind, processor):
    geom = T.Geometry(frames=32, fps=8.0, height=112, width=112, nframes=16)
    seeds = [1_234_567 + i for i in range(4)]
    items, plain, answers = T.plan_items([kind] * 4, geom, seeds)
    items_h, hinted, answers_h = T.plan_items([kind] * 4, geom, seeds, hint=[True, False, True, False])
    assert answers == answers_h and all(p == it.prompt() for p, it in zip(plain, items))
    for i, it in enumerate(items_h):
        if i % 2:
            assert hinted[i] == plain[i]
            continue
        first, rest = hinted[i].split("\n", 1)
        assert rest == plain[i] and first == T.hint_text(it)
        ev = it.events
        if kind == "needle_color":
            assert it.answer_text in first
        elif kind == "needle_shape":
            assert first.endswith(f"{it.answer_text}.")
        elif kind == "count":
            assert f" {it.answer_text} times" in first
        else:  # order: the right choice names the events in the order the hint gives
            assert f"{ev[0].color} {ev[0].shape}, then the {ev[1].color} {ev[1].shape}" in first
            assert it.answer_text == f"the {ev[0].label}, then the {ev[1].label}"
    # the option-line targets still find the four options after a hint
    builder = T.BatchBuilder(processor, 2)
    assert len(builder.option_ends(hinted[0])) == 4


def test_training_inputs_equal_the_processors(processor):
    T._STATE["config"] = T.build_model(processor, layers=1).config
    import torch

    res = T.check_against_processor(T.BatchBuilder(processor, 2), torch.device("cpu"))
    assert res.get("input_ids_equal") is True, res
    assert res["pixel_max_abs_diff"] < 1e-5 and res["grid_equal"]
    assert res["second_per_grid_ts"][0] == pytest.approx(res["second_per_grid_ts"][1])
    rope = res["rope_matches_installed_transformers"]
    assert rope["modern"] or rope["legacy"], rope  # one of the two position rules is the installed one


def test_short_training_run_writes_a_loadable_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "psa_vlm.models.train_tiny", "--out", str(out), "--base", str(tiny_checkpoint),
           "--steps", "2", "--layers", "1", "--max-tokens", "128", "--tokens-per-batch", "256", "--min-batch", "2",
           "--max-batch", "2", "--skip-checks", "--eval-items", "1", "--sets", "bundled_32f_112x112",
           "--log-every", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "training.json").read_text())
    assert meta["steps"] == 2 and len(meta["loss_curve"]) == 2
    assert "bundled_32f_112x112" in meta["held_out"]
    from psa_vlm.inference import load_qwen25vl, tiny_checkpoint_info

    assert tiny_checkpoint_info(out)["trained"] is True
    model, _ = load_qwen25vl(out, device="cpu")
    assert model.config.text_config.num_hidden_layers == 1


def _samples(folder: Path, rows):
    folder.mkdir(parents=True)
    lines = [json.dumps({"doc_id": d, "filtered_resps": [r], "token_counts": [{"psa_density": dens,
                                                                              "psa_engaged": True}]})
             for d, r, dens in rows]
    (folder / "psa_synth_long_samples_x.jsonl").write_text("\n".join(lines) + "\n")


def test_compare_dp_script(tmp_path):
    script = REPO / "benchmarks" / "compare_dp.py"
    _samples(tmp_path / "one", [(0, "A", 0.8), (1, "B", 0.7)])
    _samples(tmp_path / "two", [(1, "B", 0.7), (0, "A", 0.8)])
    _samples(tmp_path / "missing", [(0, "A", 0.8)])
    _samples(tmp_path / "drift", [(0, "A", 0.8), (1, "B", 0.9)])
    _samples(tmp_path / "answer", [(0, "A", 0.8), (1, "C", 0.7)])
    run = lambda a, b, *extra: subprocess.run([sys.executable, str(script), str(tmp_path / a), str(tmp_path / b),
                                               *extra], capture_output=True, text=True)
    ok = run("one", "two", "--expect", "2")
    assert ok.returncode == 0 and "dp check ?: PASS" in ok.stdout and "FAIL" not in ok.stdout, ok.stdout
    assert run("one", "missing").returncode == 1
    assert run("one", "drift").returncode == 1
    assert run("one", "two", "--expect", "3").returncode == 1  # fewer documents than --limit asked for
    differ = run("one", "answer")
    assert differ.returncode == 1 and "responses: FAIL - identical 1/2; differ on documents [1]" in differ.stdout
    assert run("one", "answer", "--allow-response-diffs").returncode == 0
