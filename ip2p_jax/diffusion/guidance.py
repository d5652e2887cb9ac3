"""Two-condition classifier-free guidance (InstructPix2Pix): three branches, one UNet call.

Rows: c = (text, image), i = (null text, image), u = (null text, zero image latent);
``eps = u + s_I * (i - u) + s_T * (c - i)`` with s_T and s_I per example. When every s_I is 1
the u row cancels (eps = i + s_T (c - i)), so only two rows are evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# (x, t, context) -> eps; the context is the text states [B, T, D], or for SDXL a dict of
# the UNet's conditioning arrays (encoder_hidden_states, text_embeds, time_ids), a row each.
UNetApply = Callable[[jax.Array, jax.Array, Any], jax.Array]


def guided_denoiser(
    unet: UNetApply,
    *,
    text: Any,
    null_text: Any,
    image_latent: jax.Array,
    text_scale: jax.Array,
    image_scale: jax.Array,
    three_rows: bool = True,
    guidance_rescale: jax.Array | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``denoise(x, t)`` for a batch of B edits: one UNet call over 3B (or 2B) rows.

    text, null_text: [B, T, D] encoder states (or pytrees of such rows, see UNetApply);
    image_latent: [B, h, w, c] (unscaled VAE mode; CosXL's scaled); text_scale, image_scale: [B].
    ``guidance_rescale`` [B] (SDXL's, "Common Diffusion Noise Schedules" 3.4): the guided
    output rescaled towards the text row's standard deviation by that fraction (0: as is).
    """
    batch = image_latent.shape[0]
    s_t = text_scale.reshape(batch, 1, 1, 1)
    s_i = image_scale.reshape(batch, 1, 1, 1)
    rows = 3 if three_rows else 2
    context = jax.tree.map(lambda c, n: jnp.concatenate([c, n, n][:rows]), text, null_text)
    image = jnp.concatenate([image_latent, image_latent, jnp.zeros_like(image_latent)][:rows])

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        inputs = jnp.concatenate([jnp.concatenate([x] * rows), image.astype(x.dtype)], axis=-1)
        out = unet(inputs, jnp.broadcast_to(t, (rows * batch,)), context).astype(x.dtype)
        branches = jnp.split(out, rows)
        if three_rows:
            c, i, u = branches
            guided = u + s_i * (i - u) + s_t * (c - i)
        else:
            c, i = branches
            guided = i + s_t * (c - i)
        return guided if guidance_rescale is None else _rescaled(guided, c, guidance_rescale)

    return denoise


def _rescaled(guided: jax.Array, text: jax.Array, fraction: jax.Array) -> jax.Array:
    """diffusers' rescale_noise_cfg: ``guided`` scaled to the text row's standard deviation,
    mixed in by ``fraction`` [B]; examples with fraction 0 are left exactly as they are."""
    axes = tuple(range(1, guided.ndim))
    std = lambda a: jnp.std(a, axis=axes, keepdims=True)
    f = fraction.reshape(-1, *([1] * len(axes))).astype(guided.dtype)
    return jnp.where(f > 0, f * guided * (std(text) / std(guided)) + (1 - f) * guided, guided)
