"""The VAE trainer on the micro shapes setup: the reconstruction falls (run through the CLI),
the KL and the loss are the documented formulas, a resumed run is exactly the straight run,
and the exported vae/ loads (what a UNet run's model.vae_from does)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from ip2p_jax.apps.cli.main import main
from ip2p_jax.models.vae import DiagonalGaussian
from ip2p_jax.train.config import load_config
from ip2p_jax.train.reporting import read_metrics
from ip2p_jax.train.vae import VAETrainConfig, kl_divergence, train_vae, vae_loss
from ip2p_jax.weights.model_folder import load_component
from tests.train.conftest import MICRO_VAE, micro_config, write_config_file

ROOT = Path(__file__).resolve().parents[2]
STEP_METRICS = ("loss", "reconstruction", "kl", "grad_norm", "learning_rate")


def micro_vae_config(data_path, **changes) -> VAETrainConfig:
    """The micro UNet setup's VAE, data, optimizer and cadence, as a VAE run."""
    unet = micro_config(data_path)
    names = ("data", "optim", "seed", "ema_decay", "log_every", "checkpoint_every", "steps")
    config = VAETrainConfig(
        vae=unet.model.vae,
        batch_size=4,
        validation_images=4,  # 8 images: the shape the export's latent scale compiles for
        **{name: getattr(unet, name) for name in names},
    )
    return dataclasses.replace(config, **changes)


def _step_rows(workdir) -> dict[int, dict]:
    """metrics.jsonl's training rows, without the timings (which differ run to run)."""
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    return {row["step"]: {k: row[k] for k in STEP_METRICS} for row in rows}


def test_reconstruction_falls_through_the_cli(shapes32, tmp_path):
    config_file = write_config_file(
        tmp_path / "micro_vae.py",
        "from tests.train.test_vae import micro_vae_config",
        f"micro_vae_config({str(shapes32)!r})",
    )
    workdir = tmp_path / "run"
    overrides = ["--config.steps=24", "--config.validate_every=24", "--config.checkpoint_every=24"]
    assert (
        main(["train-vae", "--config", str(config_file), "--workdir", str(workdir), *overrides])
        == 0
    )
    rows = _step_rows(workdir)
    assert sorted(rows) == list(range(1, 25))
    reconstruction = [rows[step]["reconstruction"] for step in sorted(rows)]
    first, last = np.mean(reconstruction[:3]), np.mean(reconstruction[-8:])
    assert last < 0.8 * first, reconstruction
    assert all(row["kl"] > 0 for row in rows.values())
    assert (workdir / "validation" / "step_0000024.png").is_file()
    validation = [row for row in read_metrics(workdir) if "validation/reconstruction" in row]
    assert [row["step"] for row in validation] == [24]
    vae = load_component(workdir / "vae_model", "vae")
    assert vae.config.block_out_channels == (16, 32)
    scale = vae.config.scaling_factor  # fitted: 1 / std of the latents
    assert np.isfinite(scale) and scale > 0 and scale != MICRO_VAE["scaling_factor"]


class _PixelVAE(nn.Module):
    """A per-pixel autoencoder with AutoencoderKL's interface: fast to run eagerly."""

    def setup(self):
        self.encoder = nn.Dense(8)
        self.decoder = nn.Dense(3)

    def encode(self, images):
        return DiagonalGaussian.from_moments(self.encoder(images))

    def decode(self, latents):
        return self.decoder(latents)

    def __call__(self, images):
        return self.decode(self.encode(images).mode())


def test_kl_and_loss_are_the_documented_formulas():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    logvar = rng.normal(scale=0.5, size=(3, 4, 4, 2)).astype(np.float32)
    expected = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    got = kl_divergence(DiagonalGaussian(mean, logvar))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)

    module = _PixelVAE()
    images = rng.uniform(-1, 1, size=(2, 8, 8, 3)).astype(np.float32)
    key = jax.random.key(1)
    params = module.init(key, images)["params"]
    loss, parts = vae_loss(module, params, images, key, kl_weight=0.5)
    posterior = module.apply({"params": params}, images, method=module.encode)
    decoded = module.apply({"params": params}, posterior.sample(key), method=module.decode)
    reconstruction = np.mean(np.abs(np.asarray(decoded) - images))
    mean, logvar = np.asarray(posterior.mean), np.asarray(posterior.logvar)
    kl = np.mean(0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(parts["reconstruction"]), reconstruction, rtol=1e-5)
    np.testing.assert_allclose(float(parts["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), reconstruction + 0.5 * kl / (8 * 8 * 3), rtol=1e-5)


def test_resume_is_exact_and_the_export_loads(shapes32, tmp_path):
    config = micro_vae_config(shapes32, fit_scaling_factor=False)
    straight = train_vae(config, tmp_path / "straight")
    train_vae(dataclasses.replace(config, steps=3), tmp_path / "resumed")
    resumed = train_vae(config, tmp_path / "resumed", resume=True)
    assert int(resumed.step) == 6
    assert _step_rows(tmp_path / "straight") == _step_rows(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    folder = tmp_path / "resumed" / "vae_model"
    vae = load_component(folder, "vae")
    exported, trained = jax.tree.leaves(vae.params), jax.tree.leaves(resumed.ema_params)
    assert len(exported) == len(trained)
    for a, b in zip(exported, trained, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert vae.config.scaling_factor == MICRO_VAE["scaling_factor"]  # not fitted here


def test_shapes_vae_config_is_shapes_tiny_vae():
    config = load_config(ROOT / "configs" / "shapes_vae.py", ["--config.steps=10"])
    tiny = load_config(ROOT / "configs" / "shapes_tiny.py")
    assert isinstance(config, VAETrainConfig) and config.steps == 10
    assert config.vae == tiny.model.vae
    assert config.data == dataclasses.replace(tiny.data, cache_latents=False)
    assert config.data.resolution == 64 and config.data.flip_prob == 0.0


def test_vae_run_refuses_a_latent_cache(shapes32, tmp_path):
    config = micro_vae_config(shapes32)
    cached = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_latents=True))
    with pytest.raises(ValueError, match="a VAE run trains the encoder"):
        train_vae(cached, tmp_path)
