"""The forward process as diffusers' DDPM-family schedulers define it: noising clean latents
to timestep t, and what the model is trained to predict there. Pure functions of
``alphas_cumprod`` (NoiseSchedule.alphas_cumprod()), shared by the training loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_noise(
    alphas_cumprod: jax.Array, latents: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """sqrt(a_t) x + sqrt(1 - a_t) noise, diffusers' DDPMScheduler.add_noise."""
    alpha = alphas_cumprod[timesteps][:, None, None, None]
    return jnp.sqrt(alpha) * latents + jnp.sqrt(1 - alpha) * noise


def regression_target(
    prediction_type: str,
    alphas_cumprod: jax.Array,
    latents: jax.Array,
    noise: jax.Array,
    timesteps: jax.Array,
) -> jax.Array:
    """epsilon: the noise; v_prediction: sqrt(a_t) noise - sqrt(1 - a_t) x (get_velocity)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha = alphas_cumprod[timesteps][:, None, None, None]
        return jnp.sqrt(alpha) * noise - jnp.sqrt(1 - alpha) * latents
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
