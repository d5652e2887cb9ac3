"""SDEdit, the paper's baseline: img2img from the edited caption with a text-to-image SD model.

The math is diffusers' StableDiffusionImg2ImgPipeline: the sampler's timesteps for ``steps``
are cut to the last ``int(steps * strength)``, the input image's VAE latent (a posterior
sample, times the scaling factor) is noised to the first kept timestep as that scheduler's
``add_noise`` does, and the chain runs from there with text classifier-free guidance
(``eps = uncond + s (text - uncond)``). The pieces are LatentPipeline's, which EditPipeline
runs too: its text encoder, sampling loop and decoder programs, with an image latent of zero
channels, so the guided denoiser's two rows are plain text CFG on a 4-channel UNet.

A strength is a number of steps, so each strength compiles its own sampling loop; seeds,
prompts and guidance scales are data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ip2p_jax.diffusion.samplers import (
    DDIM,
    DPMSolverPP2M,
    Euler,
    EulerAncestral,
    Sampler,
    get_sampler,
)
from ip2p_jax.diffusion.schedules import NoiseSchedule
from ip2p_jax.models.config import load_json
from ip2p_jax.models.vae import AutoencoderKL

# LatentPipeline's jitted programs (text encoding, the guided sampling loop, decoding) and
# progress, the editor's own: SDEdit samples exactly as EditPipeline does.
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

Plan = dict[str, np.ndarray]


def sd_pipeline_schedule(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule as diffusers' Stable Diffusion pipelines (text-to-image, img2img) use it:
    their constructors rewrite an outdated scheduler config to ``steps_offset=1`` and
    ``clip_sample=False`` (DDIM's default clips x0 to [-1, 1], wrong for latents)."""
    raw = {**dict(schedule.raw), "steps_offset": 1, "clip_sample": False}
    return dataclasses.replace(schedule, raw=tuple(sorted(raw.items())))


def kept_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img run at ``strength`` denoises (diffusers'
    ``get_timesteps``: ``min(int(steps * strength), steps)``); refuses what leaves none."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step "
            f"(int({steps} * {strength}) = 0); raise --steps or the strength"
        )
    return kept


def img2img_plan(
    sampler: Sampler, schedule: NoiseSchedule, steps: int, strength: float
) -> tuple[Plan, float, float]:
    """The sampler's plan for ``steps``, cut to the steps ``strength`` keeps, and the
    (alpha, sigma) that noise the clean latent to the first kept step: ``x = alpha x0 +
    sigma n``, as the matching diffusers scheduler's ``add_noise`` at its begin index.

    The cut plan's ``init_sigma`` is 1: the start is already noised, not unit noise.
    """
    kept = kept_steps(steps, strength)
    full = sampler.plan(schedule, steps)
    start = steps - kept
    plan: Plan = {}
    for name, value in full.items():
        value = np.asarray(value)
        # Per-step arrays have `steps` entries (sigmas one more, the final 0): drop the first.
        per_step = value.ndim >= 1 and value.shape[0] in (steps, steps + 1)
        plan[name] = value[start:] if per_step else value
    plan["init_sigma"] = np.float32(1.0)
    if isinstance(sampler, (Euler, EulerAncestral)):  # k-diffusion space: x0 + sigma n
        alpha, sigma = 1.0, float(plan["sigmas"][0])
    elif isinstance(sampler, DDIM):  # VP space at alphas_cumprod[t]
        a = float(plan["alpha"][0])
        alpha, sigma = a**0.5, (1.0 - a) ** 0.5
    elif isinstance(sampler, DPMSolverPP2M):  # VP space from the interpolated k-sigma
        k_sigma = float(plan["sigmas"][0])
        alpha = 1.0 / (k_sigma**2 + 1.0) ** 0.5
        sigma = k_sigma * alpha
    else:
        raise NotImplementedError(f"img2img does not know how {type(sampler).__name__} noises")
    return plan, alpha, sigma


@jit(static_argnums=0)
def _noised_latents(
    vae_module, vae_params, pixels, keys, scaling, alpha, sigma, latent_noise, start_noise
):
    """The scaled posterior sample of each image, noised to the first kept step."""
    posterior = vae_module.apply({"params": vae_params}, pixels, method=AutoencoderKL.encode)
    shape = posterior.mean.shape[1:]
    draw = lambda index: jax.vmap(lambda k: jax.random.normal(k[index], shape))(keys)
    if latent_noise is None:
        latent_noise = draw(0)
    if start_noise is None:
        start_noise = draw(1)
    latents = (posterior.mean + posterior.std * latent_noise) * scaling
    return alpha * latents + sigma * start_noise


class SDEditPipeline(LatentPipeline):
    """img2img with the Flax UNet (4 input channels), VAE and CLIP text encoder."""

    def __init__(self, *components, **options):
        super().__init__(*components, **options)
        self.schedule = sd_pipeline_schedule(self.schedule)

    @staticmethod
    def check_components(unet: LoadedComponent, vae: LoadedComponent) -> None:
        latent = vae.config.latent_channels
        if unet.config.in_channels != latent:
            raise ValueError(_channels_message("the model", unet.config.in_channels, latent))

    @classmethod
    def model_folder(cls, model: str | os.PathLike) -> Path:
        """A text-to-image SD folder (diffusers layout, a hub id when online, or our
        checkpoint). An InstructPix2Pix model (8-channel UNet) is refused before loading."""
        return check_text_to_image_model(model)

    def edit_arrays(
        self,
        pixels: np.ndarray,
        prompts: Sequence[str],
        *,
        strength: float,
        steps: int = 50,
        guidance_scale: float | Sequence[float] = 7.5,
        seeds: Sequence[int] | None = None,
        sampler: str | Sampler = "euler_ancestral",
        negative_prompt: str | Sequence[str] = "",
        latent_noise: np.ndarray | None = None,
        start_noise: np.ndarray | None = None,
        step_noise: np.ndarray | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """[B, H, W, 3] in [-1, 1] -> [B, H, W, 3] in about [-1, 1], each image redrawn from
        its prompt at ``strength`` (0: unchanged, 1: from pure noise).

        ``latent_noise`` (the VAE posterior's draw) and ``start_noise`` [B, h, w, 4] and
        ``step_noise`` [kept steps, B, h, w, 4] replace the draws from the seeds (parity).
        """
        batch = pixels.shape[0]
        prompts = list(prompts)
        negatives = per_example(negative_prompt, batch, "negative_prompt")
        scales = np.asarray(per_example(guidance_scale, batch, "guidance_scale"), np.float32)
        seeds = row_seeds(batch, prompts, seeds, "prompts")
        if isinstance(sampler, str):
            sampler = get_sampler(sampler)
        plan, alpha, sigma = img2img_plan(sampler, self.schedule, steps, strength)
        kept = plan["timesteps"].shape[0]

        padded = self._padding(batch)
        texts, nulls = self._encode_prompt_pairs(prompts, negatives, padded)
        # Three independent streams per example: posterior draw, start noise, sampler steps.
        seeds_padded = jnp.asarray(seeds + seeds[-1:] * padded, jnp.uint32)
        keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(seeds_padded)
        pixels_d, scales_d, latent_d, start_d, keys_d, texts, nulls = self._shard(
            *(pad_batch(a, padded) for a in (pixels, scales, latent_noise, start_noise)),
            keys,
            texts,
            nulls,
        )
        x_start = _noised_latents(
            self.vae.module,
            self.vae.params,
            pixels_d,
            keys_d,
            jnp.float32(self.vae.config.scaling_factor),
            jnp.float32(alpha),
            jnp.float32(sigma),
            latent_d,
            start_d,
        )
        # No image condition: a zero-channel image latent makes the guided denoiser's two rows
        # (text, null text) plain classifier-free guidance.
        no_image = jnp.zeros((*x_start.shape[:-1], 0), x_start.dtype)
        conditions = GuidedBatch(
            text=texts,
            null_text=nulls,
            image_latent=no_image,
            text_scale=scales_d,
            image_scale=jnp.ones_like(scales_d),
            keys=keys_d[:, 2],
            init_noise=x_start,
            step_noise=pad_batch(step_noise, padded, axis=1),
        )
        latents = self._sample(sampler, plan, kept, conditions, three_rows=False, progress=progress)
        return self._decode_latents(latents, batch)

    def edit(
        self,
        images: Sequence[Image.Image | str | os.PathLike],
        prompts: str | Sequence[str],
        *,
        strength: float = 0.5,
        steps: int = 50,
        guidance_scale: float | Sequence[float] = 7.5,
        seed: int | Sequence[int] = 0,
        sampler: str = "euler_ancestral",
        negative_prompt: str | Sequence[str] = "",
        resolution: int = 512,
        progress: bool | None = None,
    ) -> list[Image.Image]:
        """Redraws each image from its prompt; returns PIL images at the sampled size (long
        side ``resolution``, sides multiples of 8). Images of different shapes run in
        groups; an int ``seed`` gives image k the seed ``seed + k``."""
        images = list(images)
        batch = len(images)
        per_image = {
            "prompts": per_example(prompts, batch, "prompts"),
            "seeds": batch_seeds(seed, batch),
            "guidance_scale": per_example(guidance_scale, batch, "guidance_scale"),
            "negative_prompt": per_example(negative_prompt, batch, "negative_prompt"),
        }
        kept_steps(steps, strength)  # a bad strength fails here, before anything compiles
        shared = {
            "strength": strength,
            "steps": steps,
            "sampler": get_sampler(sampler),
            "progress": progress,
        }
        return self._edit_by_shape(images, per_image, shared, resolution, 8, keep_size=False)


def check_text_to_image_model(model: str | os.PathLike) -> Path:
    """The model's folder, once its configs show a text-to-image SD model (a UNet taking the
    VAE's latent channels); raises before any weight is read otherwise."""
    folder = LatentPipeline.model_folder(model)
    channels = load_json(folder / "unet" / "config.json").get("in_channels", 4)
    latent = load_json(folder / "vae" / "config.json").get("latent_channels", 4)
    if channels != latent:
        raise ValueError(_channels_message(str(folder), channels, latent))
    return folder


def _channels_message(where: str, channels: int, latent: int) -> str:
    guess = " (an InstructPix2Pix model?)" if channels == 2 * latent else ""
    return (
        f"SDEdit needs a {latent}-channel text-to-image Stable Diffusion model, but the UNet of "
        f"{where} takes {channels} input channels{guess}; give --sdedit a text-to-image SD "
        "folder such as stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
