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
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``denoise(x, t)`` for a batch of B edits: one UNet call over 3B (or 2B) rows.

    text, null_text: [B, T, D] encoder states (or pytrees of such rows, see UNetApply);
    image_latent: [B, h, w, c] (unscaled VAE mode; CosXL's scaled); text_scale, image_scale: [B].
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
            return u + s_i * (i - u) + s_t * (c - i)
        c, i = branches
        return i + s_t * (c - i)

    return denoise
