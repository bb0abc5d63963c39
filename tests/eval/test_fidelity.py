"""``eval-fidelity``, per-layer configs in the patch and ``calibrate`` on the shipped tiny model (CPU, reference
backend, 16-frame 112x112 clips: ~200-token prompts with 16-token PSA blocks so that PSA engages)."""

import csv
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from psa_vlm import PSAConfig, psa_attention
from psa_vlm.eval.fidelity import FidelityPrompt, FidelityRunner, load_prompts, relative_error

BLOCK, MIN_SEQ = 16, 64
SMALL = ["--block-size", str(BLOCK), "--min-seq-len", str(MIN_SEQ), "--max-frames", "16", "--min-pixels", "3136",
         "--max-pixels", "12544"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four synthetic clips (all kinds) with their questions and answers in questions.jsonl."""
    from psa_vlm.video.synth import KINDS, make_clip

    root = tmp_path_factory.mktemp("fidelity-clips")
    with open(root / "questions.jsonl", "w") as fh:
        for i, kind in enumerate(KINDS):
            item = make_clip(root / f"{kind}.mp4", kind, frames=16, width=112, height=112, fps=8.0, seed=100 + i)
            fh.write(json.dumps({"video": f"{kind}.mp4", "question": item.prompt(), "answer": item.answer}) + "\n")
    return root


@pytest.fixture(scope="module")
def runner():
    from psa_vlm.inference import default_model_dir, load_qwen25vl

    model, processor = load_qwen25vl(default_model_dir(), device="cpu")
    return FidelityRunner(model, processor, backend="reference", max_frames=16, min_pixels=3136, max_pixels=12544)


def _cfg(name="quota-0.1", **kw):
    return PSAConfig.preset(name, block_q=BLOCK, block_k=BLOCK, min_seq_len=MIN_SEQ, **kw)


class _Recorder:
    """Wraps the registered ``psa`` attention function to keep each layer's query, key, value, kwargs and output."""

    def __init__(self):
        self.calls = {}

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        inner = ALL_ATTENTION_FUNCTIONS["psa"]

        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            out, w = inner(module, query, key, value, attention_mask, *args, **kwargs)
            if query.shape[2] > 1:
                self.calls[module.layer_idx] = (query.clone(), key.clone(), value.clone(), attention_mask, kwargs,
                                                out.clone())
            return out, w

        AttentionInterface.register("psa", wrapper)
        return self

    def __exit__(self, *exc):
        from psa_vlm.patches import register_attention

        register_attention()


def _token_types(runner, inputs):
    cfg = runner.model.config
    ids = inputs["input_ids"]
    return ((ids == cfg.video_token_id) | (ids == cfg.image_token_id)).to(torch.int8)


def test_observed_layer_error_matches_an_explicit_dense_and_psa_comparison(runner, clips):
    from psa_vlm.patches import observe, patch_qwen25vl, unpatch_qwen25vl

    prompt = load_prompts(videos=clips, limit=1)[0]
    inputs = runner.inputs(prompt)
    config = _cfg("quota-0.2")
    patch_qwen25vl(runner.model, config, backend="reference")
    seen = {}

    def fn(layer_idx, psa_out, dense_out, plan):
        seen[layer_idx] = (psa_out.clone(), dense_out().clone(), relative_error(psa_out, dense_out()), plan)

    try:
        with _Recorder() as rec, observe(runner.model, fn), torch.inference_mode():
            runner.model(**inputs, use_cache=False)
    finally:
        unpatch_qwen25vl(runner.model)
    assert sorted(seen) == [0, 1, 2, 3] == sorted(rec.calls)
    for layer in (1, 3):
        q, k, v, mask, kwargs, out = rec.calls[layer]
        psa_out, dense_seen, err_seen, plan = seen[layer]
        assert torch.equal(psa_out, out)  # observe hands over the layer's own output
        # explicit dense attention on the very inputs: causal SDPA with the KV heads repeated (GQA)
        g = q.shape[1] // k.shape[1]
        dense = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True,
                                               scale=kwargs["scaling"]).transpose(1, 2)
        torch.testing.assert_close(dense_seen, dense, rtol=1e-5, atol=1e-6)
        # explicit PSA with this layer's config and the prompt's token types
        psa = psa_attention(q, k, v, config.for_layer(layer), scale=kwargs["scaling"],
                            token_types=_token_types(runner, inputs), backend="reference").transpose(1, 2)
        torch.testing.assert_close(out, psa, rtol=1e-5, atol=1e-6)
        explicit = ((out.double() - dense.double()).norm() / dense.double().norm()).item()
        assert err_seen == pytest.approx(explicit, rel=1e-5)
        assert 0.0 < err_seen < 1.0 and plan.level_map.density() < 1.0


def test_layer_overrides_reach_the_layers_they_name(runner, clips, tmp_path):
    from psa_vlm import build_level_map
    from psa_vlm.patches import observe, patch_qwen25vl, psa_stats, unpatch_qwen25vl

    config = _cfg("quota-0.1", layer_overrides={0: {"dense": True}, 2: {"quotas": (0.15, 0.15, 0.15, 0.3)},
                                                3: {"pool_factors": (), "quotas": (0.3, 0, 0, 0)}})
    path = tmp_path / "layers.json"
    config.save(path)
    inputs = runner.inputs(load_prompts(videos=clips, limit=2)[1])
    plans = {}
    patch_qwen25vl(runner.model, str(path), backend="reference")  # a JSON path is accepted
    try:
        with _Recorder() as rec, observe(runner.model, lambda i, o, d, p: plans.__setitem__(i, p)), torch.inference_mode():
            runner.model(**inputs, use_cache=False)
        stats = psa_stats(runner.model)["layers"]
    finally:
        unpatch_qwen25vl(runner.model)
    assert stats[0]["density"] == pytest.approx(1.0) and stats[0]["histogram"]["full"] == pytest.approx(1.0)
    for layer in (1, 2, 3):
        q, k, *_ = rec.calls[layer]
        want = build_level_map(q, k, config.for_layer(layer), token_types=_token_types(runner, inputs),
                               scale=rec.calls[layer][4]["scaling"], backend="reference")
        assert torch.equal(plans[layer].level_map.factors, want.factors), layer
    hist = {i: stats[i]["histogram"] for i in stats}
    assert hist[3]["pool2"] == hist[3]["pool4"] == hist[3]["pool8"] == 0.0  # binary on layer 3 only
    assert hist[2]["pool4"] + hist[2]["pool8"] > 0  # the 0.3 pyramid on layer 2 pools some blocks
    assert stats[2]["density"] > stats[1]["density"]  # quota 0.3 pyramid vs the base 0.1
    with pytest.raises(ValueError, match="layer_overrides names layer"):
        patch_qwen25vl(runner.model, _cfg(layer_overrides={7: {"dense": True}}))


def test_eval_fidelity_on_four_prompts(clips, tmp_path, caplog):
    from psa_vlm.cli import main

    out = tmp_path / "fid"
    argv = ["eval-fidelity", "--videos", str(clips), "--presets", "dense,quota-0.1,binary-0.1", "--limit", "4",
            "--backend", "reference", "--bootstrap", "200", "--out", str(out), *SMALL]
    assert main(argv) == 0
    rows = {r["setting"]: r for r in csv.DictReader(open(out / "fidelity.csv"))}
    assert set(rows) == {"dense", "quota-0.1", "binary-0.1"}
    dense, q = rows["dense"], rows["quota-0.1"]
    assert float(dense["kl"]) == 0.0 and float(dense["kl_hi"]) == 0.0
    assert float(dense["agreement"]) == 1.0 and float(dense["density"]) == 1.0 and dense["n"] == "4"
    assert float(q["kl"]) > 0 and float(q["kl_lo"]) <= float(q["kl"]) <= float(q["kl_hi"])
    assert float(q["density"]) < 1.0
    assert 0.0 <= float(q["accuracy_lo"]) <= float(q["accuracy"]) <= float(q["accuracy_hi"]) <= 1.0
    layers = [r for r in csv.DictReader(open(out / "layers.csv")) if r["setting"] == "quota-0.1"]
    assert [int(r["layer"]) for r in layers] == [0, 1, 2, 3] and all(float(r["attn_err"]) > 0 for r in layers)
    pairs = list(csv.DictReader(open(out / "pairs.csv")))
    assert [(p["a"], p["b"]) for p in pairs] == [("quota-0.1", "binary-0.1")] and pairs[0]["accuracy_p"] != ""
    recs = [json.loads(x) for x in (out / "runs" / "quota-0.1.jsonl").read_text().splitlines()[1:]]
    assert len(recs) == 4 and all(r["label"] in "ABCD" for r in recs)
    assert "KL(dense‖PSA)" in (out / "fidelity.md").read_text() and (out / "fidelity.png").stat().st_size > 0
    # a second run reuses the saved settings
    caplog.set_level(logging.INFO, logger="psa_vlm.eval.fidelity")
    assert main(argv) == 0
    assert caplog.text.count("reusing") == 3


def test_calibrate_writes_a_config_that_meets_its_target(runner, clips, tmp_path):
    from psa_vlm.eval.calibrate import calibrate
    from psa_vlm.patches import observe, patch_qwen25vl, unpatch_qwen25vl

    prompts = load_prompts(videos=clips, limit=2)
    base = _cfg("paper")
    target = 0.5
    res = calibrate(runner, prompts, base, ["quota-0.1", "quota-0.3"], max_attn_err=target)
    path = tmp_path / "cal.json"
    res.config.save(path)
    cfg = PSAConfig.load(path)
    assert cfg == res.config and res.density < 1.0 and any(c != "dense" for c in res.choices.values())
    # measure again, independently: the saved config through the patch on the calibration prompts
    worst = {}
    patch_qwen25vl(runner.model, cfg, backend="reference")
    try:
        for p in prompts:
            def fn(i, o, d, plan):
                worst[i] = max(worst.get(i, 0.0), relative_error(o, d()))

            with observe(runner.model, fn), torch.inference_mode():
                runner.model(**runner.inputs_of(p), use_cache=False)
    finally:
        unpatch_qwen25vl(runner.model)
    assert sorted(worst) == [0, 1, 2, 3] and max(worst.values()) <= target
    assert worst == pytest.approx(res.layer_err, rel=1e-6)
    # each layer got the cheapest candidate that passed on that layer
    for i, name in res.choices.items():
        passing = [t for t in res.trials if t["layer"] == i and t["passes"]]
        if passing:
            assert name == min(passing, key=lambda t: t["density"])["candidate"]
    # an unreachable target leaves every layer dense
    strict = calibrate(runner, prompts[:1], base, ["quota-0.3"], max_attn_err=1e-12)
    assert set(strict.choices.values()) == {"dense"} and strict.density == pytest.approx(1.0)


def test_calibrate_cli_kl_target(clips, tmp_path):
    from psa_vlm.cli import main

    out = tmp_path / "kl.json"
    assert main(["calibrate", "--videos", str(clips), "--limit", "1", "--offset", "2", "--max-kl", "0.05",
                 "--candidates", "quota-0.2", "--backend", "reference", "--out", str(out), *SMALL]) == 0
    cfg = PSAConfig.load(out)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert max(report["kl"]) <= 0.05 and len(report["choices"]) == 4
    assert all(s["speedup"] >= 1.0 for s in report["predicted_ttft_speedup"])
    assert cfg.block_q == BLOCK and cfg.min_seq_len == MIN_SEQ


def test_predicted_speedup_is_the_cost_model_ceiling(tmp_path):
    from psa_vlm.eval.calibrate import predicted_speedups

    p = tmp_path / "prefill.csv"
    p.write_text("gpu,seq_len,method,attn_share_dense\nG,1000,dense,0.5\nG,1000,quota-0.2,\nG,2000,dense,0.8\n")
    got = predicted_speedups(0.25, p)
    assert [g["seq_len"] for g in got] == [1000, 2000]
    assert got[0]["speedup"] == pytest.approx(1 / (0.5 + 0.5 * 0.25)) and got[1]["speedup"] == pytest.approx(1 / (0.2 + 0.2))


def test_prompt_sources_reject_bad_input(tmp_path, clips):
    with pytest.raises(ValueError, match="one prompt source"):
        load_prompts(task="psa_synth_long", videos=clips)
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(videos=tmp_path)
    (tmp_path / "questions.jsonl").write_text('{"video": "a.mp4"}\n')
    with pytest.raises(ValueError, match="expected"):
        load_prompts(videos=tmp_path)
    assert isinstance(load_prompts(videos=clips, limit=1)[0], FidelityPrompt)


def test_uncached_inputs_give_the_same_result(runner, clips):
    """Past the cache budget the video is decoded again per setting; the measurements must not change."""
    prompt = load_prompts(videos=clips, limit=1)[0]
    lean = FidelityRunner(runner.model, runner.processor, backend="reference", max_frames=16, min_pixels=3136,
                          max_pixels=12544, cache_bytes=0)
    a, b = runner.run(prompt, _cfg("quota-0.2"), "x"), lean.run(prompt, _cfg("quota-0.2"), "x")
    assert lean.reference(prompt).inputs is None and runner.reference(prompt).inputs is not None
    assert (a.kl, a.answer_text, a.layer_err, a.layer_density) == (b.kl, b.answer_text, b.layer_err, b.layer_density)
    assert a.kl > 0 and a.prompt_tokens == b.prompt_tokens > 100
    runner.apply(None)


def test_cli_rejects_bad_input_before_loading(tmp_path, capsys):
    from psa_vlm.cli import main

    assert main(["eval-fidelity", "--presets", "dense,nope"]) == 2
    assert main(["eval-fidelity", "--psa-config", str(tmp_path / "missing.json")]) == 2
    assert main(["calibrate", "--max-kl", "-1", "--out", str(tmp_path / "c.json")]) == 2
    assert main(["calibrate", "--max-attn-err", "0.1", "--candidates", "quota-9", "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "nope" in err[0] and "missing.json" in err[1] and "quota-9" in err[3]
