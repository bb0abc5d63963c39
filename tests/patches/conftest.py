"""Session fixtures for the patch tests: a synthetic clip and each family's tiny model, built once per run."""

from __future__ import annotations

from typing import Dict

import pytest

from tiny_families import FPS, FRAMES, HEIGHT, WIDTH, Tiny, load_tiny


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    """A synthetic clip (moving shapes), 12 frames of 224 x 112 at 4 fps."""
    from psa_vlm.video.synth import make_clip

    path = tmp_path_factory.mktemp("psa-family-video") / "clip.mp4"
    make_clip(path, "needle_color", frames=FRAMES, width=WIDTH, height=HEIGHT, fps=FPS, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_family(request, tiny_family_checkpoint):
    """``tiny_family(name) -> Tiny``: the family's tiny checkpoint (``tests/conftest.py``, built by
    ``psa_vlm.models.tiny.build_tiny_checkpoint`` at most once per run) loaded once per session."""
    cache: Dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in cache:
            cache[family] = load_tiny(family, tiny_family_checkpoint(family))
        return cache[family]

    return get
