"""Train the tiny Qwen2.5-VL on the synthetic video QA so that it actually answers.

A random-weight tiny checkpoint answers nonsense; this script trains a slightly larger tiny model (3.27 M
parameters: text hidden 256, 4 layers, 4 query / 2 KV heads of head_dim 64, mRoPE sections (8, 12, 12); a
2-block vision tower of width 96) on the multiple-choice questions of ``psa_vlm.video.synth`` (needle colour,
needle shape, event order, flash count) with the loss on the answer tokens (the letter and ``<|im_end|>``).

The shipped checkpoint (``psa_vlm/data/tiny_trained``, its ``TRAINING.md`` has the details) came from two
runs on one H200 (755 s in all)::

    python3 -m psa_vlm.models.train_tiny --out STAGE1 --steps 1000000 --time-budget 470 --lr 5e-4 \
        --kinds needle_color needle_shape count
    python3 -m psa_vlm.models.train_tiny --out DIR --steps 1000000 --time-budget 285 --init STAGE1 \
        --base STAGE1 --lr 2e-4 --hint 0.3 --short-until 0.15 --ramp-end 0.5

Held out, under dense attention, it answers needle colour 100%, flash count 91-100%, needle shape and event
order 38-69% (chance 25%) on clips of 256 to 3072 video tokens. What made it learn (the earlier runs stayed
at chance): every answer word is one token of the tiny tokenizer (``tiny.BUILDER_VERSION`` 2; "cyan" used to
be three tokens, so the option lines needed one more hop), a learning rate of 5e-4 instead of 2e-3 (2e-3 does
not even learn the text-only hinted questions), plus the text-hint curriculum (``--hint``; on in every run
since, not ablated at 5e-4).
``benchmarks/train_tiny_gpu.sh`` trains several settings side by side on one GPU.

Auxiliary targets (training only, the heads are not saved; ``--aux-weight``, off after ``--aux-until``): the
colour / shape class of every video token from the vision merger output and from a middle layer, and for
each option line of a question whether it is the right one and which letter it carries.

Everything the model sees during training is built exactly as the inference path builds it
(``psa_vlm.inference.prepare_inputs``: qwen-vl-utils + decord + the processor with ``video_metadata``),
without mp4 files, so that it also runs where PyAV, decord and qwen-vl-utils are missing:

* frames: ``synth.plan_clip`` plans each item; the frames at qwen-vl-utils' sampled indices
  (``linspace(0, F - 1, n).round()``) are rendered directly on the training device (a vectorised copy of
  ``synth.render_frames``, checked against it at start-up; ``--render synth`` uses ``synth.render_frames``
  itself), then passed through an emulation of the mp4 round trip (yuv420p chroma subsampling and a little
  noise);
* pixels: rescale + normalise + the processor's patch layout (checked against the checkpoint's
  ``Qwen2VLVideoProcessor`` at start-up);
* text: the processor's chat template with the video placeholder expanded to the video token count, the
  answer appended after the generation prompt;
* positions: the 3-D mRoPE positions are computed here and passed to the model: transformers 5.2x quantises
  ``t * tokens_per_second * second_per_grid_t`` (as the original Qwen2.5-VL code does), transformers <= 5.17
  truncates ``second_per_grid_t`` to an integer first. A fraction (``--legacy-rope``) of the batches use the
  old rule so that the model answers under both; ``second_per_grid_ts`` is ``2 / sampled_fps`` with
  ``sampled_fps = n / F * fps``, as the processor derives it from the metadata.

Clips stay at <= 384 video tokens until ``--short-until`` and grow to ``--max-tokens`` (default 3072) by
``--ramp-end`` (tokens = frames / 2 * (H / 28) * (W / 28)); all clips of a batch share one geometry and go
through the vision tower as one concatenated video (identical features, no per-video Python loops). Training seeds are drawn from ``[10**6, 2**31)``; seeds
below ``10**6`` (the bundled clip, the lmms-eval datasets, the held-out sets here) are never trained on.

Usage (on a GPU; ``--time-budget`` drives the schedule, ``--steps`` is a cap)::

    python3 -m psa_vlm.models.train_tiny --out /tmp/tiny_trained --steps 100000 --time-budget 300

    # accuracy through mp4 + qwen-vl-utils + processor(video_metadata=...) + generate, on the CPU
    python3 -m psa_vlm.models.train_tiny --normal-path-eval /tmp/tiny_trained \
        --sets bundled_32f_112x112 2k_64f_224x224 --eval-items 16

The output directory is a normal checkpoint (``save_pretrained`` of the model in bfloat16 and of the
processor) plus ``training.json`` (settings, loss curve, held-out accuracy per kind and clip length) and the
``psa_vlm_tiny.json`` marker with ``"trained": true``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "trained_config_kwargs",
    "Geometry",
    "TRAIN_GEOMETRIES",
    "EVAL_SETS",
    "sample_indices",
    "second_per_grid",
    "mrope_positions",
    "render_clips",
    "emulate_mp4",
    "patchify",
    "BatchBuilder",
    "train",
    "evaluate",
    "main",
]

logger = logging.getLogger(__name__)

#: Seeds below this are held out (bundled clip, lmms-eval datasets, evaluation sets here).
HELD_OUT_SEEDS = 10**6
#: Base seed of the held-out evaluation items of this script.
EVAL_SEED_BASE = 700_000

#: Frame sizes trained on (height, width), all multiples of 28 so that no resize happens anywhere.
TRAIN_GEOMETRIES: Tuple[Tuple[int, int], ...] = (
    (112, 112), (112, 168), (168, 168), (168, 224), (224, 168), (224, 224), (112, 224),
)
#: Clip lengths (frames in the file) and frame rates trained on.
TRAIN_FRAMES: Tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
TRAIN_FPS: Tuple[float, ...] = (2.0, 4.0, 8.0)

#: Held-out evaluation sets: name -> clip (frames, fps, height, width) and sampled frames.
EVAL_SETS: Dict[str, Dict[str, Any]] = {
    # the bundled default clip's geometry (256 video tokens)
    "bundled_32f_112x112": dict(frames=32, fps=8.0, height=112, width=112, nframes=32),
    # lmms-eval psa_synth_short (384 video tokens)
    "short_16f_224x168": dict(frames=16, fps=4.0, height=168, width=224, nframes=16),
    # 2048 video tokens
    "2k_64f_224x224": dict(frames=64, fps=8.0, height=224, width=224, nframes=64),
    # lmms-eval psa_synth_long, every frame (3072 video tokens)
    "long_128f_224x168": dict(frames=128, fps=8.0, height=168, width=224, nframes=128),
    # psa_synth_long as `psa-vlm run` samples it (64 of 128 frames, 1536 video tokens)
    "long_128f_sampled64": dict(frames=128, fps=8.0, height=168, width=224, nframes=64),
}

_LETTERS = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------- config
def trained_config_kwargs(vocab_size: int, token_ids: Dict[str, int]) -> Dict[str, Any]:
    """``Qwen2_5_VLConfig`` kwargs of the trained tiny model: ``tiny.tiny_config_kwargs`` made larger.

    Text: hidden 256, 4 layers, 4 query / 2 KV heads (GQA), head_dim 64, mRoPE sections (8, 12, 12).
    Vision: 2 blocks of width 96 (3 heads), both full attention (per frame pair), real patch geometry.
    """
    from .tiny import tiny_config_kwargs

    kw = copy.deepcopy(tiny_config_kwargs(vocab_size, token_ids))
    text = kw["text_config"]
    text.update(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[8, 12, 12])
    assert sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"] // 2
    vision = kw["vision_config"]
    vision.update(
        depth=2,
        hidden_size=96,
        intermediate_size=192,
        num_heads=3,
        fullatt_block_indexes=[0, 1],
        out_hidden_size=text["hidden_size"],
    )
    return kw


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """One clip shape: ``frames`` in the file at ``fps``, ``nframes`` of them sampled, ``height x width``."""

    frames: int
    fps: float
    height: int
    width: int
    nframes: int

    @property
    def grid(self) -> Tuple[int, int, int]:
        """``video_grid_thw``: (temporal patches, patch rows, patch columns)."""
        return self.nframes // 2, self.height // 14, self.width // 14

    @property
    def tokens(self) -> int:
        """Video tokens in the language model."""
        t, h, w = self.grid
        return t * (h // 2) * (w // 2)


def sample_indices(frames: int, nframes: int) -> List[int]:
    """Frame indices qwen-vl-utils' decord reader takes: ``linspace(0, frames - 1, nframes).round()``."""
    return torch.linspace(0, frames - 1, nframes).round().long().tolist()


def second_per_grid(geom: Geometry) -> float:
    """``second_per_grid_ts`` the processor derives from the metadata (temporal patch 2 / sampled fps)."""
    sampled_fps = geom.nframes / geom.frames * geom.fps  # VideoMetadata.sampled_fps
    return 2 / sampled_fps


def mrope_positions(
    n_before: int, grid_thw: Sequence[int], n_after: int, spg: float, *, tokens_per_second: int,
    merge: int = 2, legacy: bool = False,
) -> torch.Tensor:
    """3-D mRoPE positions ``[3, n_before + video + n_after]`` of one ``text, video, text`` sequence.

    ``legacy=False`` is transformers >= 5.2x (``long(t * tokens_per_second * spg)``); ``legacy=True`` is
    transformers <= 5.17 (``t * tokens_per_second * int(spg)``). Text after the video continues at
    ``n_before + max(h, w) / merge`` in both.
    """
    gt, gh, gw = (int(x) for x in grid_thw)
    lt, lh, lw = gt, gh // merge, gw // merge
    before = torch.arange(n_before).view(1, -1).expand(3, -1)
    spg_t = torch.tensor([spg], dtype=torch.float32)[0]  # the processor's float32 tensor element
    if legacy:
        t = torch.arange(lt) * (tokens_per_second * int(spg_t))
    else:
        t = (torch.arange(lt) * (tokens_per_second * spg_t)).long()
    h = torch.arange(lh) + n_before
    w = torch.arange(lw) + n_before
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    vision = torch.stack([tt + n_before, hh, ww], dim=0).reshape(3, -1)
    start = n_before + max(lh, lw)
    after = (torch.arange(n_after) + start).view(1, -1).expand(3, -1)
    return torch.cat([before, vision, after], dim=1)


# ---------------------------------------------------------------------------------------------- frames
_MASK_CACHE: Dict[Tuple[str, int, str], torch.Tensor] = {}


def _mask(shape: str, size: int, device: torch.device) -> torch.Tensor:
    from ..video import synth

    key = (shape, size, str(device))
    if key not in _MASK_CACHE:
        _MASK_CACHE[key] = torch.from_numpy(synth._shape_mask(shape, size)).to(device)
    return _MASK_CACHE[key]


def _backgrounds(items: Sequence[Any], idx: Sequence[int], height: int, width: int, device: torch.device) -> torch.Tensor:
    """Grey backgrounds ``[B, T, H, W]`` (float32, already truncated to integers) of synth's clips."""
    n_t = len(idx)
    y = torch.from_numpy(np.linspace(0.0, 1.0, height, dtype=np.float32)).to(device).view(1, 1, height, 1)
    x = torch.from_numpy(np.linspace(0.0, 1.0, width, dtype=np.float32)).to(device).view(1, 1, 1, width)
    u = np.array([[t / max(it.frames - 1, 1) for t in idx] for it in items], dtype=np.float64)  # [B, T]
    phase = np.array([(it.seed % 97) / 97.0 for it in items], dtype=np.float64)[:, None]
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device).view(len(items), n_t, 1, 1)
    half_u = f32(0.5 * u)
    ph = f32(np.broadcast_to(phase, u.shape))
    img = 55.0 + 40.0 * y + 15.0 * torch.sin(2 * math.pi * (x + half_u + ph))
    bar_y = f32(((u * 1.7 + phase) % 1.0) * height)
    img = img + 45.0 * torch.exp(-(((y * height) - bar_y) ** 2) / (2 * (0.04 * height) ** 2))
    r = 0.08 * min(width, height)
    bx = f32(r + np.abs(((u * 2.3 + phase) % 2.0) - 1.0) * (width - 2 * r))
    by = f32(r + np.abs(((u * 1.3 + 0.5 * phase) % 2.0) - 1.0) * (height - 2 * r))
    yy = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xx = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)
    ball = (yy - by) ** 2 + (xx - bx) ** 2 <= r * r
    img = torch.where(ball, torch.full_like(img, 175.0), img)
    return img.clamp(0, 255).floor()


def render_clips(items: Sequence[Any], idx: Sequence[int], device: torch.device, backend: str = "torch",
                 label_maps: bool = False) -> Any:
    """Frames ``idx`` of each planned ``VideoQA`` as float RGB ``[B, T, H, W, 3]`` in 0..255 (integers).

    ``backend="torch"`` renders on ``device`` (vectorised copy of ``synth.render_frames``);
    ``backend="synth"`` calls ``synth.render_frames`` on the CPU. With ``label_maps`` also returns per-pixel
    colour and shape class maps ``[B, T, H, W]`` (0: background, else 1 + index in ``synth.COLORS`` /
    ``synth.SHAPES``) for the auxiliary training targets.
    """
    from ..video import synth

    h, w = items[0].height, items[0].width
    idx_t = torch.as_tensor(list(idx))
    if backend == "synth":
        out = []
        for it in items:
            frames = list(synth.render_frames(it))
            out.append(np.stack([frames[i] for i in idx]))
        img = torch.from_numpy(np.stack(out)).to(device=device, dtype=torch.float32)
    else:
        grey = _backgrounds(items, idx, h, w, device)
        img = grey.unsqueeze(-1).repeat(1, 1, 1, 1, 3)
    if label_maps:
        cmap = torch.zeros(img.shape[:4], dtype=torch.uint8, device=device)
        smap = torch.zeros(img.shape[:4], dtype=torch.uint8, device=device)
    colors = list(synth.COLORS)
    for b, it in enumerate(items):
        for e in it.events:
            sel = ((idx_t >= e.start) & (idx_t < e.end)).nonzero().flatten()
            if sel.numel() == 0:
                continue
            sel = sel.to(device)
            top, left, size = e.box
            m = _mask(e.shape, size, device)
            if backend != "synth":
                color = torch.tensor(synth.COLORS[e.color], dtype=torch.float32, device=device)
                region = img[b, sel, top:top + size, left:left + size]  # copy [t, s, s, 3]
                region[:, m] = color
                img[b, sel, top:top + size, left:left + size] = region
            if label_maps:
                for lab, val in ((cmap, 1 + colors.index(e.color)), (smap, 1 + synth.SHAPES.index(e.shape))):
                    region = lab[b, sel, top:top + size, left:left + size]
                    region[:, m] = val
                    lab[b, sel, top:top + size, left:left + size] = region
    if label_maps:
        return img, cmap, smap
    return img


def token_labels(cmap: torch.Tensor, smap: torch.Tensor, min_frac: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per video token (2 frames x 28 x 28 px) colour / shape class ``[B, tokens]`` from pixel class maps.

    A token is labelled with the event it shows when the event covers at least ``min_frac`` of its pixels,
    background (0) when none does, and ignored (-100) in between. Token order: (t, h, w) row-major, the order
    of the video tokens in the language model's sequence.
    """
    bsz = cmap.shape[0]
    anym = (cmap > 0).float().unsqueeze(1)
    frac = F.avg_pool3d(anym, (2, 28, 28))
    out = []
    for m in (cmap, smap):
        cls = F.max_pool3d(m.float().unsqueeze(1), (2, 28, 28))
        cls = torch.where(frac >= min_frac, cls, torch.zeros_like(cls))
        cls = torch.where((frac > 0) & (frac < min_frac), torch.full_like(cls, -100), cls)
        out.append(cls.reshape(bsz, -1).long())
    return out[0], out[1]


def emulate_mp4(frames: torch.Tensor, generator: Optional[torch.Generator] = None, noise: float = 1.5) -> torch.Tensor:
    """Approximate an H.264 yuv420p round trip of float RGB frames ``[..., H, W, 3]`` (0..255).

    BT.601 limited-range YCbCr, 2x2-averaged chroma (nearest upsampling back), integer rounding at each
    step, plus Gaussian noise of a random strength up to ``noise`` per clip (first dimension).
    """
    shape = frames.shape
    x = frames.reshape(-1, shape[-3], shape[-2], 3)
    r, g, b = x.unbind(-1)
    y = (16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255).round()
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    c = F.avg_pool2d(torch.stack([cb, cr], 1), 2).round()
    c = F.interpolate(c, scale_factor=2, mode="nearest") - 128
    cb, cr = c[:, 0], c[:, 1]
    yl = (y - 16) * (255 / 219)
    k = 255 / 224
    out = torch.stack([yl + 1.402 * k * cr, yl - 0.344136 * k * cb - 0.714136 * k * cr, yl + 1.772 * k * cb], -1)
    out = out.reshape(shape)
    if noise > 0:
        sigma = torch.rand((shape[0],) + (1,) * (len(shape) - 1), device=frames.device, generator=generator) * noise
        out = out + sigma * torch.randn(shape, device=frames.device, generator=generator)
    return out.round().clamp(0, 255)


def patchify(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float], rescale: float,
             patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Float RGB ``[B, T, H, W, 3]`` (0..255) -> ``pixel_values_videos`` ``[B * T/2 * H/14 * W/14, 1176]``.

    The processor's fused rescale + normalise and its patch order (temporal patch, merge blocks, then the
    channel x temporal x 14 x 14 patch vector).
    """
    bsz, t, h, w, c = frames.shape
    x = frames.permute(0, 1, 4, 2, 3).float()  # B, T, C, H, W
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 1, 3, 1, 1) / rescale
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 1, 3, 1, 1) / rescale
    x = (x - m) / s
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.reshape(bsz, gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(bsz * gt * gh * gw, c * temporal * patch * patch)


# ---------------------------------------------------------------------------------------------- batches
class BatchBuilder:
    """Builds model inputs for planned synth items of one ``Geometry``, as the inference path would.

    Args:
        processor: The checkpoint's ``Qwen2_5_VLProcessor`` (tokenizer, chat template, video processor).
        tokens_per_second: The vision config's ``tokens_per_second``.
    """

    def __init__(self, processor: Any, tokens_per_second: int) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.tps = int(tokens_per_second)
        vp = processor.video_processor
        self.mean, self.std = list(vp.image_mean), list(vp.image_std)
        self.rescale = float(vp.rescale_factor)
        self.video_id = self.tok.convert_tokens_to_ids("<|video_pad|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tok.convert_tokens_to_ids("<|endoftext|>")
        self._cache: Dict[str, Tuple[List[int], List[int]]] = {}

    def prompt_ids(self, prompt: str) -> Tuple[List[int], List[int]]:
        """Token ids before and after the ``<|video_pad|>`` placeholder of the chat for ``prompt``."""
        before, after, _ = self._prompt(prompt)
        return before, after

    def option_ends(self, prompt: str) -> List[int]:
        """Indices (in the ids after the video placeholder) of the last token of each ``"X. text"`` option
        line of ``prompt`` (A-D order; empty when the prompt has no options)."""
        return self._prompt(prompt)[2]

    def _prompt(self, prompt: str) -> Tuple[List[int], List[int], List[int]]:
        if prompt not in self._cache:
            messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                     {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            before, after = text.split("<|video_pad|>")
            enc = self.tok(after, return_offsets_mapping=True)
            ends: List[int] = []
            for letter in _LETTERS:
                start = after.find(f"\n{letter}. ")
                if start < 0:
                    ends = []
                    break
                stop = after.find("\n", start + 1)
                last = (stop if stop >= 0 else len(after)) - 1  # last character of the option text
                tok_idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= last < b]
                if not tok_idx:
                    ends = []
                    break
                ends.append(tok_idx[0])
            self._cache[prompt] = (self.tok(before)["input_ids"], enc["input_ids"], ends)
            if len(self._cache) > 50_000:
                self._cache.clear()
        return self._cache[prompt]

    def answer_ids(self, answer: str) -> List[int]:
        return self.tok(answer)["input_ids"] + [self.im_end]

    def text_batch(self, prompts: Sequence[str], answers: Sequence[str], geom: Geometry, legacy: bool
                   ) -> Dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` ``[3, B, L]``, ``labels`` (right-padded), and
        ``option_pos`` / ``option_correct`` ``[B, 4]``: positions of the option lines' last tokens and whether
        each is the right answer (-1 / -100 for items without options)."""
        n_vid = geom.tokens
        spg = second_per_grid(geom)
        rows, pos, labels = [], [], []
        opt_pos = torch.full((len(prompts), 4), -1, dtype=torch.long)
        opt_ok = torch.full((len(prompts), 4), -100, dtype=torch.long)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            before, after = self.prompt_ids(prompt)
            ends = self.option_ends(prompt)
            if len(ends) == 4 and answer in _LETTERS:
                opt_pos[i] = torch.tensor(ends) + len(before) + n_vid
                opt_ok[i] = torch.tensor([int(letter == answer) for letter in _LETTERS])
            ans = self.answer_ids(answer)
            ids = before + [self.video_id] * n_vid + after + ans
            rows.append(ids)
            pos.append(mrope_positions(len(before), geom.grid, len(after) + len(ans), spg,
                                       tokens_per_second=self.tps, legacy=legacy))
            labels.append([-100] * (len(ids) - len(ans)) + ans)
        length = max(len(r) for r in rows)
        bsz = len(rows)
        input_ids = torch.full((bsz, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, length), dtype=torch.long)
        position_ids = torch.zeros((3, bsz, length), dtype=torch.long)
        lab = torch.full((bsz, length), -100, dtype=torch.long)
        for i, (r, p, l) in enumerate(zip(rows, pos, labels)):
            n = len(r)
            input_ids[i, :n] = torch.tensor(r)
            mask[i, :n] = 1
            position_ids[:, i, :n] = p
            lab[i, :n] = torch.tensor(l)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": lab,
                "option_pos": opt_pos, "option_correct": opt_ok}

    def pixels(self, items: Sequence[Any], geom: Geometry, device: torch.device, *, render: str = "torch",
               mp4: bool = True, noise: float = 1.5, generator: Optional[torch.Generator] = None,
               labels: bool = False, concat: bool = True) -> Dict[str, torch.Tensor]:
        """``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` of the items (on ``device``),
        plus ``token_color`` / ``token_shape`` (``token_labels``) with ``labels``.

        With ``concat`` the batch's videos go to the vision tower as one video of ``B * T/2`` temporal patches
        (``video_grid_thw`` has one row): every vision block attends within one temporal patch and the
        positions are per frame, so the features are the same as for ``B`` separate videos, without the
        tower's per-video Python loops. Only valid with explicit ``position_ids`` (as here)."""
        idx = sample_indices(geom.frames, geom.nframes)
        out: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            frames = render_clips(items, idx, device, backend=render, label_maps=labels)
            if labels:
                frames, cmap, smap = frames
                out["token_color"], out["token_shape"] = token_labels(cmap, smap)
                del cmap, smap
            if mp4:
                frames = emulate_mp4(frames, generator=generator, noise=noise)
            out["pixel_values_videos"] = patchify(frames, self.mean, self.std, self.rescale)
        t, h, w = geom.grid
        grids = [[t * len(items), h, w]] if concat else [[t, h, w]] * len(items)
        out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long, device=device)
        out["second_per_grid_ts"] = torch.tensor([second_per_grid(geom)] * len(grids), dtype=torch.float32,
                                                 device=device)
        return out


def event_frames_at(frames: int, stretch: float) -> int:
    """Event length for the event-length curriculum: synth's default stretched towards the longest that
    still fits two events and a gap (``stretch`` 1: the longest, 0: the default)."""
    from ..video import synth

    default = synth.default_event_frames(frames)
    longest = max(default, (frames - 2) // 3)
    return int(round(default + (longest - default) * min(1.0, max(0.0, stretch))))


def hint_text(item: Any) -> str:
    """A sentence stating what the video shows (``"The square is cyan."``): the text-hint curriculum.

    Training only: an item with a hint can be answered from the text alone, which teaches the option
    matching and letter copying while the video features are still weak; held-out items never get one.
    """
    e = item.events
    if item.kind == "needle_color":
        return f"The square is {e[0].color}."
    if item.kind == "needle_shape":
        return f"The shape is a {e[0].shape}."
    if item.kind == "order":
        return f"First the {e[0].color} {e[0].shape}, then the {e[1].color} {e[1].shape}."
    return f"It appears {len(e)} times."


def plan_items(kinds: Sequence[str], geom: Geometry, seeds: Sequence[int], open_question: Sequence[bool] = (),
               stretch: float = 0.0, hint: Sequence[bool] = ()) -> Tuple[List[Any], List[str], List[str]]:
    """Plan synth items; return ``(items, prompts, answers)`` (letter answers, or the answer text for
    open questions). ``stretch`` > 0 lengthens the events (``event_frames_at``), a training curriculum;
    ``hint[i]`` puts ``hint_text`` before item ``i``'s question (another one)."""
    from ..video import synth

    ev = event_frames_at(geom.frames, stretch) if stretch > 0 else None
    items, prompts, answers = [], [], []
    for i, (kind, seed) in enumerate(zip(kinds, seeds)):
        it = synth.plan_clip(kind, frames=geom.frames, width=geom.width, height=geom.height, fps=geom.fps,
                             seed=int(seed), event_frames=ev)
        items.append(it)
        prefix = hint_text(it) + "\n" if i < len(hint) and hint[i] else ""
        if i < len(open_question) and open_question[i]:
            prompts.append(prefix + it.question + "\nAnswer with a word or a short phrase.")
            answers.append(it.answer_text)
        else:
            prompts.append(prefix + it.prompt())
            answers.append(it.answer)
    return items, prompts, answers


# ---------------------------------------------------------------------------------------------- model
def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Vision attention over equal-length chunks in one SDPA call (training speed; same maths).

    Every block is full attention over one temporal patch of one video, and all videos of a training batch
    share a geometry, so the chunks have the length stored in ``self._chunk``.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    chunk = getattr(self, "_chunk", None)
    if not chunk:
        return self._orig_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    n = seq // chunk
    q, k, v = (t.reshape(n, chunk, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    out = out.transpose(1, 2).reshape(seq, -1)
    return self.proj(out)


def _install_fast_vision_attention(model: Any) -> List[Any]:
    import types

    mods = []
    for blk in model.model.visual.blocks:
        attn = blk.attn
        attn._orig_forward = attn.forward
        attn.forward = types.MethodType(_vision_attention_forward, attn)
        attn._chunk = None
        mods.append(attn)
    return mods


def _remove_fast_vision_attention(mods: List[Any]) -> None:
    for attn in mods:
        attn.forward = attn._orig_forward
        for name in ("_orig_forward", "_chunk"):
            if name in attn.__dict__:
                delattr(attn, name)


def _set_chunk(mods: List[Any], geom: Optional[Geometry]) -> None:
    chunk = None if geom is None else (geom.height // 14) * (geom.width // 14)
    for attn in mods:
        attn._chunk = chunk


def _answer_logits(model: Any, text: Dict[str, torch.Tensor], pix: Dict[str, torch.Tensor],
                   keep: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict the labelled tokens, and those labels (the last hidden states
    go to ``keep["hidden"]`` when a dict is given)."""
    out = model.model(
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        position_ids=text["position_ids"],
        pixel_values_videos=pix["pixel_values_videos"],
        video_grid_thw=pix["video_grid_thw"],
        second_per_grid_ts=pix["second_per_grid_ts"],
        use_cache=False,
        output_hidden_states=keep is not None,
    )
    hidden = out.last_hidden_state
    if keep is not None:
        keep["hidden"] = hidden
        keep["hidden_states"] = out.hidden_states
    labels = text["labels"]
    tgt = labels[:, 1:]
    sel = tgt != -100
    h = hidden[:, :-1][sel]
    return model.lm_head(h).float(), tgt[sel]


def _rms(x: torch.Tensor) -> torch.Tensor:
    """RMS-normalised features for the auxiliary heads (scale-free targets)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def _first_answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Index (in the flattened selected targets) of each row's first labelled token."""
    counts = (labels[:, 1:] != -100).sum(1)
    return torch.cumsum(counts, 0) - counts


# ---------------------------------------------------------------------------------------------- schedule
def _pick_geometry(rng: random.Random, progress: float, max_tokens: int, short_until: float = 0.3,
                   ramp_end: float = 0.7) -> Geometry:
    """Curriculum: clips of at most 384 video tokens until ``short_until``, the cap rising to ``max_tokens``
    by ``ramp_end``; afterwards half of the batches are long (>= 1536 tokens)."""
    lo_cap = min(384, max_tokens)
    ramp = max(1e-9, ramp_end - short_until)
    cap = lo_cap if progress < short_until else int(
        lo_cap + (max_tokens - lo_cap) * min(1.0, (progress - short_until) / ramp))
    want_long = progress >= ramp_end and rng.random() < 0.5
    for _ in range(200):
        h, w = rng.choice(TRAIN_GEOMETRIES)
        frames = rng.choice(TRAIN_FRAMES)
        fps = rng.choice(TRAIN_FPS)
        if rng.random() < 0.6:
            n = frames
        else:
            n = rng.randrange(16, frames + 1, 2)
        n = min(n, 256)
        g = Geometry(frames, fps, h, w, n)
        if g.tokens > cap or (want_long and g.tokens < min(1536, cap)):
            continue
        return g
    return Geometry(16, 8.0, 112, 112, 16)  # the shortest clip (128 tokens)


def _lr_at(progress: float, peak: float, warmup: float = 0.04, floor: float = 0.05) -> float:
    if progress < warmup:
        return peak * progress / warmup
    q = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q)))


# ---------------------------------------------------------------------------------------------- checks
def check_against_processor(builder: BatchBuilder, device: torch.device) -> Dict[str, Any]:
    """Compare this module's inputs with the processor's on one clip (rendered with synth, no mp4).

    Returns a dict of max differences / equalities (recorded in ``training.json``).
    """
    from ..video import synth

    geom = Geometry(frames=24, fps=8.0, height=112, width=168, nframes=16)
    items, prompts, answers = plan_items(["order"], geom, [123])
    _STATE["check_text"] = (prompts, answers)
    idx = sample_indices(geom.frames, geom.nframes)
    frames = np.stack([f for i, f in enumerate(synth.render_frames(items[0])) if i in set(idx)])
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # what qwen-vl-utils hands over (T, C, H, W)
    messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                             {"type": "text", "text": prompts[0]}]}]
    text = builder.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    meta = {"fps": geom.fps, "frames_indices": idx, "total_num_frames": geom.frames, "video_backend": "decord"}
    result: Dict[str, Any] = {}
    try:
        ref = builder.processor(
            text=[text], videos=[video], video_metadata=[meta], do_sample_frames=False, padding=True,
            return_tensors="pt",
            videos_kwargs={"size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 360 * 420}},
        )
    except Exception as exc:  # informative only: a transformers version that refuses these kwargs
        return {"error": f"{type(exc).__name__}: {exc}"}
    mine_t = builder.text_batch(prompts, answers, geom, legacy=False)
    n = ref["input_ids"].shape[1]
    result["input_ids_equal"] = bool(torch.equal(mine_t["input_ids"][0, :n], ref["input_ids"][0]))
    pv = patchify(torch.from_numpy(frames).float().unsqueeze(0), builder.mean, builder.std, builder.rescale)
    result["pixel_max_abs_diff"] = float((pv - ref["pixel_values_videos"]).abs().max())
    result["grid_equal"] = ref["video_grid_thw"].tolist() == [list(geom.grid)]
    result["second_per_grid_ts"] = [float(ref["second_per_grid_ts"][0]), second_per_grid(geom)]
    # positions: against the installed transformers' own rope index
    try:
        result["rope_matches_installed_transformers"] = _installed_rope_matches(builder, ref, geom, n)
    except Exception as exc:  # pragma: no cover - informative
        result["rope_error"] = f"{type(exc).__name__}: {exc}"
    return result


def _installed_rope_matches(builder: BatchBuilder, ref: Any, geom: Geometry, n: int) -> Dict[str, Any]:
    """Do this module's modern / legacy positions equal the installed transformers' ``get_rope_index``?"""
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    stub = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)  # get_rope_index only needs .config
    stub.__dict__["config"] = _STATE["config"]
    kwargs = dict(video_grid_thw=ref["video_grid_thw"], second_per_grid_ts=ref["second_per_grid_ts"],
                  attention_mask=ref["attention_mask"])
    if "mm_token_type_ids" in ref:
        kwargs["mm_token_type_ids"] = ref["mm_token_type_ids"]
    pos, _ = Qwen2_5_VLModel.get_rope_index(stub, ref["input_ids"], **kwargs)
    out: Dict[str, Any] = {"transformers": transformers.__version__}
    for name, flag in (("modern", False), ("legacy", True)):
        t = builder.text_batch(*_STATE["check_text"], geom, legacy=flag)
        out[name] = bool(torch.equal(t["position_ids"][:, 0, :n], pos[:, 0, :n]))
    return out


def check_renderer(device: torch.device) -> Dict[str, float]:
    """Fraction of pixels where the torch renderer differs from ``synth.render_frames`` (and the max)."""

    worst, frac = 0.0, 0.0
    for kind, seed, (h, w), frames in (("order", 5, (112, 168), 24), ("count", 9, (224, 224), 64),
                                       ("needle_shape", 3, (168, 224), 48)):
        geom = Geometry(frames, 8.0, h, w, frames)
        items, _, _ = plan_items([kind], geom, [seed])
        idx = list(range(frames))
        a = render_clips(items, idx, device, "torch").cpu()
        b = render_clips(items, idx, torch.device("cpu"), "synth")
        d = (a - b).abs()
        worst = max(worst, float(d.max()))
        frac = max(frac, float((d > 1).float().mean()))
    return {"max_abs_diff": worst, "frac_off_by_more_than_1": frac}


_STATE: Dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: Any, builder: BatchBuilder, device: torch.device, *, items_per_kind: int = 32,
             sets: Optional[Sequence[str]] = None, legacy: bool = False, batch: int = 16, render: str = "torch",
             autocast: bool = False) -> Dict[str, Any]:
    """Held-out accuracy (greedy first answer token == the right letter) per evaluation set and kind.

    Items use seeds ``EVAL_SEED_BASE + 1000 * set_index + i`` (never trained on), rendered like training
    frames (mp4 emulation with light, fixed-seed noise).
    """
    from ..video import synth

    model.eval()
    mods = _STATE.get("vision_mods") or []
    results: Dict[str, Any] = {}
    letter_ids = {builder.tok(l)["input_ids"][0]: l for l in _LETTERS}
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    for si, name in enumerate(sets or list(EVAL_SETS)):
        spec = EVAL_SETS[name]
        geom = Geometry(spec["frames"], spec["fps"], spec["height"], spec["width"], spec["nframes"])
        per_kind: Dict[str, float] = {}
        for ki, kind in enumerate(synth.KINDS):
            seeds = [EVAL_SEED_BASE + 1000 * si + 100 * ki + i for i in range(items_per_kind)]
            correct = 0
            for start in range(0, len(seeds), batch):
                chunk = seeds[start:start + batch]
                items, prompts, answers = plan_items([kind] * len(chunk), geom, chunk)
                text = {k: v.to(device) for k, v in builder.text_batch(prompts, answers, geom, legacy).items()}
                pix = builder.pixels(items, geom, device, render=render, mp4=True, noise=0.5, generator=gen)
                _set_chunk(mods, geom)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits, tgt = _answer_logits(model, text, pix)
                first = _first_answer_positions(text["labels"])
                pred = logits[first].argmax(-1)
                correct += int((pred == tgt[first]).sum())
            per_kind[kind] = correct / len(seeds)
        results[name] = {"tokens": geom.tokens, "per_kind": per_kind,
                         "overall": sum(per_kind.values()) / len(per_kind)}
    _set_chunk(mods, None)
    del letter_ids
    return results


def evaluate_normal_path(checkpoint: Path, *, sets: Sequence[str], items_per_kind: int, workdir: Path,
                         max_new_tokens: int = 4, seed_base: int = EVAL_SEED_BASE + 50_000) -> Dict[str, Any]:
    """Accuracy through the inference path: ``synth.make_clip`` writes an mp4, ``inference.prepare_inputs``
    decodes it with qwen-vl-utils + decord and runs the processor with ``video_metadata``, and
    ``model.generate`` answers (dense SDPA attention); the first A-D letter of the answer is scored.

    Needs PyAV, decord and qwen-vl-utils. Seeds ``seed_base + 1000 * set + 100 * kind + i`` (held out).
    """
    import re

    from ..inference import load_qwen25vl, prepare_inputs, video_messages
    from ..video import synth

    model, processor = load_qwen25vl(checkpoint, device="cpu", dtype=torch.float32)
    workdir.mkdir(parents=True, exist_ok=True)
    letter = re.compile(r"\b([A-D])\b")
    results: Dict[str, Any] = {}
    for si, name in enumerate(sets):
        spec = EVAL_SETS[name]
        per_kind: Dict[str, float] = {}
        answers: List[Dict[str, Any]] = []
        tokens = None
        for ki, kind in enumerate(synth.KINDS):
            correct = 0
            for i in range(items_per_kind):
                seed = seed_base + 1000 * si + 100 * ki + i
                path = workdir / f"{name}-{kind}-{seed}.mp4"
                item = synth.make_clip(path, kind, frames=spec["frames"], width=spec["width"],
                                       height=spec["height"], fps=spec["fps"], seed=seed)
                inputs = prepare_inputs(processor, video_messages(path, item.prompt(), nframes=spec["nframes"]))
                tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
                with torch.inference_mode():
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
                m = letter.search(text)
                ok = bool(m) and m.group(1) == item.answer
                correct += int(ok)
                answers.append({"kind": kind, "seed": seed, "answer": item.answer, "output": text.strip()})
                path.unlink()
            per_kind[kind] = correct / items_per_kind
            logger.info("normal path %s %s: %.3f", name, kind, per_kind[kind])
        results[name] = {"tokens": tokens, "per_kind": per_kind, "overall": sum(per_kind.values()) / len(per_kind),
                         "items_per_kind": items_per_kind, "outputs": answers}
    return results


# ---------------------------------------------------------------------------------------------- training
def _load_base(base: Optional[Path]) -> Tuple[Any, Path]:
    """The processor (from ``base`` or a fresh ``tiny.build_tiny_checkpoint``) and the directory it came from."""
    from transformers import AutoProcessor

    from .tiny import build_tiny_checkpoint

    if base is not None:
        try:
            return AutoProcessor.from_pretrained(base), base
        except Exception as exc:  # noqa: BLE001 - fall back to building it here
            logger.warning("cannot load the processor in %s (%s); building the tiny one", base, exc)
    tmp = Path(tempfile.mkdtemp(prefix="psa-tiny-base-"))
    path = build_tiny_checkpoint(tmp / "tiny")
    return AutoProcessor.from_pretrained(path), path


def build_model(processor: Any, seed: int = 0, layers: int = 4) -> Any:
    """A fresh ``Qwen2_5_VLForConditionalGeneration`` with ``trained_config_kwargs`` for this tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .tiny import generation_config, token_ids_and_vocab

    token_ids, vocab_size = token_ids_and_vocab(processor.tokenizer)
    kw = trained_config_kwargs(vocab_size, token_ids)
    kw["text_config"]["num_hidden_layers"] = int(layers)
    config = Qwen2_5_VLConfig(**kw)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = generation_config(token_ids)
    return model


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training described by the command-line ``args``; write the checkpoint to ``args.out``."""
    import transformers

    from ..video import synth

    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_amp = device.type == "cuda" and not args.fp32
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    processor, base_dir = _load_base(args.base)
    if args.init is not None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
        logger.info("initialised from %s", args.init)
    else:
        model = build_model(processor, seed=args.seed, layers=args.layers)
    _STATE["config"] = model.config
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2f M parameters (transformers %s, torch %s, %s)", n_params / 1e6,
                transformers.__version__, torch.__version__, device)
    builder = BatchBuilder(processor, model.config.vision_config.tokens_per_second)
    model.to(device)

    checks: Dict[str, Any] = {}
    if not args.skip_checks:
        checks["processor"] = check_against_processor(builder, torch.device("cpu"))
        checks["renderer"] = check_renderer(device)
        logger.info("checks: %s", json.dumps(checks))
        if args.render == "torch" and checks["renderer"]["frac_off_by_more_than_1"] > 0.01:
            logger.warning("torch renderer differs from synth.render_frames; rendering with synth instead")
            args.render = "synth"

    mods = _install_fast_vision_attention(model)
    _STATE["vision_mods"] = mods
    # auxiliary per-video-token heads (colour, shape) on the vision merger output and on the last hidden
    # states: dense targets that make the needles' features explicit early; not part of the checkpoint
    hidden = model.config.text_config.hidden_size
    n_col, n_shp = 1 + len(synth.COLORS), 1 + len(synth.SHAPES)
    aux = torch.nn.ModuleDict({"vis": torch.nn.Linear(hidden, n_col + n_shp),
                               "txt": torch.nn.Linear(hidden, n_col + n_shp),
                               "opt": torch.nn.Linear(hidden, 2 + 4)}).to(device)
    n_layers = model.config.text_config.num_hidden_layers
    txt_layer = min(n_layers, max(1, n_layers // 2))  # video-token targets after this layer
    opt_layer = max(1, n_layers - 1)  # option-line targets one layer before the last
    captured: Dict[str, Any] = {}

    def _grab_merger(_mod, _inp, out):
        captured["vis"] = getattr(out, "pooler_output", out)

    hook = model.model.visual.register_forward_hook(_grab_merger)
    cls_w = torch.ones(n_col, device=device)
    cls_w[0] = 0.2
    shp_w = torch.ones(n_shp, device=device)
    shp_w[0] = 0.2
    params = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)

    kinds = list(args.kinds or synth.KINDS)
    curve: List[Dict[str, Any]] = []
    loss_acc, first_acc, n_acc, tok_acc, aux_acc, aux_n, letter_acc, letter_n = 0.0, 0.0, 0, 0, 0.0, 0, 0.0, 0
    hint_hits, hint_n = 0.0, 0
    skipped = 0
    step = 0
    t_train = time.perf_counter()
    progress = 0.0
    model.train()
    while True:
        elapsed = time.perf_counter() - t_train
        progress = step / args.steps
        if args.time_budget:
            progress = max(progress, elapsed / args.time_budget)
        if progress >= 1.0:
            break
        geom = _pick_geometry(rng, progress, args.max_tokens, args.short_until, args.ramp_end)
        bsz = max(args.min_batch, min(args.max_batch, round(args.tokens_per_batch / geom.tokens)))
        batch_kinds = [rng.choice(kinds) for _ in range(bsz)]
        seeds = [rng.randrange(HELD_OUT_SEEDS, 2**31 - 1) for _ in range(bsz)]
        open_q = [rng.random() < args.open_questions for _ in range(bsz)]
        hint_p = args.hint * max(0.0, 1.0 - progress / args.hint_until) if args.hint_until > 0 else 0.0
        hints = [rng.random() < hint_p for _ in range(bsz)]
        legacy = rng.random() < args.legacy_rope
        # event-length curriculum: long events (many needle tokens) first, synth's default by --stretch-until
        stretch = max(0.0, 1.0 - progress / args.stretch_until) if args.stretch_until > 0 else 0.0
        if stretch > 0 and rng.random() < 0.25:
            stretch = 0.0  # keep some default-length events throughout
        items, prompts, answers = plan_items(batch_kinds, geom, seeds, open_q, stretch=stretch, hint=hints)
        text = {k: v.to(device, non_blocking=True) for k, v in builder.text_batch(prompts, answers, geom, legacy).items()}
        use_aux = args.aux_weight > 0 and progress < args.aux_until
        pix = builder.pixels(items, geom, device, render=args.render, mp4=True, noise=1.5, generator=gen,
                             labels=use_aux)
        _set_chunk(mods, geom)
        lr = _lr_at(progress, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        keep: Dict[str, Any] = {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, tgt = _answer_logits(model, text, pix, keep)
            if use_aux:
                hs = keep["hidden_states"]
                vid = text["input_ids"] == builder.video_id
                feats = {"vis": captured["vis"], "txt": hs[txt_layer][vid]}
                aux_out = {k: aux[k](_rms(v)).float() for k, v in feats.items()}
                has_opt = text["option_pos"][:, 0] >= 0
                if bool(has_opt.any()):
                    rows_o = has_opt.nonzero().flatten()
                    pos_o = text["option_pos"][rows_o]  # [n, 4]
                    h_opt = hs[opt_layer][rows_o.unsqueeze(1).expand_as(pos_o), pos_o]  # [n, 4, hidden]
                    opt_out = aux["opt"](_rms(h_opt)).float()
                    opt_tgt = text["option_correct"][rows_o]
        loss = F.cross_entropy(logits, tgt)
        aux_loss = None
        if use_aux:
            tc, ts = pix["token_color"].reshape(-1), pix["token_shape"].reshape(-1)
            aux_loss = sum(F.cross_entropy(o[:, :n_col], tc, weight=cls_w, ignore_index=-100)
                           + F.cross_entropy(o[:, n_col:], ts, weight=shp_w, ignore_index=-100)
                           for o in aux_out.values()) / 4
            if bool(has_opt.any()):
                # is this option line the right one (1 of 4), and which letter is it
                opt_w = torch.tensor([1.0, 3.0], device=device)
                letter_tgt = torch.arange(4, device=device).expand_as(opt_tgt)
                aux_loss = aux_loss + F.cross_entropy(opt_out[..., :2].reshape(-1, 2), opt_tgt.reshape(-1),
                                                      weight=opt_w)
                aux_loss = aux_loss + 0.5 * F.cross_entropy(opt_out[..., 2:].reshape(-1, 4), letter_tgt.reshape(-1))
            loss_total = loss + args.aux_weight * aux_loss
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        if torch.isfinite(gnorm):
            opt.step()
        else:
            skipped += 1
        with torch.no_grad():
            first = _first_answer_positions(text["labels"])
            mc = torch.tensor([not o for o in open_q], device=device)
            hit = (logits[first].argmax(-1) == tgt[first]) & mc
            if bool(mc.any()):
                letter_acc += F.cross_entropy(logits[first][mc], tgt[first][mc])
                letter_n += 1
            loss_acc += loss.detach()
            hinted = torch.tensor(hints, device=device)
            first_acc += (hit & ~hinted).sum()
            hint_hits += (hit & hinted).sum()
            hint_n += int((mc & hinted).sum())
            if aux_loss is not None:
                aux_acc += aux_loss.detach()
                aux_n += 1
            n_acc += sum((not o) and (not h) for o, h in zip(open_q, hints))
        tok_acc += geom.tokens * bsz
        step += 1
        if step % args.log_every == 0:
            loss_v = float(loss_acc) / args.log_every
            acc_v = float(first_acc) / max(1, n_acc)
            el = time.perf_counter() - t_train
            letter_v = float(letter_acc) / max(1, letter_n)
            aux_v = float(aux_acc) / aux_n if aux_n else None
            hint_v = float(hint_hits) / hint_n if hint_n else None
            curve.append({"step": step, "time_s": round(el, 1), "progress": round(progress, 3), "lr": lr,
                          "loss": round(loss_v, 4), "letter_loss": round(letter_v, 4),
                          "aux_loss": None if aux_v is None else round(aux_v, 4), "train_mc_acc": round(acc_v, 3),
                          "train_hinted_acc": None if hint_v is None else round(hint_v, 3),
                          "video_tokens_per_s": round(tok_acc / max(el, 1e-9)), "skipped_steps": skipped})
            logger.info("step %d  %.0fs  p=%.2f  loss %.4f  letter loss %.4f  aux %s  mc acc %.3f  hinted %s  "
                        "(last geom %s, %d tok x %d)", step, el, progress, loss_v, letter_v,
                        "-" if aux_v is None else f"{aux_v:.4f}", acc_v, "-" if hint_v is None else f"{hint_v:.3f}",
                        (geom.frames, geom.nframes, geom.height, geom.width), geom.tokens, bsz)
            loss_acc, first_acc, n_acc, aux_acc, aux_n, letter_acc, letter_n = 0.0, 0.0, 0, 0.0, 0, 0.0, 0
            hint_hits, hint_n = 0.0, 0
    train_s = time.perf_counter() - t_train
    hook.remove()
    logger.info("trained %d steps in %.1f s", step, train_s)

    t_eval = time.perf_counter()
    eval_kw = dict(items_per_kind=args.eval_items, render=args.render, autocast=use_amp,
                   batch=max(4, min(32, args.tokens_per_batch // 3072)))
    sets = args.sets or list(EVAL_SETS)
    held_out = evaluate(model, builder, device, sets=sets, **eval_kw)
    legacy_sets = [s for s in ("bundled_32f_112x112", "long_128f_224x168") if s in sets]
    held_out_legacy = evaluate(model, builder, device, sets=legacy_sets, legacy=True, **eval_kw)
    eval_s = time.perf_counter() - t_eval
    for name, r in held_out.items():
        logger.info("held-out %-22s %5d tokens  overall %.3f  %s", name, r["tokens"], r["overall"],
                    " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items()))

    _remove_fast_vision_attention(mods)
    meta = {
        "command": "python3 -m psa_vlm.models.train_tiny " + " ".join(args.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": n_params,
        "steps": step,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
        "checks": checks,
        "chance": 0.25,
        "held_out": held_out,
        "held_out_legacy_rope": held_out_legacy,
        "eval_protocol": ("greedy first answer token vs the right letter; frames rendered in memory with an mp4 "
                          f"emulation; {args.eval_items} items per kind and set; seeds from {EVAL_SEED_BASE}"),
    }
    save_checkpoint(model, processor, args.out, meta)
    return meta


def save_checkpoint(model: Any, processor: Any, out: Path, meta: Dict[str, Any]) -> Path:
    """``save_pretrained`` model (bfloat16 safetensors) and processor into ``out``, plus ``training.json`` and
    the ``psa_vlm_tiny.json`` marker (``"trained": true``)."""
    import transformers

    from .tiny import MARKER_FILE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=torch.bfloat16).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    marker = {"builder": "psa_vlm.models.train_tiny", "trained": True, "parameters": meta.get("parameters"),
              "steps": meta.get("steps"), "transformers": transformers.__version__}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m psa_vlm.models.train_tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output checkpoint directory (required for training)")
    p.add_argument("--steps", type=int, default=3000, help="maximum optimiser steps (default 3000)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="training seconds; the schedule follows max(step/steps, time/budget)")
    p.add_argument("--base", type=Path, default=None,
                   help="directory with the tiny processor files (default: build with psa_vlm.models.tiny)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4; 2e-3 fails to learn)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--tokens-per-batch", type=int, default=32768, help="video tokens per batch (default 32768)")
    p.add_argument("--min-batch", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=3072, help="longest clip in video tokens (default 3072)")
    p.add_argument("--open-questions", type=float, default=0.3,
                   help="fraction of items asked without choices (answer text as target)")
    p.add_argument("--legacy-rope", type=float, default=0.25,
                   help="fraction of batches with transformers<=5.17 temporal positions")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights")
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the auxiliary per-video-token colour/shape loss (0: off)")
    p.add_argument("--aux-until", type=float, default=0.8, help="progress after which the auxiliary loss is off")
    p.add_argument("--stretch-until", type=float, default=0.5,
                   help="progress by which the event-length curriculum reaches synth's default (0: off)")
    p.add_argument("--hint", type=float, default=0.5,
                   help="fraction of items with a text hint stating the answer at the start (curriculum; 0: off)")
    p.add_argument("--hint-until", type=float, default=0.5,
                   help="progress by which the hint fraction decays linearly to 0")
    p.add_argument("--layers", type=int, default=4, help="language model layers (default 4)")
    p.add_argument("--short-until", type=float, default=0.3, help="progress until which clips stay <= 384 tokens")
    p.add_argument("--ramp-end", type=float, default=0.7, help="progress at which clips reach --max-tokens")
    p.add_argument("--kinds", nargs="+", default=None, help="question kinds to train on (default: all)")
    p.add_argument("--render", choices=("torch", "synth"), default="torch")
    p.add_argument("--eval-items", type=int, default=32, help="held-out items per kind and set")
    p.add_argument("--device", default=None)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--normal-path-eval", type=Path, default=None, metavar="CHECKPOINT",
                   help="no training: evaluate CHECKPOINT through mp4 + qwen-vl-utils + processor + generate")
    p.add_argument("--sets", nargs="+", default=None, help=f"evaluation sets (from {', '.join(EVAL_SETS)})")
    p.add_argument("--json", type=Path, default=None, help="write the --normal-path-eval results here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.normal_path_eval is not None:
        with tempfile.TemporaryDirectory(prefix="psa-tiny-eval-") as tmp:
            res = evaluate_normal_path(args.normal_path_eval, sets=args.sets or ["bundled_32f_112x112"],
                                       items_per_kind=args.eval_items, workdir=Path(tmp))
        if args.json is not None:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: {"tokens": v["tokens"], "overall": round(v["overall"], 3),
                              **{kk: round(vv, 3) for kk, vv in v["per_kind"].items()}} for k, v in res.items()},
                         indent=1))
        return 0
    if args.out is None:
        _parser().error("--out is required for training")
    meta = train(args)
    summary = {k: {"tokens": v["tokens"], "overall": round(v["overall"], 3),
                   **{kk: round(vv, 3) for kk, vv in v["per_kind"].items()}} for k, v in meta["held_out"].items()}
    print(json.dumps({"steps": meta["steps"], "train_seconds": meta["train_seconds"], "final_loss": meta["final_loss"],
                      "held_out": summary}, indent=1))
    print(f"checkpoint written to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
