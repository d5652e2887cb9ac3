"""Training the autoencoder (AutoencoderKL) whose latent space the diffusion model works in:
reconstruction plus a small KL pull of the posterior towards N(0, I), on both images of each
edit pair, in the same loop as the UNet (`ip2p_jax.train.loop.run`): sharded state, orbax
checkpoints with exact resume, SIGTERM save, NaN stop, TensorBoard, validation grids.

    ip2p train-vae --config configs/shapes_vae.py --workdir runs/shapes_vae

The result, `workdir/vae_model`, is our checkpoint folder with just `vae/`: point a UNet run's
`model.vae_from` at it.

The objective is LDM's autoencoder loss without the perceptual and adversarial terms,
divided by the pixel count so the loss reads as a mean absolute error:

    loss = reconstruction + kl_weight * kl / pixels_per_image
    reconstruction = mean |decode(z) - x|,  z ~ q(z | x), x in [-1, 1]
    kl = mean over images of 0.5 * sum over latent elements (mean^2 + var - 1 - logvar)

LDM minimises sum |decode(z) - x| + kl_weight * kl (sum over pixels, mean over images); this
is that divided by the pixels, so `kl_weight` keeps the meaning of LDM's configs (1e-6 in
kl-f8) at any resolution, while the loss, its gradient and `grad_clip` stay on the scale of
a per-pixel error.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from PIL import Image

from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.models.vae import DiagonalGaussian
from ip2p_jax.pipelines.images import decode_png, to_model_array, to_pil
from ip2p_jax.runtime.compilation import jit
from ip2p_jax.runtime.distributed import host_copy, is_primary
from ip2p_jax.runtime.profile import BackendProfile
from ip2p_jax.train import sharding
from ip2p_jax.train.config import DataConfig, OptimConfig, RuntimeConfig
from ip2p_jax.train.loop import (
    Task,
    run,
    save_grid,
    trained_component,
    trained_params,
    written_by_primary,
)
from ip2p_jax.train.models import hand_over_weights, keep_shapes_only
from ip2p_jax.train.optim import make_optimizer
from ip2p_jax.train.reporting import Reporter
from ip2p_jax.train.step import TrainState, apply_gradients, training_profile
from ip2p_jax.weights.model_folder import (
    LoadedComponent,
    init_component,
    load_component,
    resolve_model,
)


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """One VAE training run (`--config.a.b=value` overrides work as for TrainConfig)."""

    vae: dict | None = None  # diffusers AutoencoderKL config dict: random initial weights
    init_from: str = ""  # or a model folder (diffusers or ours) whose vae/ to start from
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch_size: int = 32  # edit pairs per step, global; the step trains on their 2x images
    steps: int = 3000
    kl_weight: float = 1e-6  # LDM's kl-f8 value; see the module docstring for the scale
    ema_decay: float = 0.0  # 0 disables; otherwise the exported weights are the EMA's
    fsdp: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0  # 0: no validation grids
    validation_images: int = 8  # validation pairs in the grid, one row each
    # Export with scaling_factor = 1 / std of the latents of the first 64 training pairs (as
    # LDM's scale_by_std): the diffusion model then sees unit-variance latents. False keeps
    # the `vae` dict's value.
    fit_scaling_factor: bool = True
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)  # as TrainConfig's


def kl_divergence(posterior: DiagonalGaussian) -> jax.Array:
    """KL(q || N(0, I)) per image, summed over the latent elements: LDM's
    DiagonalGaussianDistribution.kl(), 0.5 * sum(mean^2 + var - 1 - logvar)."""
    terms = jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


def vae_loss(
    module, params, images: jax.Array, key: jax.Array, kl_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, {reconstruction, kl}) of images [B, H, W, C] in [-1, 1]; see the module
    docstring. The decoder sees a posterior sample drawn with `key`."""
    variables = {"params": params}
    posterior = module.apply(variables, images, method=module.encode)
    decoded = module.apply(variables, posterior.sample(key), method=module.decode)
    reconstruction = jnp.mean(jnp.abs(decoded - images))
    kl = jnp.mean(kl_divergence(posterior))
    loss = reconstruction + kl_weight * kl / images[0].size
    return loss, {"reconstruction": reconstruction, "kl": kl}


def pair_images(batch: dict[str, jax.Array]) -> jax.Array:
    """Both images of every pair as one float batch in [-1, 1], each pair's two adjacent (so
    a device's rows of the pair batch stay on it): [2B, H, W, C]."""
    pairs = jnp.stack([batch["input_image"], batch["edited_image"]], axis=1)
    return pairs.reshape(-1, *pairs.shape[2:]).astype(jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass
class VAETrainer:
    """The compiled VAE step and what it closes over (loop.Stepper)."""

    config: VAETrainConfig
    vae: LoadedComponent
    mesh: Mesh
    optimizer: optax.GradientTransformation
    profile: BackendProfile  # the backend's choices, with the config's runtime overrides
    state_shardings: Any = None
    new_state_fn: Callable | None = None  # compiled once: its output layout is the state's
    step_fn: Callable | None = None
    autoencode_fn: Callable | None = None

    def _new_state(self, params) -> TrainState:
        ema = jax.tree.map(jnp.copy, params) if self.config.ema_decay else None
        key = jax.random.PRNGKey(self.config.seed)
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params), ema, key)

    def _placed_params(self):
        return sharding.param_shardings(self.vae.params, self.mesh)

    def abstract_state(self) -> TrainState:
        """The state's shapes and layout: the params (and, following them, the optimizer
        moments and the EMA) by the partition rules, the rest replicated."""
        if self.new_state_fn is None:
            inputs = jax.tree.map(
                lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                self.vae.params,
                self._placed_params(),
            )
            self.new_state_fn = jit(self._new_state, profile=self.profile).lower(inputs).compile()
            self.state_shardings = self.new_state_fn.output_shardings
        return jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            jax.eval_shape(self._new_state, self.vae.params),
            self.state_shardings,
        )

    def init_state(self) -> TrainState:
        """A fresh state; it takes the loaded weights over (the component keeps their shapes)."""
        self.abstract_state()
        return self.new_state_fn(hand_over_weights(self.vae, self._placed_params()))

    def release_loaded_weights(self) -> None:
        """After restoring a state: the loaded weights are not needed (their shapes are)."""
        keep_shapes_only(self.vae)

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        """One optimizer step on the pairs' images; returns the new state and scalar metrics:
        loss, reconstruction, kl, grad_norm, learning_rate."""
        if self.step_fn is None:
            self.abstract_state()
            self.step_fn = jit(
                functools.partial(_vae_step, self),
                profile=self.profile,
                in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=0,
            )
        return self.step_fn(state, batch)

    def autoencode(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images [B, H, W, C] in [-1, 1] -> (unscaled latent samples, reconstructions through
        the posterior mode), a training step's worth of images at a time."""
        if self.autoencode_fn is None:
            self.autoencode_fn = jit(
                functools.partial(_autoencode, self.vae.module), profile=self.profile
            )
        key = jax.random.key(self.config.seed)
        chunk = 2 * self.config.batch_size
        parts = [
            host_copy(self.autoencode_fn(params, images[i : i + chunk], key))
            for i in range(0, len(images), chunk)
        ]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))


def _autoencode(module, params, images, key):
    posterior = module.apply({"params": params}, images, method=module.encode)
    decoded = module.apply({"params": params}, posterior.mode(), method=module.decode)
    return posterior.sample(key), decoded


def _vae_step(trainer: VAETrainer, state: TrainState, batch: dict):
    config = trainer.config
    rng, key = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(
        functools.partial(vae_loss, trainer.vae.module, kl_weight=config.kl_weight), has_aux=True
    )
    (loss, parts), grads = grad_fn(state.params, pair_images(batch), key)
    new_state, metrics = apply_gradients(
        trainer.optimizer, config, state, grads, rng, trainer.profile
    )
    return new_state, {"loss": loss, **parts, **metrics}


def load_vae(config: VAETrainConfig, profile: BackendProfile | None = None) -> LoadedComponent:
    """The starting VAE: `init_from`'s vae/, or random weights from the `vae` dict; it runs as
    `profile` says (default: the running backend's)."""
    if config.init_from:
        return load_component(resolve_model(config.init_from), "vae", profile=profile)
    if not config.vae:
        raise ValueError("no VAE to train: set vae (a config dict) or init_from (a folder)")
    return init_component("vae", config.vae, config.seed, profile)


def make_vae_trainer(config: VAETrainConfig, mesh: Mesh) -> VAETrainer:
    devices = mesh.devices.size
    if config.batch_size % devices:
        raise ValueError(f"batch_size {config.batch_size} must divide over {devices} devices")
    if config.data.cache_latents:
        raise ValueError(
            "data.cache_latents=True: a VAE run trains the encoder, so it reads pixels; "
            "set --config.data.cache_latents=False"
        )
    if config.data.buckets:
        raise ValueError("data.buckets=True: a VAE run trains on squares; set it to False")
    profile = training_profile(config.runtime)
    optimizer = make_optimizer(config.optim, config.steps)
    return VAETrainer(config, load_vae(config, profile), mesh, optimizer, profile)


def split_images(data: DataConfig, split: str, pairs: int) -> np.ndarray:
    """Both images of a split's first `pairs` pairs (input, edited, input, ...) as a float
    batch in [-1, 1] at the training resolution."""
    source = EditPairSource(data.path, split)
    size = (data.resolution, data.resolution)
    return np.stack(
        [
            to_model_array(Image.fromarray(decode_png(source[i][name])), size)
            for i in range(min(pairs, len(source)))
            for name in ("input_image", "edited_image")
        ]
    )


def reconstruction_grid(
    trainer: VAETrainer, state: TrainState, workdir: Path, step: int, reporter: Reporter
) -> Path | None:
    """The first validation pairs through the autoencoder (posterior mode), one row each:
    input, its reconstruction, edited, its reconstruction. Saved as
    workdir/validation/step_N.png and to TensorBoard, with the mean absolute error as the
    scalar validation/reconstruction."""
    config = trainer.config
    params = host_copy(trained_params(state))  # every process gathers; process 0 draws
    if not is_primary():
        return None
    images = split_images(config.data, config.data.validation_split, config.validation_images)
    _, decoded = trainer.autoencode(params, images)
    reporter.scalars(step, {"validation/reconstruction": float(np.mean(np.abs(decoded - images)))})
    tiles = [
        np.concatenate([np.asarray(to_pil(x)), np.asarray(to_pil(y))], axis=1)
        for x, y in zip(images, decoded, strict=True)
    ]
    rows = [np.concatenate(tiles[i : i + 2], axis=1) for i in range(0, len(tiles), 2)]
    return save_grid(rows, workdir, step, reporter, "validation/input_reconstruction")


def latent_scale(trainer: VAETrainer, params) -> float:
    """1 / std of the latent samples of the first 64 training pairs' images: the
    scaling_factor that gives the diffusion model unit-variance latents."""
    data = trainer.config.data
    latents, _ = trainer.autoencode(params, split_images(data, data.train_split, 64))
    return float(1.0 / np.std(latents))


def export_vae(trainer: VAETrainer, state: TrainState, destination: Path) -> Path:
    """Our checkpoint folder holding the trained `vae/` (EMA weights if kept, scaling_factor
    fitted if `fit_scaling_factor`), for `load_component(folder, "vae")` and
    `model.vae_from`. write_checkpoint adds the bundled tokenizer and a default scheduler
    config, unused here."""
    from ip2p_jax.diffusion.schedules import NoiseSchedule
    from ip2p_jax.models.tokenizer import CLIPTokenizer
    from ip2p_jax.weights.model_folder import write_checkpoint

    gathered = trained_component(trainer.vae, trained_params(state))  # by every process

    def write() -> Path:
        vae = gathered
        if trainer.config.fit_scaling_factor:
            scale = latent_scale(trainer, vae.params)
            vae = dataclasses.replace(
                vae,
                config=dataclasses.replace(vae.config, scaling_factor=scale),
                raw_config={**vae.raw_config, "scaling_factor": scale},
            )
        return write_checkpoint(destination, {"vae": vae}, CLIPTokenizer.bundled(), NoiseSchedule())

    return written_by_primary(destination, write)


def vae_task(config: VAETrainConfig) -> Task:
    """The autoencoder run for `loop.run`: both images of each pair, exported to vae_model."""
    return Task(
        config,
        build=functools.partial(make_vae_trainer, config),
        validate=reconstruction_grid,
        export=export_vae,
        model_folder="vae_model",
        images_per_pair=2,
    )


def train_vae(
    config: VAETrainConfig, workdir: str | os.PathLike, *, resume: bool = False
) -> TrainState:
    """Trains the VAE to `config.steps`; returns the final state. See the module docstring."""
    return run(vae_task(config), workdir, resume=resume)
