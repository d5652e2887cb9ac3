"""EditPipeline: load a model once, then edit batches of images by instruction."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ip2p_jax.diffusion.samplers import Sampler, denoising_end_step, get_sampler
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.pipelines.base import (
    GuidedBatch,
    LatentPipeline,
    batch_seeds,
    pad_batch,
    per_example,
    row_seeds,
)
from ip2p_jax.runtime.compilation import jit
from ip2p_jax.weights.model_folder import LoadedComponent


@jit(static_argnums=0)
def encode_image(module, params, pixels):
    """The image condition: the VAE posterior's mode, unscaled (as the reference trains it)."""
    return module.apply({"params": params}, pixels, method=AutoencoderKL.encode).mode()


class EditPipeline(LatentPipeline):
    """InstructPix2Pix editing with the Flax UNet, VAE and CLIP text encoder."""

    # The image condition is the VAE mode times this: 1 (unscaled, as InstructPix2Pix was
    # trained), or the VAE's scaling factor for CosXL Edit (SDXLEditPipeline).
    image_latent_scale: float = 1.0

    @staticmethod
    def check_components(unet: LoadedComponent, vae: LoadedComponent) -> None:
        latent = vae.config.latent_channels
        if unet.config.in_channels != 2 * latent:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} input channels; InstructPix2Pix "
                f"needs {2 * latent} (noisy + image latent). Convert an SD model with "
                "`ip2p convert --in-channels 8` and fine-tune it first"
            )

    # -- the pieces -------------------------------------------------------------------------

    def edit_arrays(
        self,
        pixels: np.ndarray,
        instructions: Sequence[str],
        *,
        steps: int = 100,
        text_scale: float | Sequence[float] = 7.5,
        image_scale: float | Sequence[float] = 1.5,
        seeds: Sequence[int] | None = None,
        sampler: str | Sampler = "euler_ancestral",
        negative_prompt: str | Sequence[str] | None = None,
        init_noise: np.ndarray | None = None,
        step_noise: np.ndarray | None = None,
        progress: bool | None = None,
        guidance_rescale: float | Sequence[float] = 0.0,
        denoising_end: float | None = None,
        **added_conditioning,
    ) -> np.ndarray:
        """[B, H, W, 3] in [-1, 1] -> edited [B, H, W, 3] in about [-1, 1].

        ``init_noise`` [B, h, w, 4] and ``step_noise`` [steps, B, h, w, 4] replace the draws
        from the seeds (parity tests against diffusers' generator). ``guidance_rescale`` and
        ``denoising_end`` are diffusers' SDXL options: the first 0 to 1 (0, the default,
        leaves the guidance as it is); the second stops the chain at that fraction of the
        training timesteps, a still noisy result for a refiner. ``added_conditioning`` is
        the model's own (SDXL's original_size, crops_coords_top_left, target_size).
        """
        self.check_added_conditioning(added_conditioning)
        batch = pixels.shape[0]
        instructions = list(instructions)
        negatives = None
        if negative_prompt is not None:  # None: "" (SDXL: zeros, as diffusers)
            negatives = per_example(negative_prompt, batch, "negative_prompt")
        s_t = np.asarray(per_example(text_scale, batch, "text_scale"), np.float32)
        s_i = np.asarray(per_example(image_scale, batch, "image_scale"), np.float32)
        rescale = np.asarray(per_example(guidance_rescale, batch, "guidance_rescale"), np.float32)
        if ((rescale < 0) | (rescale > 1)).any():
            raise ValueError(f"guidance_rescale must be in [0, 1], got {rescale.tolist()}")
        seeds = row_seeds(batch, instructions, seeds, "instructions")
        if isinstance(sampler, str):
            sampler = get_sampler(sampler)
        plan = sampler.plan(self.schedule, steps)
        end = None if denoising_end is None else self._denoising_end_step(plan, denoising_end)

        padded = self._padding(batch)
        texts, nulls = self._encode_prompt_pairs(
            instructions, negatives, padded, pixels.shape[1:3], **added_conditioning
        )
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds + seeds[-1:] * padded, jnp.uint32))
        rescale = rescale if rescale.any() else None  # off: the program without it
        pixels_d, s_t_d, s_i_d, init_d, rescale_d = self._shard(
            *(pad_batch(a, padded) for a in (pixels, s_t, s_i, init_noise, rescale))
        )
        texts, nulls, keys = self._shard(texts, nulls, keys)
        conditions = GuidedBatch(
            text=texts,
            null_text=nulls,
            image_latent=self._image_latent(pixels_d),
            text_scale=s_t_d,
            image_scale=s_i_d,
            keys=keys,
            init_noise=init_d,
            step_noise=pad_batch(step_noise, padded, axis=1),
            guidance_rescale=rescale_d,
        )
        three_rows = bool((s_i != 1.0).any())
        latents = self._sample(
            sampler, plan, steps, conditions, three_rows=three_rows, progress=progress, end=end
        )
        return self._decode_latents(latents, batch)

    def _denoising_end_step(self, plan: dict, denoising_end: float) -> int:
        if self.schedule.is_edm:
            raise ValueError(
                "denoising_end counts training timesteps; an EDM model (CosXL) has none"
            )
        return denoising_end_step(plan, denoising_end, self.schedule.num_train_timesteps)

    def _image_latent(self, pixels: jax.Array) -> jax.Array:
        latent = encode_image(self.vae.module, self.vae.params, pixels)
        return latent if self.image_latent_scale == 1.0 else latent * self.image_latent_scale

    # -- the user's entry point ------------------------------------------------------------

    def edit(
        self,
        images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
        instructions: str | Sequence[str],
        *,
        steps: int = 100,
        text_scale: float | Sequence[float] = 7.5,
        image_scale: float | Sequence[float] = 1.5,
        seed: int | Sequence[int] = 0,
        sampler: str = "euler_ancestral",
        negative_prompt: str | Sequence[str] | None = None,
        resolution: int = 512,
        multiple_of: int = 8,
        keep_size: bool = True,
        progress: bool | None = None,
        guidance_rescale: float | Sequence[float] = 0.0,
        denoising_end: float | None = None,
        **added_conditioning,
    ) -> list[Image.Image]:
        """Edits images by instruction; returns PIL images (at the inputs' sizes by default).

        Each image is resized so its long side is ``resolution`` and both sides are multiples
        of ``multiple_of``. A batch may mix instructions, scales and seeds; an int ``seed``
        gives image k the seed ``seed + k``. Images of different shapes run in groups.
        ``denoising_end`` and ``added_conditioning``: see `edit_arrays`.
        """
        self.check_added_conditioning(added_conditioning)
        single = isinstance(images, (str, os.PathLike, Image.Image))
        images = [images] if single else list(images)
        batch = len(images)
        instructions = per_example(instructions, batch, "instructions")
        for k, text in enumerate(instructions):
            if not text or not text.strip():
                raise ValueError(f"instruction {k} is empty; say what to change")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        sampler_obj = get_sampler(sampler)  # unknown names fail here, before any compile
        per_image = {
            "instructions": instructions,
            "text_scale": per_example(text_scale, batch, "text_scale"),
            "image_scale": per_example(image_scale, batch, "image_scale"),
            "seeds": batch_seeds(seed, batch),
            "guidance_rescale": per_example(guidance_rescale, batch, "guidance_rescale"),
        }
        if negative_prompt is not None:
            per_image["negative_prompt"] = per_example(negative_prompt, batch, "negative_prompt")
        shared = {
            "steps": steps,
            "sampler": sampler_obj,
            "progress": progress,
            "denoising_end": denoising_end,
            **added_conditioning,
        }
        return self._edit_by_shape(images, per_image, shared, resolution, multiple_of, keep_size)
