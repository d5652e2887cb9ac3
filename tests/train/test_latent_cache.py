"""Training from a latent cache is training from pixels: same losses, same example order (a
run can switch mid-way and resume), reused while valid, rebuilt when the VAE changes, and
refused with a clear error where it would drop augmentation or resizing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.train.latent_cache import LatentSplit, cached_latents
from ip2p_jax.train.loop import train
from ip2p_jax.train.models import load_models
from ip2p_jax.train.reporting import read_metrics
from tests.train.conftest import micro_config


def _cached(config):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, cache_latents=True))


def _losses(workdir) -> list[float]:
    return [row["loss"] for row in read_metrics(workdir)]


def test_cached_run_matches_the_pixel_run_and_resumes_across_the_switch(
    shapes32, six_step_run, tmp_path
):
    pixels = six_step_run[0]  # micro_config(shapes32) trained from pixels
    train(_cached(micro_config(shapes32)), tmp_path / "cached")
    # The VAE is encoded in another compiled program: equal to float32 rounding.
    np.testing.assert_allclose(_losses(tmp_path / "cached"), _losses(pixels), rtol=1e-4, atol=1e-6)
    assert (tmp_path / "cached/latents/train/input_moments.npy").is_file()

    train(micro_config(shapes32, steps=3), tmp_path / "switched")
    train(_cached(micro_config(shapes32)), tmp_path / "switched", resume=True)
    np.testing.assert_allclose(
        _losses(tmp_path / "switched"), _losses(pixels), rtol=1e-4, atol=1e-6
    )


def test_cache_is_reused_while_valid_and_rebuilt_for_another_vae(shapes32, tmp_path):
    source = EditPairSource(shapes32, "train")
    vae = load_models(micro_config(shapes32).model, seed=0).vae
    messages: list[str] = []
    first = cached_latents(source, vae, tmp_path, resolution=32, report=messages.append)
    assert isinstance(first, LatentSplit) and len(first) == len(source) == 256
    example = first[5]
    assert example["input_moments"].shape == (16, 16, 8)  # mean and logvar of 4 channels
    assert example["instruction"] == source[5]["instruction"]
    assert repr(first) == repr(source)
    written = (tmp_path / "input_moments.npy").stat().st_mtime_ns

    cached_latents(source, vae, tmp_path, resolution=32, report=messages.append)
    assert (tmp_path / "input_moments.npy").stat().st_mtime_ns == written
    assert len(messages) == 1  # only the first encoding spoke

    other_vae = load_models(micro_config(shapes32).model, seed=1).vae
    rebuilt = cached_latents(source, other_vae, tmp_path, resolution=32, report=messages.append)
    assert "vae_fingerprint" in messages[1]
    assert not np.array_equal(rebuilt[5]["input_moments"], example["input_moments"])


def test_cache_refuses_augmentation_before_anything_compiles(shapes32, tmp_path):
    config = _cached(micro_config(shapes32))
    flipping = dataclasses.replace(config, data=dataclasses.replace(config.data, flip_prob=0.5))
    with pytest.raises(ValueError, match=r"data\.flip_prob=0\.5"):
        train(flipping, tmp_path / "flip")
    resizing = dataclasses.replace(config, data=dataclasses.replace(config.data, max_resize=40))
    with pytest.raises(ValueError, match=r"data\.max_resize=40"):
        train(resizing, tmp_path / "resize")


def test_cache_refuses_images_of_another_size(shapes32, tmp_path):
    source = EditPairSource(shapes32, "train")
    vae = load_models(micro_config(shapes32).model).vae
    with pytest.raises(ValueError, match="data.resolution 16 needs 16x16 images"):
        cached_latents(source, vae, tmp_path / "cache", resolution=16, report=lambda _: None)
    assert not (tmp_path / "cache").exists()  # nothing half-written
