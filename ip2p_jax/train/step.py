"""The train state and the jitted, sharded train step.

One call is one optimizer step on a global batch: the frozen VAE and the CLIP text encoder
(frozen, or trained with the UNet when the config says) encode it, the batch is split into
`grad_accum` micro-batches scanned for the mean gradient, then AdamW and the EMA update.
Every random draw comes from the state's key, so a resumed run repeats the same noise, and
the draws don't depend on how the batch is laid over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from ip2p_jax.models.unet import remat_policy
from ip2p_jax.models.vae import DiagonalGaussian
from ip2p_jax.runtime import memory
from ip2p_jax.runtime.compilation import jit
from ip2p_jax.runtime.distributed import host_copy
from ip2p_jax.runtime.profile import BackendProfile, current_profile
from ip2p_jax.train import sharding
from ip2p_jax.train.bucketing import check_bucketable
from ip2p_jax.train.conditioning import (
    TIME_IDS,
    batch_tokenizer,
    encode_text,
    is_sdxl,
    text_encoder_names,
    time_ids,
)
from ip2p_jax.train.config import IMAGE_CONDITIONS, RuntimeConfig, TrainConfig
from ip2p_jax.train.latent_cache import check_cacheable, encode_images
from ip2p_jax.train.lora import (
    component_targets,
    init_adapters,
    lora_scale,
    merge_adapters,
    target_paths,
)
from ip2p_jax.train.loss import diffusion_loss
from ip2p_jax.train.models import (
    ModelSet,
    hand_over_weights,
    keep_shapes_only,
    trained_names,
)
from ip2p_jax.train.optim import (
    ema_decay,
    learning_rate_schedule,
    make_optimizer,
    optimizer_update,
)
from ip2p_jax.weights.model_folder import LoadedComponent

# The compute dtypes a train step takes (float16 would need loss scaling).
TRAIN_COMPUTE_DTYPES = ("float32", "bfloat16")


@struct.dataclass
class TrainState:
    """Everything that changes during training (and goes into a checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    # {"unet": ..., ["text_encoder": ...]}: the trained weights (fp32 masters), or their LoRA
    # adapters (train.lora) in a LoRA run
    params: Any
    opt_state: Any
    ema_params: Any  # None when ema_decay == 0
    rng: jax.Array  # uint32[2] (raw key data, so checkpoints hold plain arrays)


@dataclasses.dataclass
class Trainer:
    """The compiled step and what it closes over, for one config, model set and mesh."""

    config: TrainConfig
    models: ModelSet
    mesh: Mesh
    optimizer: optax.GradientTransformation
    frozen: dict  # vae (and frozen text) params, null text or its ids, alphas_cumprod
    profile: BackendProfile  # the backend's choices, with the config's runtime overrides
    # A LoRA run's fresh adapters (host arrays), whose frozen base weights are frozen["base"]
    adapters: dict | None = None
    state_shardings: Any = None
    merge_fn: Callable | None = None
    step_fn: Callable | None = None

    def _fresh_state(self, params) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if self.config.ema_decay else None,
            rng=jax.random.PRNGKey(self.config.seed),
        )

    def _trained(self) -> dict[str, LoadedComponent]:
        return {name: getattr(self.models, name) for name in trained_names(self.config)}

    def _trained_trees(self) -> dict:
        """What a fresh state's params start from: the trained components' weights, or a LoRA
        run's fresh adapters."""
        if self.adapters is not None:
            return self.adapters
        return {name: component.params for name, component in self._trained().items()}

    def _param_shardings(self) -> dict:
        return {
            name: sharding.param_shardings(tree, self.mesh)
            for name, tree in self._trained_trees().items()
        }

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, without allocating it (for restoring a
        checkpoint): the optimizer moments inherit the params' layout, the rest replicated."""
        params = jax.tree.map(
            lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
            self._trained_trees(),
            self._param_shardings(),
        )
        make = jit(self._fresh_state, profile=self.profile)
        shapes = jax.eval_shape(make, params)
        layout = make.lower(params).compile().output_shardings
        self.state_shardings = layout
        return jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            shapes,
            layout,
        )

    def init_state(self) -> TrainState:
        """A fresh state, params and optimizer state laid out by the partition rules.

        The state takes the weights over: each trained component keeps only their shapes, so
        the host copy is freed (3.4 GB for SD-1.5's UNet, which on a CPU is the same memory
        the state lives in). Call it once per trainer; restoring uses :meth:`abstract_state`."""
        if self.state_shardings is None:
            self.abstract_state()
        shardings = self._param_shardings()
        if self.adapters is not None:  # the base weights stay with the models, frozen
            params = jax.device_put(self.adapters, shardings)
        else:
            params = {
                name: hand_over_weights(component, shardings[name])
                for name, component in self._trained().items()
            }
        return jit(self._fresh_state, profile=self.profile, out_shardings=self.state_shardings)(
            params
        )

    def release_loaded_weights(self) -> None:
        """After restoring a state: the loaded trained weights are dead weight (their shapes
        are what the trainer needs). A LoRA run's are its frozen base: they stay."""
        if self.adapters is None:
            for component in self._trained().values():
                keep_shapes_only(component)

    def model_weights(self, params: dict) -> dict:
        """The whole weights of the trained components for a state's ``params`` (see
        :func:`trained_weights`): the params themselves, or in a LoRA run the frozen base
        with the adapters merged (on the devices, laid out as the base)."""
        if self.adapters is None:
            return params
        if self.merge_fn is None:
            self.merge_fn = jit(
                lambda params, frozen: trained_weights(self, params, frozen), profile=self.profile
            )
        return self.merge_fn(params, {"base": self.frozen["base"]})

    def step_program(self) -> Callable:
        """The jitted step, ``(state, frozen, batch) -> (state, metrics)``, built on first use
        (``.lower(...)`` it with shapes to inspect the compiled program)."""
        if self.step_fn is None:
            if self.state_shardings is None:
                self.abstract_state()
            self.step_fn = jit(
                functools.partial(_train_step, self),
                profile=self.profile,
                in_shardings=(self.state_shardings, None, sharding.batch_sharding(self.mesh)),
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=0,
            )
        return self.step_fn

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        """One optimizer step; returns the new state and scalar metrics."""
        return self.step_program()(state, self.frozen, batch)


def training_profile(runtime: RuntimeConfig) -> BackendProfile:
    """The running backend's profile with a config's `runtime` overrides (runtime.profile)."""
    return current_profile(**dataclasses.asdict(runtime))


def profile_runtime(profile: BackendProfile) -> RuntimeConfig:
    """The `runtime` overrides under which a run on any backend trains as ``profile`` says
    (no XLA options: those are the running backend's): for lowering a step for another
    platform, e.g. a TPU's on this CPU."""
    return RuntimeConfig(
        compiler_options={},
        conv_patches_max_rows=profile.conv_patches_max_rows,
        optimizer_update=profile.optimizer_update,
        unroll_grad_accum=profile.unroll_grad_accum,
        attention_kernel=profile.attention_kernel,
    )


def _prepared_models(
    config: TrainConfig, models: ModelSet, mesh: Mesh
) -> tuple[ModelSet, BackendProfile]:
    """Checks the config (batch against the mesh, remat policy, compute dtype, runtime
    overrides) and runs the models as the backend profile says; returns them with the
    schedule the config trains and the profile."""
    devices = mesh.devices.size
    per_step = config.batch_size // config.grad_accum
    if config.batch_size % config.grad_accum or per_step % devices:
        raise ValueError(
            f"batch_size {config.batch_size} must split into grad_accum {config.grad_accum} "
            f"micro-batches that divide over {devices} devices"
        )
    remat_policy(config.remat)  # an unknown name fails here, naming the choices
    profile = training_profile(config.runtime)
    dtype = config.compute_dtype or profile.compute_dtype
    if dtype not in TRAIN_COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype={dtype!r}: a train step computes in one of {TRAIN_COMPUTE_DTYPES}"
        )
    if models.vae is None:
        raise ValueError("no VAE: set model.vae, model.vae_from or model.init_from")
    if config.image_condition not in IMAGE_CONDITIONS:
        raise ValueError(
            f"image_condition={config.image_condition!r}: choose one of {IMAGE_CONDITIONS}"
        )
    if is_sdxl(models) and "text_encoder" in trained_names(config):
        raise ValueError(
            "model.train_text_encoder and lora.text_encoder_targets train SD's one text "
            "encoder; SDXL's two stay frozen (as diffusers' train_instruct_pix2pix_sdxl.py)"
        )
    _check_lora(config)
    if config.data.cache_latents:
        check_cacheable(config.data)
    if config.data.buckets:
        check_bucketable(config, models)
    # The UNet and text encoder compute in the compute dtype on their float32 master weights;
    # the frozen VAE in float32. Kernel and conv lowering: the profile's, with the config's
    # overrides.
    models.unet.use_profile(profile, dtype)
    for name in text_encoder_names(models):
        getattr(models, name).use_profile(profile, dtype)
    models.vae.use_profile(profile, "float32")
    # The model predicts what the config trains it to, whatever the loaded scheduler said:
    # validation edits and the exported scheduler config must sample it that way.
    schedule = dataclasses.replace(models.schedule, prediction_type=config.prediction_type)
    return dataclasses.replace(models, schedule=schedule), profile


def make_trainer(config: TrainConfig, models: ModelSet, mesh: Mesh) -> Trainer:
    """Checks the config, runs the models as the backend profile says (see
    `_prepared_models`), encodes the null prompt, places the frozen params."""
    models, profile = _prepared_models(config, models, mesh)
    replicated = sharding.replicated(mesh)
    memory.move_to_devices(models.vae, replicated)  # in place: no host copy stays behind
    frozen = {
        "vae": models.vae.params,
        "alphas_cumprod": jax.device_put(models.schedule.alphas_cumprod(), replicated),
        **_frozen_conditioning(config, models, replicated),
    }
    if config.lora.rank:  # the adapted components' weights, frozen and laid out as trained ones
        frozen["base"] = {}
        for name in trained_names(config):
            component = getattr(models, name)
            memory.move_to_devices(component, sharding.param_shardings(component.params, mesh))
            frozen["base"][name] = component.params
    optimizer = make_optimizer(config.optim, config.steps)
    return Trainer(config, models, mesh, optimizer, frozen, profile, _lora_adapters(config, models))


def abstract_trainer(config: TrainConfig, models: ModelSet, mesh: Mesh) -> Trainer:
    """A trainer whose models' params are shapes only (``jax.ShapeDtypeStruct`` trees), as
    are its frozen inputs: for lowering and inspecting the step program of a model too large
    to hold, or for another platform (scripts/check_lowering.py). It cannot step."""
    models, profile = _prepared_models(config, models, mesh)
    alphas = models.schedule.alphas_cumprod()
    frozen = {
        "vae": models.vae.params,
        "alphas_cumprod": jax.ShapeDtypeStruct(alphas.shape, alphas.dtype),
        **_frozen_conditioning(config, models, None),
    }
    if config.lora.rank:
        frozen["base"] = {name: getattr(models, name).params for name in trained_names(config)}
    optimizer = make_optimizer(config.optim, config.steps)
    return Trainer(config, models, mesh, optimizer, frozen, profile, _lora_adapters(config, models))


def _check_lora(config: TrainConfig) -> None:
    lora = config.lora
    if lora.rank < 0 or (lora.rank and lora.alpha < 0):
        raise ValueError(f"lora.rank {lora.rank} and lora.alpha {lora.alpha} must be >= 0")
    if lora.rank and not component_targets(lora):
        raise ValueError(
            "lora.rank is set, and lora.targets and lora.text_encoder_targets are empty"
        )
    if lora.rank and config.model.train_text_encoder:
        raise ValueError(
            "lora.rank trains adapters on a frozen model, and model.train_text_encoder the "
            "whole text encoder: for text encoder adapters set lora.text_encoder_targets"
        )


def _lora_adapters(config: TrainConfig, models: ModelSet) -> dict | None:
    """A LoRA run's fresh adapters on its targets (train.lora), or None for a full run."""
    if not config.lora.rank:
        return None
    return {
        name: init_adapters(
            getattr(models, name).params,
            target_paths(getattr(models, name).params, targets, component=name),
            config.lora.rank,
            config.seed,
        )
        for name, targets in component_targets(config.lora).items()
    }


def trained_weights(trainer: Trainer, params: dict, frozen: dict) -> dict:
    """The whole weights the step's models run with: ``params``, or in a LoRA run the
    frozen base (``frozen["base"]``) with ``params``' adapters merged."""
    if trainer.adapters is None:
        return params
    scale = lora_scale(trainer.config.lora)
    return {
        name: merge_adapters(frozen["base"][name], adapters, scale)
        for name, adapters in params.items()
    }


def _frozen_conditioning(config: TrainConfig, models: ModelSet, replicated) -> dict:
    """The step's text inputs that don't change: the frozen text encoders' params (moved to
    `replicated` in place) with the encoding of "" (conditioning dropout's null text), or
    the ids of "" when the encoder is trained; SDXL's time ids. `replicated` None: shapes
    only (`abstract_trainer`)."""
    null_ids = jnp.asarray(batch_tokenizer(models)([""]))
    small = {"time_ids": jnp.asarray(time_ids(config.data.resolution))} if is_sdxl(models) else {}
    frozen = {}
    if "text_encoder" in trained_names(config):  # "" is encoded anew by each step's weights
        small["null_ids"] = null_ids
    else:
        names = text_encoder_names(models)
        params = {name: getattr(models, name).params for name in names}
        encode = lambda params: encode_text(models, params, null_ids)[0]  # noqa: E731
        if replicated is None:
            small["null_text"] = jax.eval_shape(encode, params)
        else:
            small["null_text"] = encode(params)
            for name in names:
                memory.move_to_devices(getattr(models, name), replicated)
        frozen["text"] = {name: getattr(models, name).params for name in names}
    if replicated is None:
        small = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small)
    else:
        small = jax.device_put(small, replicated)
    return {**frozen, **small}


def _text_states(trainer: Trainer, params: dict, frozen: dict, input_ids: jax.Array):
    """(text, pooled text or None, null_text): the UNet's text states of the batch (see
    train.conditioning), SDXL's pooled text, and the states of "" that conditioning dropout
    puts in. A trained encoder (whole weights in ``params``) is differentiated through; a
    frozen one is not, and its "" was encoded once."""
    models = trainer.models
    if "text_encoder" not in params:
        text, pooled = encode_text(models, frozen["text"], input_ids)
        return jax.lax.stop_gradient(text), jax.lax.stop_gradient(pooled), frozen["null_text"]
    trained = {"text_encoder": params["text_encoder"]}
    text, pooled = encode_text(models, trained, input_ids)
    return text, pooled, encode_text(models, trained, frozen["null_ids"])[0]


def _encode_images(trainer: Trainer, frozen: dict, batch: dict, key: jax.Array):
    """Frozen VAE: the target latents (a posterior sample, scaled) and the image-conditioning
    latents (posterior mode, unscaled), as the reference. A batch from a latent cache
    (train.latent_cache) brings the VAE's posterior moments instead of pixels."""
    models = trainer.models
    if "edited_moments" in batch:
        posterior = {
            name: DiagonalGaussian.from_moments(batch[f"{name}_moments"])
            for name in ("input", "edited")
        }
    else:
        posterior = {
            name: encode_images(models.vae.module, frozen["vae"], batch[f"{name}_image"])
            for name in ("input", "edited")
        }
    target = posterior["edited"].sample(key) * models.vae.config.scaling_factor
    if trainer.config.image_condition == "sample":
        image_latent = posterior["input"].sample(jax.random.fold_in(key, 1))
    else:
        image_latent = posterior["input"].mode()
    return jax.lax.stop_gradient(target), jax.lax.stop_gradient(image_latent)


def _micro_loss(trainer: Trainer, params, frozen: dict, micro: dict, key: jax.Array):
    config = trainer.config
    keys = jax.random.split(key, 4)
    weights = trained_weights(trainer, params, frozen)
    text, pooled, null_text = _text_states(trainer, weights, frozen, micro["input_ids"])
    latents, image_latent = _encode_images(trainer, frozen, micro, keys[0])
    batch = latents.shape[0]
    added = {}  # SDXL's added conditioning, which dropout leaves as it is
    if pooled is not None:
        added = {
            "text_embeds": pooled,
            "time_ids": jnp.broadcast_to(frozen["time_ids"], (batch, TIME_IDS)),
        }
    noise = jax.random.normal(keys[1], latents.shape, latents.dtype)
    timesteps = jax.random.randint(keys[2], (batch,), 0, frozen["alphas_cumprod"].shape[0])
    draw = jax.random.uniform(keys[3], (batch,))
    # Remat per block for training only: validation edits sample with the plain module. The
    # module computes in the compute dtype (its Execution) on the float32 master weights.
    unet = trainer.models.unet.module.clone(remat_policy=config.remat)

    def denoise(x, t, context):
        return unet.apply({"params": weights["unet"]}, x, t, context, **added)

    return diffusion_loss(
        denoise,
        latents=latents,
        image_latent=image_latent,
        text=text,
        null_text=null_text,
        noise=noise,
        timesteps=timesteps,
        dropout_draw=draw,
        rates=config.dropout,
        alphas_cumprod=frozen["alphas_cumprod"],
        prediction_type=config.prediction_type,
    )


def _train_step(trainer: Trainer, state: TrainState, frozen: dict, batch: dict):
    config = trainer.config
    rng, step_key = jax.random.split(state.rng)
    accum = config.grad_accum
    micro_batches = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
    micro_keys = jax.random.split(step_key, accum)
    grad_fn = jax.value_and_grad(lambda p, m, k: _micro_loss(trainer, p, frozen, m, k))

    def accumulate(carry, inputs):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(state.params, *inputs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    if accum == 1:
        loss, grads = grad_fn(
            state.params, jax.tree.map(lambda x: x[0], micro_batches), micro_keys[0]
        )
    else:
        # Unrolled where the profile says (the CPU, whose convolutions inside a while loop
        # run without their fast kernels; see runtime.profile).
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        unroll = accum if trainer.profile.unroll_grad_accum else 1
        (loss, grads), _ = jax.lax.scan(
            accumulate, (0.0, zeros), (micro_batches, micro_keys), unroll=unroll
        )
        loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    new_state, metrics = apply_gradients(
        trainer.optimizer, config, state, grads, rng, trainer.profile
    )
    return new_state, {"loss": loss, **metrics}


def apply_gradients(
    optimizer: optax.GradientTransformation,
    config,
    state: TrainState,
    grads,
    rng: jax.Array,
    profile: BackendProfile,
) -> tuple[TrainState, dict]:
    """The optimizer update and the EMA, shared by every trainer, in the profile's update
    style (leafwise or fused: the same numbers); `config` needs `optim`, `steps` and
    `ema_decay`. Returns the next state and grad_norm / learning_rate."""
    ema = state.ema_params
    params, opt_state, ema = optimizer_update(profile.optimizer_update)(
        optimizer,
        grads,
        state.opt_state,
        state.params,
        max_norm=config.optim.grad_clip,
        ema=ema,
        ema_decay_value=ema_decay(state.step, config.ema_decay) if ema is not None else None,
    )
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_schedule(config.optim, config.steps)(state.step),
    }
    return TrainState(state.step + 1, params, opt_state, ema, rng), metrics


def host_metrics(metrics: dict) -> dict[str, float]:
    """Device scalars -> python floats (one transfer; replicated, so read on every process)."""
    return {name: float(value) for name, value in host_copy(metrics).items()}


def is_finite(metrics: dict[str, float]) -> bool:
    return all(np.isfinite(value) for value in metrics.values())
