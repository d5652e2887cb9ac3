"""Two-condition classifier-free guidance (InstructPix2Pix): three branches, one UNet call.

Rows: c = (text, image), i = (null text, image), u = (null text, zero image latent);
``eps = u + s_I * (i - u) + s_T * (c - i)`` with s_T and s_I per example. When every s_I is 1
the u row cancels (eps = i + s_T (c - i)), so only two rows are evaluated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

UNetApply = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, t, context) -> eps


def guided_denoiser(
    unet: UNetApply,
    *,
    text: jax.Array,
    null_text: jax.Array,
    image_latent: jax.Array,
    text_scale: jax.Array,
    image_scale: jax.Array,
    three_rows: bool = True,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``denoise(x, t)`` for a batch of B edits: one UNet call over 3B (or 2B) rows.

    text, null_text: [B, T, D] encoder states; image_latent: [B, h, w, c] (unscaled VAE mode);
    text_scale, image_scale: [B].
    """
    batch = text.shape[0]
    s_t = text_scale.reshape(batch, 1, 1, 1)
    s_i = image_scale.reshape(batch, 1, 1, 1)
    rows = 3 if three_rows else 2
    context = jnp.concatenate([text, null_text, null_text][:rows])
    image = jnp.concatenate([image_latent, image_latent, jnp.zeros_like(image_latent)][:rows])

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        inputs = jnp.concatenate([jnp.concatenate([x] * rows), image.astype(x.dtype)], axis=-1)
        out = unet(inputs, jnp.broadcast_to(t, (rows * batch,)), context).astype(x.dtype)
        branches = jnp.split(out, rows)
        if three_rows:
            c, i, u = branches
            return u + s_i * (i - u) + s_t * (c - i)
        c, i = branches
        return i + s_t * (c - i)

    return denoise
