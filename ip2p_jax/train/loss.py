"""The InstructPix2Pix training objective as pure functions: conditioning dropout, forward
diffusion (diffusion/forward.py), and the epsilon / v MSE of the 8-channel UNet. Every
random input (noise, timesteps, the dropout draw) is an argument, so a PyTorch step can be
fed the same ones."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ip2p_jax.diffusion.forward import add_noise, regression_target
from ip2p_jax.train.config import DropoutConfig

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, t, text) -> prediction


def dropout_masks(r: jax.Array, rates: DropoutConfig) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image) booleans from r ~ U(0, 1) per example, as the original's
    ddpm_edit.py: r < a drops the text only, a <= r < a+b both, a+b <= r < a+b+c the image
    only (a, b, c = text_only, both, image_only)."""
    text_end = rates.text_only + rates.both
    drop_text = r < text_end
    drop_image = (r >= rates.text_only) & (r < text_end + rates.image_only)
    return drop_text, drop_image


def apply_dropout(
    text: jax.Array,
    null_text: jax.Array,
    image_latent: jax.Array,
    drop_text: jax.Array,
    drop_image: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Dropped text becomes the encoding of "" (null_text, [1, T, D]); a dropped image
    latent becomes zeros, exactly the rows guidance uses at sampling time."""
    text = jnp.where(drop_text[:, None, None], null_text.astype(text.dtype), text)
    image_latent = jnp.where(drop_image[:, None, None, None], 0.0, image_latent)
    return text, image_latent


def diffusion_loss(
    denoise: Denoiser,
    *,
    latents: jax.Array,
    image_latent: jax.Array,
    text: jax.Array,
    null_text: jax.Array,
    noise: jax.Array,
    timesteps: jax.Array,
    dropout_draw: jax.Array,
    rates: DropoutConfig,
    alphas_cumprod: jax.Array,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """Mean squared error of the UNet's prediction on [noisy latents, image latent].

    `latents` are the edited image's latents already scaled by the VAE factor; `image_latent`
    is the input image's posterior mode, unscaled, as the reference trains it.
    """
    drop_text, drop_image = dropout_masks(dropout_draw, rates)
    text, image_latent = apply_dropout(text, null_text, image_latent, drop_text, drop_image)
    noisy = add_noise(alphas_cumprod, latents, noise, timesteps)
    model_input = jnp.concatenate([noisy, image_latent.astype(noisy.dtype)], axis=-1)
    prediction = denoise(model_input, timesteps, text).astype(jnp.float32)
    target = regression_target(prediction_type, alphas_cumprod, latents, noise, timesteps)
    return jnp.mean(jnp.square(prediction - target.astype(jnp.float32)))
