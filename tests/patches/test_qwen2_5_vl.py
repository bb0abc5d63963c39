"""CPU tests of the Qwen2.5-VL patch on the tiny offline checkpoint with a real (synthetic) video input.

One model is loaded per module (from the session's tiny checkpoint); every test leaves it unpatched. PSA runs
with small blocks (16 tokens, stride 4) and ``min_seq_len`` 0 so that the ~300-token video prompt spans many
blocks and takes the PSA path; the reference backend runs on the CPU.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qwen_vl_utils")
av = pytest.importorskip("av")

import psa_vlm  # noqa: E402
from psa_vlm import PSAConfig  # noqa: E402
from psa_vlm.patches import core as qpatch  # noqa: E402

SMALL = {"min_seq_len": 0, "block_q": 16, "block_k": 16, "stride": 4}
DENSE = PSAConfig.preset("dense", **SMALL)
PAPER = PSAConfig.preset("paper", **SMALL)
# fp32 on the CPU: the reference PSA path and sdpa differ only by summation order
ATOL = 1e-5

FRAMES, WIDTH, HEIGHT, FPS = 12, 224, 112, 4.0


# ---------------------------------------------------------------------------------------------- fixtures
def _write_clip(path) -> None:
    """A moving red square on grey: 12 frames of 224x112 at 4 fps (fallback if the synth module is absent)."""
    import numpy as np

    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=int(FPS))
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    for i in range(FRAMES):
        img = np.full((HEIGHT, WIDTH, 3), 60, np.uint8)
        x = (i * 13) % (WIDTH - 24)
        img[40:64, x : x + 24] = (230, 30, 30)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("psa-video") / "clip.mp4"
    try:
        from psa_vlm.video.synth import make_clip

        make_clip(path, "needle_color", frames=FRAMES, width=WIDTH, height=HEIGHT, fps=FPS, seed=0)
    except ImportError:
        _write_clip(path)
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return m


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(autouse=True)
def _unpatch_after(request):
    yield
    if "model" in request.fixturenames:
        psa_vlm.unpatch_qwen25vl(request.getfixturevalue("model"))


def _messages(video_path, question):
    return [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": video_path, "min_pixels": WIDTH * HEIGHT, "max_pixels": WIDTH * HEIGHT,
                 "fps": FPS},
                {"type": "text", "text": question},
            ],
        }
    ]


QUESTIONS = (
    "What is happening?",
    # 32 tokens longer than the first question: left padding of exactly two 16-token blocks
    "What is happening? please tell me exactly what the red square does in the video and answer with one word right now",
)


def _encode(processor, video_path, questions):
    from qwen_vl_utils import process_vision_info

    texts, videos, metas = [], [], []
    for q in questions:
        msgs = _messages(video_path, q)
        texts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        _, vids, video_kwargs = process_vision_info(msgs, return_video_kwargs=True, return_video_metadata=True)
        (frames, meta), = vids
        videos.append(frames)
        metas.append(meta)
    return processor(text=texts, videos=videos, video_metadata=metas, padding=True, padding_side="left",
                     return_tensors="pt", do_resize=False, **video_kwargs)


@pytest.fixture(scope="module")
def inputs(processor, video_path):
    return _encode(processor, video_path, QUESTIONS[:1])


@pytest.fixture(scope="module")
def reference(model, inputs):
    """Unpatched logits and greedy tokens (computed before any test patches the model)."""
    assert not psa_vlm.is_patched(model)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return logits, tokens


def _visual_spans(model, ids):
    """Expected token types: 1 from each <|vision_start|> to its <|vision_end|> (both included), 0 elsewhere."""
    out = torch.zeros_like(ids, dtype=torch.int8)
    for b in range(ids.shape[0]):
        inside = False
        for i, t in enumerate(ids[b].tolist()):
            if t == model.config.vision_start_token_id:
                inside = True
            out[b, i] = int(inside)
            if t == model.config.vision_end_token_id:
                inside = False
    return out


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------- tests
def test_import_psa_vlm_does_not_import_transformers():
    code = "import sys, psa_vlm; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prompt_has_many_video_tokens(model, inputs):
    ids = inputs["input_ids"]
    n_video = int((ids == model.config.video_token_id).sum())
    assert ids.shape[1] > 200 and n_video >= 192  # 6 x 32 video tokens: many 16-token blocks, mostly visual


def test_dense_preset_equals_unpatched(model, inputs, reference):
    ref_logits, ref_tokens = reference
    psa_vlm.patch_qwen25vl(model, DENSE)
    logits = _logits(model, inputs)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    stats = psa_vlm.psa_stats(model)
    assert sorted(stats["layers"]) == [0, 1, 2] and stats["density"] == pytest.approx(1.0)
    assert stats["attend_backends"] == {"reference": 3}  # the CPU's backend under "auto", every layer
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, ref_tokens)


def test_short_prefill_and_decode_use_original_attention(model, inputs, reference):
    """Below min_seq_len the original sdpa function runs with the same arguments: bit-identical logits."""
    psa_vlm.patch_qwen25vl(model, "paper")  # min_seq_len 4096 > prompt
    assert torch.equal(_logits(model, inputs), reference[0])
    assert psa_vlm.psa_stats(model) == {"layers": {}, "density": None, "histogram": None, "dense_guard_layers": 0,
                                       "attend_backends": {}}
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), reference[1])


def test_paper_preset_is_sparse_and_finite(model, inputs, reference, monkeypatch):
    calls = []
    real = qpatch.run_psa

    def spy(q, k, v, config, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw))
        return real(q, k, v, config, **kw)

    monkeypatch.setattr(qpatch, "run_psa", spy)
    psa_vlm.patch_qwen25vl(model, PAPER)
    logits = _logits(model, inputs)
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, reference[0])
    stats = psa_vlm.psa_stats(model)
    assert sorted(stats["layers"]) == [0, 1, 2]
    assert 0.0 < stats["density"] < 1.0
    assert sum(stats["histogram"].values()) == pytest.approx(1.0)
    for layer in stats["layers"].values():
        assert layer["lq"] == layer["lk"] == inputs["input_ids"].shape[1]
    # GQA un-repeated, mRoPE'd q/k straight from the layer; token types from the prompt's placeholders
    cfg = model.config.text_config
    L = inputs["input_ids"].shape[1]
    q_shape, k_shape, kw = calls[0]
    assert q_shape == (1, cfg.num_attention_heads, L, 16) and k_shape == (1, cfg.num_key_value_heads, L, 16)
    assert torch.equal(kw["token_types"], _visual_spans(model, inputs["input_ids"]))
    assert kw["backend"] == "auto" and kw["scale"] == pytest.approx(16 ** -0.5)
    # decode steps after a PSA prefill run dense and keep the prefill's statistics
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == L + 3
    assert psa_vlm.psa_stats(model)["layers"][0]["lq"] == L


def test_batched_left_padding_equals_single(model, processor, video_path):
    singles = [_encode(processor, video_path, [q]) for q in QUESTIONS]
    batch = _encode(processor, video_path, QUESTIONS)
    lengths = [s["input_ids"].shape[1] for s in singles]
    assert lengths[1] - lengths[0] == 32 and batch["attention_mask"][0].sum() == lengths[0]
    # Dense preset: any padding. Sparse PSA: well defined when the padding is a whole number of blocks (the real
    # tokens' block boundaries stay where they are alone; here 32 = 2 x 16) and the level map does not depend on
    # the importance estimate, which sees the padded keys (its softmax has no key-padding mask): a pyramid that
    # pools every block that is not forced full 8x (quota 1.0 at factor 8) is such a map.
    pool8 = PSAConfig(mode="quota", quotas=(0.0, 0.0, 0.0, 1.0), sim_thresholds=None, **SMALL)
    for cfg in (DENSE, pool8):
        psa_vlm.patch_qwen25vl(model, cfg)
        alone = [_logits(model, s)[0] for s in singles]
        both = _logits(model, batch)
        for row, ref in enumerate(alone):
            torch.testing.assert_close(both[row, -ref.shape[0] :], ref, atol=ATOL, rtol=0, msg=f"{cfg}, row {row}")
        stats = psa_vlm.psa_stats(model)
        assert stats["layers"][0]["batch"] == 2
        if not cfg.dense:
            assert stats["density"] < 1.0


def _second_turn(model, processor, inputs, min_seq_len=None):
    """Prefill the video prompt, then prefill a follow-up question onto the cache (Lq < Lk); last logits."""
    follow = "<|im_end|>\n<|im_start|>user\nAnd what happens at the end?<|im_end|>\n<|im_start|>assistant\n"
    new_ids = processor.tokenizer(follow, return_tensors="pt")["input_ids"]
    # transformers >= 5.2x names the cache argument `cache` (`past_key_values` deprecated), 5.17 only knows the latter
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        cache = getattr(first, cache_kw)
        past = cache.get_seq_length()
        # no attention mask: positions continue from the cache length plus the model's stored mRoPE deltas
        second = model(input_ids=new_ids, use_cache=True, **{cache_kw: cache})
    return first.logits, second.logits, new_ids.shape[1], past, cache


def test_second_turn_on_cache(model, processor, inputs):
    ref_first, ref_second, n_new, past, ref_cache = _second_turn(model, processor, inputs)
    assert 1 < n_new < past
    psa_vlm.patch_qwen25vl(model, DENSE)
    first, second, _, _, _ = _second_turn(model, processor, inputs)
    torch.testing.assert_close(first, ref_first, atol=ATOL, rtol=0)
    torch.testing.assert_close(second, ref_second, atol=ATOL, rtol=0)
    layer = psa_vlm.psa_stats(model)["layers"][0]
    assert (layer["lq"], layer["lk"]) == (n_new, past + n_new)

    psa_vlm.patch_qwen25vl(model, PAPER)
    first, second, _, _, cache = _second_turn(model, processor, inputs)
    assert torch.isfinite(second).all()
    # the cache holds what it holds unpatched: full-resolution K/V of every token (layer 0 sees the same
    # inputs, so its entries are bit-identical; PSA never writes pooled K/V into the cache)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == past + n_new
    assert torch.equal(cache.layers[0].keys, ref_cache.layers[0].keys)
    assert torch.equal(cache.layers[0].values, ref_cache.layers[0].values)
    # token types accumulate across the turns: the cached video stays visual, the new text is text
    state = model.model.language_model._psa_state
    assert state.token_types.shape == (1, past + n_new)
    assert torch.equal(state.token_types[:, :past], _visual_spans(model, inputs["input_ids"]))
    assert int(state.token_types[:, past:].sum()) == 0


def test_unpatch_restores_identical_outputs(model, inputs, reference):
    psa_vlm.patch_qwen25vl(model, PAPER)
    _logits(model, inputs)
    assert psa_vlm.is_patched(model)
    psa_vlm.unpatch_qwen25vl(model)
    assert not psa_vlm.is_patched(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert len(model.model._forward_pre_hooks) == len(model.model.language_model._forward_pre_hooks) == 0
    assert "psa" not in repr(model)
    assert torch.equal(_logits(model, inputs), reference[0])
    psa_vlm.unpatch_qwen25vl(model)  # unpatching an unpatched model is a no-op


def test_patch_twice_changes_nothing(model, inputs, caplog):
    psa_vlm.patch_qwen25vl(model, DENSE)
    state = model.model.language_model._psa_state
    first = _logits(model, inputs)
    with caplog.at_level("INFO", logger="psa_vlm"):
        assert psa_vlm.patch_qwen25vl(model, DENSE) is model
    assert not [r for r in caplog.records if r.levelname == "INFO"]
    assert model.model.language_model._psa_state is state
    assert len(model.model._forward_pre_hooks) == 1
    assert torch.equal(_logits(model, inputs), first)


def test_patch_logs_one_info_line(model, caplog):
    with caplog.at_level("INFO", logger="psa_vlm"):
        psa_vlm.patch_qwen25vl(model, PAPER)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(lines) == 1 and "'sdpa' -> 'psa'" in lines[0] and "vision attention stays 'sdpa'" in lines[0]


def test_unsupported_model_raises_type_error():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with pytest.raises(TypeError, match="Qwen2_5_VL"):
        psa_vlm.patch_qwen25vl(torch.nn.Linear(2, 2))
    tiny_qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="Qwen2ForCausalLM"):
        psa_vlm.patch_qwen25vl(tiny_qwen2)
    assert not psa_vlm.is_patched(tiny_qwen2)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="layers"):
        psa_vlm.patch_qwen25vl(model, PAPER, layers=[3])
    with pytest.raises(ValueError, match="backend"):
        psa_vlm.patch_qwen25vl(model, PAPER, backend="cuda")
    with pytest.raises(TypeError, match="config"):
        psa_vlm.patch_qwen25vl(model, {"block_q": 16})
    assert not psa_vlm.is_patched(model)


def test_unsupported_transformers_version(model, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.52.4")
    with pytest.raises(RuntimeError, match="transformers>="):
        psa_vlm.patch_qwen25vl(model)
    assert not psa_vlm.is_patched(model)


def test_layers_subset(model, inputs):
    psa_vlm.patch_qwen25vl(model, PAPER, layers=[1])
    _logits(model, inputs)
    assert sorted(psa_vlm.psa_stats(model)["layers"]) == [1]
    text = repr(model.model.language_model)
    assert text.count("psa=on") == 1 and text.count("psa=off") == 2


def test_inputs_embeds_only_uses_text_tail_rule(model, processor, monkeypatch):
    seen = []
    real = qpatch.run_psa
    monkeypatch.setattr(qpatch, "run_psa", lambda *a, **kw: (seen.append(kw["token_types"]), real(*a, **kw))[1])
    ids = processor.tokenizer(" ".join(["the red square moves to the left"] * 24), return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach()
    # explicit text positions (transformers 5.0 cannot derive mRoPE positions without input_ids)
    kw = {"inputs_embeds": embeds, "position_ids": torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)}
    with torch.no_grad():
        ref = model(**kw).logits
        psa_vlm.patch_qwen25vl(model, DENSE)
        torch.testing.assert_close(model(**kw).logits, ref, atol=ATOL, rtol=0)
        psa_vlm.patch_qwen25vl(model, PAPER.replace(text_tail=16, sim_thresholds=None))  # random text: no cap
        out = model(**kw).logits
    assert torch.isfinite(out).all()
    assert seen and all(t is None for t in seen)
    assert psa_vlm.psa_stats(model)["density"] < 1.0


def test_print_shows_psa(model):
    psa_vlm.patch_qwen25vl(model, PAPER)
    text = repr(model)
    assert "psa=on" in text  # torch prints identical consecutive layers once ("(0-2): 3 x ...")
    assert all("psa=on" in repr(layer.self_attn) for layer in model.model.language_model.layers)
    assert "psa" not in repr(model.model.visual)
    assert "preset=paper+" in text and "backend=auto" in text


def test_vision_attention_untouched(model, inputs, reference, monkeypatch):
    """Only the language model reaches the PSA function; the vision tower keeps sdpa."""
    callers = set()
    fn = qpatch.PSAAttentionFunction("sdpa")

    def recording(module, *a, **kw):
        callers.add(type(module).__name__)
        return fn(module, *a, **kw)

    from transformers import AttentionInterface

    psa_vlm.patch_qwen25vl(model, DENSE)
    AttentionInterface.register("psa", recording)
    try:
        _logits(model, inputs)
    finally:
        psa_vlm.register_attention()
    assert callers == {"Qwen2_5_VLAttention"}
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_submodels_accepted(model, inputs, reference):
    psa_vlm.patch_qwen25vl(model.model, DENSE)
    assert psa_vlm.is_patched(model) and psa_vlm.is_patched(model.model.language_model)
    torch.testing.assert_close(_logits(model, inputs), reference[0], atol=ATOL, rtol=0)
    psa_vlm.unpatch_qwen25vl(model.model.language_model)
    assert not psa_vlm.is_patched(model)
    psa_vlm.patch_qwen25vl(model.model.language_model, PAPER)  # text model alone: hook on the text model
    assert len(model.model.language_model._forward_pre_hooks) == 1


def test_load_with_registered_name(tiny_checkpoint, inputs, reference):
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert psa_vlm.register_attention() == "psa"
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation={"text_config": "psa", "vision_config": "sdpa"}
    ).eval()
    assert m.config.text_config._attn_implementation == "psa"
    assert m.config.vision_config._attn_implementation == "sdpa"
    assert psa_vlm.is_patched(m)
    assert torch.equal(_logits(m, inputs), reference[0])  # default min_seq_len: dense sdpa for this prompt
    psa_vlm.patch_qwen25vl(m, DENSE)  # adds token types and statistics, keeps the name
    torch.testing.assert_close(_logits(m, inputs), reference[0], atol=ATOL, rtol=0)
    assert psa_vlm.psa_stats(m)["density"] == pytest.approx(1.0)
    psa_vlm.unpatch_qwen25vl(m)
    assert m.config.text_config._attn_implementation == "sdpa"


def test_eager_model(tiny_checkpoint, inputs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ref = _logits(m, inputs)
    psa_vlm.patch_qwen25vl(m, PAPER.replace(min_seq_len=4096))
    assert m.config.text_config._attn_implementation == "psa_eager"
    assert m.config.vision_config._attn_implementation == "eager"
    assert torch.equal(_logits(m, inputs), ref)  # eager fallback, eager masks: identical
    psa_vlm.patch_qwen25vl(m, DENSE)
    torch.testing.assert_close(_logits(m, inputs), ref, atol=ATOL, rtol=0)
    psa_vlm.unpatch_qwen25vl(m)
    assert m.config.text_config._attn_implementation == "eager"


def test_non_causal_attention_never_uses_psa(model, monkeypatch):
    """Loaded with "psa" for every sub-config, the vision tower's (non-causal) attention still runs sdpa."""
    monkeypatch.setattr(qpatch, "run_psa", lambda *a, **kw: pytest.fail("PSA ran on non-causal attention"))
    attn = model.model.visual.blocks[0].attn
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    psa_vlm.patch_qwen25vl(model, DENSE)  # a state that would take PSA for any length if the call were causal
    monkeypatch.setattr(attn, "_psa_state", model.model.language_model._psa_state, raising=False)
    out, _ = qpatch.PSAAttentionFunction("sdpa")(attn, q, k, v, None, scaling=0.25, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)
