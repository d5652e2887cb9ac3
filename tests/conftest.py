"""Shared fixtures: random-weight model folders in the real diffusers layout, built once."""

from __future__ import annotations

import os

import pytest

# Keep XLA to the two CI cores' worth of threads and quiet; set before jax is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _build(factory: pytest.TempPathFactory, preset: str):
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    return build_pipeline_folder(factory.mktemp(preset) / "model", preset)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """SD-1.x-style IP2P pipeline in miniature (in_channels 8)."""
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory):
    """SD-2.x-style: linear projections, per-block heads, cross_attention_dim 48, gelu."""
    return _build(tmp_path_factory, "tiny-sd2")


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory):
    """The real SD-1.5 architecture with random weights, UNet in_channels 8 (about 4.3 GB)."""
    return _build(tmp_path_factory, "sd15")
