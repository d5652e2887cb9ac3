"""A tiny text-to-image Stable Diffusion and a tiny CLIP, random weights, built once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """SD-1.x in miniature with a 4-channel UNet (text-to-image), diffusers layout."""
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    path = tmp_path_factory.mktemp("sd") / "model"
    return build_pipeline_folder(path, "tiny", overrides={"unet": {"in_channels": 4}})


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    from ip2p_jax.testing.reference_models import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def clip(clip_folder):
    from datagen.clip_filter import ClipSimilarity

    return ClipSimilarity(clip_folder)
