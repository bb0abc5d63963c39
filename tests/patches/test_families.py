"""CPU tests of ``psa_vlm.patch`` on every supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE).

Tiny random models (``conftest.build_tiny``) with a real video through each family's processor. PSA runs with
16-token blocks, stride 4 and ``min_seq_len`` 0 so that the ~200-token prompts take the PSA path; the reference
backend runs on the CPU. Every test leaves its model unpatched.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qwen_vl_utils")
pytest.importorskip("av")

import psa_vlm  # noqa: E402
from psa_vlm import PSAConfig  # noqa: E402
from psa_vlm.patches import core  # noqa: E402

from tiny_families import FAMILIES, FPS, HEIGHT, WIDTH  # noqa: E402  (pytest puts this directory on sys.path)

SMALL = {"min_seq_len": 0, "block_q": 16, "block_k": 16, "stride": 4}
DENSE = PSAConfig.preset("dense", **SMALL)
PAPER = PSAConfig.preset("paper", **SMALL)
# fp32 on the CPU: the reference PSA path and sdpa differ only by summation order
ATOL = 1e-5
QUESTIONS = (
    "What is happening?",
    "What is happening? please tell me exactly what the red square does in the video and answer with one word",
)


# ---------------------------------------------------------------------------------------------- helpers
def _encode(tiny, clip, questions, **video):
    from qwen_vl_utils import process_vision_info

    texts, videos, metas, kwargs = [], [], [], {}
    for q in questions:
        item = {"type": "video", "video": clip, "min_pixels": WIDTH * HEIGHT, "max_pixels": WIDTH * HEIGHT, "fps": FPS}
        msgs = [{"role": "user", "content": [{**item, **video}, {"type": "text", "text": q}]}]
        texts.append(tiny.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        _, vids, kwargs = process_vision_info(msgs, return_video_kwargs=True, return_video_metadata=True,
                                              image_patch_size=tiny.patch_size)
        (frames, meta), = vids
        videos.append(frames)
        metas.append(meta)
    return tiny.processor(text=texts, videos=videos, video_metadata=metas, padding=True, padding_side="left",
                          return_tensors="pt", do_resize=False, **kwargs)


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def _generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def _text_model(model):
    return model.model.language_model


def _outside_spans(tiny, ids):
    """Independent count of the tokens outside every <|vision_start|>...<|vision_end|> span (per row)."""
    cfg = tiny.model.config
    counts = []
    for row in ids.tolist():
        depth, n = 0, 0
        for t in row:
            if t == cfg.vision_start_token_id:
                depth += 1
            elif t == cfg.vision_end_token_id:
                depth -= 1
            elif depth == 0:
                n += 1
        counts.append(n)
    return counts


@pytest.fixture(params=FAMILIES)
def case(request, tiny_family, clip_path):
    """``(tiny, inputs, reference logits, reference greedy tokens)``; unpatches the model afterwards."""
    tiny = tiny_family(request.param)
    if not hasattr(tiny, "_ref"):
        inputs = _encode(tiny, clip_path, QUESTIONS[:1])
        assert not psa_vlm.is_patched(tiny.model)
        tiny._ref = (inputs, _logits(tiny.model, inputs), _generate(tiny.model, inputs))
    yield (tiny, *tiny._ref)
    psa_vlm.unpatch(tiny.model)


# ---------------------------------------------------------------------------------------------- tests
def test_dense_preset_equals_unpatched_then_unpatch_restores(case, caplog):
    tiny, inputs, ref_logits, ref_tokens = case
    model = tiny.model
    with caplog.at_level("INFO", logger="psa_vlm"):
        assert psa_vlm.patch(model, DENSE) is model
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(lines) == 1 and "'sdpa' -> 'psa'" in lines[0], lines
    torch.testing.assert_close(_logits(model, inputs), ref_logits, atol=ATOL, rtol=0)
    stats = psa_vlm.psa_stats(model)
    assert sorted(stats["layers"]) == list(range(model.config.text_config.num_hidden_layers))
    assert stats["density"] == pytest.approx(1.0)
    assert torch.equal(_generate(model, inputs), ref_tokens)
    # patching twice changes nothing: same state, one hook, no INFO line
    state = _text_model(model)._psa_state
    caplog.clear()
    with caplog.at_level("INFO", logger="psa_vlm"):
        psa_vlm.patch(model, DENSE)
    assert not [r for r in caplog.records if r.levelname == "INFO"]
    assert _text_model(model)._psa_state is state
    assert len(model.model._forward_pre_hooks) == len(_text_model(model)._forward_pre_hooks) == 1
    psa_vlm.unpatch(model)
    assert not psa_vlm.is_patched(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert len(model.model._forward_pre_hooks) == len(_text_model(model)._forward_pre_hooks) == 0
    assert "psa" not in repr(model)
    assert torch.equal(_logits(model, inputs), ref_logits)


def test_sparse_preset_runs(case):
    tiny, inputs, ref_logits, _ = case
    psa_vlm.patch(tiny.model, PAPER.replace(sim_thresholds=None))
    logits = _logits(tiny.model, inputs)
    assert torch.isfinite(logits).all() and not torch.equal(logits, ref_logits)
    stats = psa_vlm.psa_stats(tiny.model)
    assert 0.0 < stats["density"] < 1.0 and stats["histogram"]["full"] < 1.0
    assert "psa=on" in repr(tiny.model) and "psa" not in repr(tiny.model.model.visual)


def test_per_layer_gqa_shared_estimator(case, monkeypatch):
    """``layer_overrides`` reach the estimator through the patch: only layer 1 estimates per KV head."""
    from psa_vlm import api

    tiny, inputs, ref_logits, _ = case
    seen = []
    real = api.estimator_queries

    def spy(q, num_kv_heads, config):
        out = real(q, num_kv_heads, config)
        seen.append((config.estimate_heads, q.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(api, "estimator_queries", spy)
    cfg = PSAConfig.preset("quota-0.2", **SMALL, layer_overrides={1: {"estimate_heads": "kv"}})
    psa_vlm.patch(tiny.model, cfg)
    logits = _logits(tiny.model, inputs)
    assert torch.isfinite(logits).all()
    text = tiny.model.config.text_config
    hq, hkv = text.num_attention_heads, text.num_key_value_heads
    assert hq > hkv, "the tiny models use GQA"
    assert seen == [("query", hq, hq), ("kv", hq, hkv)] + [("query", hq, hq)] * (text.num_hidden_layers - 2)


def test_left_padded_batch_equals_each_alone(case, clip_path):
    tiny = case[0]
    singles = [_encode(tiny, clip_path, [q]) for q in QUESTIONS]
    batch = _encode(tiny, clip_path, QUESTIONS)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 is left-padded
    psa_vlm.patch(tiny.model, DENSE)
    both = _logits(tiny.model, batch)
    assert psa_vlm.psa_stats(tiny.model)["layers"][0]["batch"] == 2
    for row, single in enumerate(singles):
        alone = _logits(tiny.model, single)[0]
        torch.testing.assert_close(both[row, -alone.shape[0]:], alone, atol=ATOL, rtol=0, msg=f"row {row}")


def _second_turn(tiny, inputs):
    follow = "<|im_end|>\n<|im_start|>user\nAnd what happens at the end?<|im_end|>\n<|im_start|>assistant\n"
    new_ids = tiny.processor.tokenizer(follow, return_tensors="pt")["input_ids"]
    cache_kw = "cache" if "cache" in inspect.signature(tiny.model.forward).parameters else "past_key_values"
    with torch.no_grad():
        first = tiny.model(**inputs, use_cache=True)
        cache = getattr(first, cache_kw)
        past = cache.get_seq_length()
        second = tiny.model(input_ids=new_ids, use_cache=True, **{cache_kw: cache})
    return first.logits, second.logits, new_ids.shape[1], past


def test_second_turn_on_cache(case):
    tiny, inputs, _, _ = case
    ref_first, ref_second, n_new, past = _second_turn(tiny, inputs)
    psa_vlm.patch(tiny.model, DENSE)
    first, second, _, _ = _second_turn(tiny, inputs)
    torch.testing.assert_close(first, ref_first, atol=ATOL, rtol=0)
    torch.testing.assert_close(second, ref_second, atol=ATOL, rtol=0)
    layer = psa_vlm.psa_stats(tiny.model)["layers"][0]
    assert (layer["lq"], layer["lk"]) == (n_new, past + n_new)
    state = _text_model(tiny.model)._psa_state
    assert state.token_types.shape == (1, past + n_new) and int(state.token_types[:, past:].sum()) == 0
    assert int((state.token_types[:, :past] == 0).sum()) == _outside_spans(tiny, inputs["input_ids"])[0]


def test_deepcopy_and_pickle_behave_like_the_original(case):
    """Issue #11 item 3: a copy has its own state; pickling works (no local closures)."""
    tiny, inputs, _, _ = case
    model = tiny.model
    psa_vlm.patch(model, PAPER.replace(sim_thresholds=None))
    ref = _logits(model, inputs)
    twin = copy.deepcopy(model)
    assert _text_model(twin)._psa_state is not _text_model(model)._psa_state
    assert all(m._psa_state is _text_model(twin)._psa_state for m in core.attention_modules(
        core.resolve(twin, psa_vlm.patches.FAMILIES, "test")))
    # the copy on another prompt first, then the prompt of the original: the original's state is untouched
    other = {k: v[..., : v.shape[-1] // 2] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()
             if k in ("input_ids", "attention_mask")}
    types_before = _text_model(model)._psa_state.token_types.clone()
    _logits(twin, other)
    assert torch.equal(_text_model(model)._psa_state.token_types, types_before)
    assert torch.equal(_logits(twin, inputs), ref)
    assert torch.equal(_logits(model, inputs), ref)
    # pickle / torch.save round trips, patched
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert psa_vlm.is_patched(loaded)
    assert torch.equal(_logits(loaded, inputs), ref)
    assert torch.equal(_logits(pickle.loads(pickle.dumps(model)), inputs), ref)
    psa_vlm.unpatch(twin)
    assert psa_vlm.is_patched(model) and len(model.model._forward_pre_hooks) == 1


def _packed_text(tiny, lengths=(150, 130), seed=0):
    """Issue #11 item 1: text samples packed in one row, position ids restarting at 0 (text row included)."""
    g = torch.Generator().manual_seed(seed)
    special = max(tiny.model.config.vision_start_token_id, tiny.model.config.video_token_id)
    samples = [torch.randint(3, min(special, 600), (n,), generator=g) for n in lengths]
    ids = torch.cat(samples)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])
    return samples, ids, pos.view(1, 1, -1).expand(4, 1, -1).contiguous()


@pytest.mark.parametrize("text_row", [True, False], ids=["4-row", "2-D"])
def test_packed_sequences_run_the_original_attention(case, caplog, text_row):
    tiny = case[0]
    model = tiny.model
    samples, ids, pos = _packed_text(tiny)
    kw = {"input_ids": ids, "position_ids": pos if text_row else pos[0], "use_cache": False}
    ref = _logits(model, kw)
    alone = [_logits(model, {"input_ids": s[None], "use_cache": False})[0] for s in samples]
    # [4, B, L] ids (text row first): transformers keeps the samples apart; [B, L] ids: Qwen3-VL too, Qwen2/2.5-VL
    # expand them to mRoPE rows without a text row and attend causally over the whole row
    apart = text_row or tiny.family.startswith("qwen3")
    if apart:
        torch.testing.assert_close(ref[0, : len(samples[0])], alone[0], atol=ATOL, rtol=0)
    psa_vlm.patch(model, DENSE)
    with caplog.at_level("WARNING", logger="psa_vlm"):
        out = _logits(model, kw)
        _logits(model, kw)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if apart:
        torch.testing.assert_close(out[0, len(samples[0]):], alone[1], atol=1e-4, rtol=0)
    msgs = [r.getMessage() for r in caplog.records if "packed" in r.getMessage()]
    assert len(msgs) == 1, msgs  # logged once
    assert psa_vlm.psa_stats(model)["layers"] == {}
    # the same samples as a (non-packed) left-padded batch still take PSA
    _logits(model, {"input_ids": ids[:, :150], "use_cache": False})
    assert psa_vlm.psa_stats(model)["density"] == pytest.approx(1.0)


def test_custom_masks_and_cu_seq_lens_run_the_original(case):
    tiny = case[0]
    model = tiny.model
    samples, ids, _ = _packed_text(tiny, (40, 57))
    L = ids.shape[1]
    block = torch.zeros(1, 1, L, L, dtype=torch.bool)
    block[..., :40, :40] = True
    block[..., 40:, 40:] = True
    mask4d = block & torch.ones(L, L, dtype=torch.bool).tril()
    cu = torch.tensor([0, 40, L], dtype=torch.int32)
    packed = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 57, "max_length_k": 57}
    text_model = _text_model(model)
    embeds = model.get_input_embeddings()(ids).detach()
    calls = [{"inputs_embeds": embeds, "attention_mask": mask4d}, {"inputs_embeds": embeds, **packed}]
    with torch.no_grad():
        refs = [text_model(**c).last_hidden_state for c in calls]
        for target in (text_model, model):  # patched as a text model, or whole and the text model called directly
            psa_vlm.patch(target, DENSE)
            for c, ref in zip(calls, refs):
                torch.testing.assert_close(text_model(**c).last_hidden_state, ref, atol=ATOL, rtol=0)
                assert psa_vlm.psa_stats(text_model)["layers"] == {}
            text_model(inputs_embeds=embeds)  # causal, no mask: PSA, with the text_tail rule
            assert psa_vlm.psa_stats(text_model)["density"] == pytest.approx(1.0)
            assert text_model._psa_state.token_types is None
            psa_vlm.unpatch(target)


def test_output_attentions_returns_the_original_weights(case, caplog):
    """Issue #11 item 4: an eager model asked for weights runs its original attention for that call."""
    tiny, inputs, _, _ = case
    model = copy.deepcopy(tiny.model)
    _text_model(model).config._attn_implementation_internal = "eager"
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
    n_layers = model.config.text_config.num_hidden_layers
    L = inputs["input_ids"].shape[1]
    assert len(ref.attentions) == n_layers and ref.attentions[0].shape == (1, 4, L, L)
    psa_vlm.patch(model, DENSE)
    assert model.config.text_config._attn_implementation == "psa_eager"
    with caplog.at_level("WARNING", logger="psa_vlm"), torch.no_grad():
        out = model(**inputs, output_attentions=True)
    assert len(out.attentions) == n_layers
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any("output_attentions" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(_logits(model, inputs), ref.logits, atol=ATOL, rtol=0)  # and PSA again without
    assert psa_vlm.psa_stats(model)["density"] == pytest.approx(1.0)


def test_observe_reports_psa_and_original_outputs(case):
    tiny, inputs, _, _ = case
    seen = []

    def fn(layer_idx, psa_out, dense_out, plan):
        seen.append((layer_idx, psa_out.shape, (psa_out - dense_out()).abs().max().item(), plan.level_map.density()))

    psa_vlm.patch(tiny.model, DENSE)
    with psa_vlm.observe(tiny.model, fn):
        _logits(tiny.model, inputs)
    _logits(tiny.model, inputs)  # outside the block: not reported
    cfg = tiny.model.config.text_config
    L = inputs["input_ids"].shape[1]
    assert [s[0] for s in seen] == list(range(cfg.num_hidden_layers))
    assert all(s[1] == (1, L, cfg.num_attention_heads, 16) and s[2] < ATOL and s[3] == 1.0 for s in seen)
    assert _text_model(tiny.model)._psa_state.observers == []


def test_family_functions_and_unsupported_models(case):
    tiny = case[0]
    own = {"qwen2_vl": psa_vlm.patch_qwen2vl, "qwen2_5_vl": psa_vlm.patch_qwen25vl,
           "qwen3_vl": psa_vlm.patch_qwen3vl, "qwen3_vl_moe": psa_vlm.patch_qwen3vl}[tiny.family]
    other = psa_vlm.patch_qwen25vl if tiny.family != "qwen2_5_vl" else psa_vlm.patch_qwen3vl
    with pytest.raises(TypeError, match=type(tiny.model).__name__):
        other(tiny.model)
    assert not psa_vlm.is_patched(tiny.model)
    own(tiny.model.model, DENSE)  # the base model
    assert psa_vlm.is_patched(tiny.model) and psa_vlm.is_patched(_text_model(tiny.model))
    psa_vlm.unpatch(_text_model(tiny.model))
    assert not psa_vlm.is_patched(tiny.model)
    with pytest.raises(TypeError) as err:
        psa_vlm.patch(torch.nn.Linear(2, 2))
    for name in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLModel", "Qwen3VLTextModel",
                 "Qwen3VLMoeForConditionalGeneration"):
        assert name in str(err.value)


class _FlashStandIn:
    """A stand-in for flash_attention_2 (no flash-attn on the CPU), registered under a name containing "flash".

    It records how it was called and computes causal attention with flash's conventions: the mask is the 2-D
    key padding mask (or None), causality bottom-right, output ``[B, Lq, Hq, D]``.
    """

    name = "flash_attention_standin"

    def __init__(self):
        self.calls = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append({
            "impl": module.config._attn_implementation,
            "shapes": (tuple(query.shape), tuple(key.shape)),
            "mask": None if attention_mask is None else attention_mask.clone(),
            "kwargs": {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
        })
        lq, lk = query.shape[2], key.shape[2]
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # padded query rows: finite garbage, as flash
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                                                scale=kwargs["scaling"], enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None


def _same_call(a, b):
    assert a["impl"] == b["impl"] == _FlashStandIn.name and a["shapes"] == b["shapes"]
    assert (a["mask"] is None) == (b["mask"] is None) and (a["mask"] is None or torch.equal(a["mask"], b["mask"]))
    assert a["kwargs"].keys() == b["kwargs"].keys()
    for k, v in a["kwargs"].items():
        w = b["kwargs"][k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k


def test_flash_attention_original_falls_back_under_its_own_name(case, clip_path):
    """Issue #13 item 3: a model loaded with a flash attention keeps it for everything PSA does not run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.utils.generic import is_flash_attention_requested

    tiny = case[0]
    standin = _FlashStandIn()
    AttentionInterface.register(standin.name, standin)
    AttentionMaskInterface.register(standin.name, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    model = copy.deepcopy(tiny.model)
    _text_model(model).config._attn_implementation_internal = standin.name
    batch = _encode(tiny, clip_path, QUESTIONS)  # left padding: flash gets the 2-D mask
    ref = _logits(model, batch)
    ref_tokens = _generate(model, batch, n=3)
    unpatched = list(standin.calls)
    assert unpatched and unpatched[0]["mask"] is not None and unpatched[0]["mask"].dim() == 2

    psa_vlm.patch(model, DENSE.replace(min_seq_len=10**6))  # every call falls back
    name = model.config.text_config._attn_implementation
    assert name == "psa_" + standin.name and is_flash_attention_requested(requested_attention_implementation=name)
    standin.calls.clear()
    assert torch.equal(_logits(model, batch), ref)
    assert torch.equal(_generate(model, batch, n=3), ref_tokens)
    assert len(standin.calls) == len(unpatched)
    for a, b in zip(standin.calls, unpatched):
        _same_call(a, b)

    psa_vlm.patch(model, DENSE)  # prefill by PSA, decode steps by the stand-in under its own name
    standin.calls.clear()
    real = batch["attention_mask"].bool()  # padded query rows: PSA gives zeros, flash garbage
    torch.testing.assert_close(_logits(model, batch)[real], ref[real], atol=ATOL, rtol=0)
    assert standin.calls == [] and psa_vlm.psa_stats(model)["layers"][0]["batch"] == 2  # PSA ran the prefill
    assert torch.equal(_generate(model, batch, n=3), ref_tokens)
    n_layers = model.config.text_config.num_hidden_layers
    assert len(standin.calls) == 2 * n_layers and all(c["impl"] == standin.name for c in standin.calls)
    psa_vlm.unpatch(model)
    assert model.config.text_config._attn_implementation == standin.name


def test_qwen3_vl_token_types_follow_the_video_span(tiny_family, tmp_path, monkeypatch):
    """Issue #13 item 2: Qwen3-VL's per-frame timestamps and markers are visual, not text.

    A 48-temporal-patch video (~1200 tokens, so that forced blocks are a small part of the quota): the text fraction PSA sees equals the prompt's text outside the video, and the
    quota-0.2 density stays near 0.2 (counting every non-placeholder token as text would force almost every
    KV block to full resolution).
    """
    from psa_vlm.video.synth import make_clip

    tiny = tiny_family("qwen3_vl")
    clip = tmp_path / "long.mp4"
    make_clip(clip, "needle_color", frames=96, width=128, height=128, fps=FPS, seed=1)
    inputs = _encode(tiny, str(clip), ["What colour is the square?"], min_pixels=128 * 128, max_pixels=128 * 128)
    ids = inputs["input_ids"]
    L = ids.shape[1]
    n_text = _outside_spans(tiny, ids)[0]
    n_pad = int((ids == tiny.model.config.video_token_id).sum())
    assert L > 1100 and L - n_text - n_pad > 48 * 4  # the processor wrote timestamps and markers per frame

    seen = []
    real = core.run_psa
    monkeypatch.setattr(core, "run_psa", lambda *a, **kw: (seen.append(kw["token_types"]), real(*a, **kw))[1])
    quota = PSAConfig.preset("quota-0.2", **SMALL)
    psa_vlm.patch(tiny.model, quota)
    try:
        _logits(tiny.model, inputs)
        density = psa_vlm.psa_stats(tiny.model)["density"]
        types = seen[0]
        assert int((types == 0).sum()) == n_text and (types == 0).float().mean() < 0.1
        assert density == pytest.approx(0.2, abs=0.06)
        # the trap: placeholders-only token types make the timestamps "text" and the density far higher
        state = _text_model(tiny.model)._psa_state
        monkeypatch.setattr(state, "ids", core.VisionIds(state.ids.placeholders))
        _logits(tiny.model, inputs)
        assert psa_vlm.psa_stats(tiny.model)["density"] > density + 0.3
    finally:
        psa_vlm.unpatch(tiny.model)
