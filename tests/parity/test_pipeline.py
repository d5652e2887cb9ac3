"""The whole edit against diffusers' StableDiffusionInstructPix2PixPipeline: same weights,
same initial latents and, for stochastic samplers, the same per-step noise (diffusers draws it
from its generator in turn; a twin generator with the same seed hands us the same numbers).

Tolerance: mean absolute difference of the output images <= 1/255 (measured: about 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p_jax.pipeline import EditPipeline

SCHEDULERS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


def run_both(folder, sampler, image, instructions, steps, text_scale, image_scale, factor):
    import diffusers

    reference = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
    scheduler_class = getattr(diffusers, SCHEDULERS[sampler])
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config)
    batch = len(instructions)
    shape = (batch, 4, image.height // factor, image.width // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    twin = torch.Generator().manual_seed(2)
    noise = torch.stack([torch.randn(shape, generator=twin) for _ in range(steps)])
    expected = reference(
        instructions,
        image=[image] * batch,
        num_inference_steps=steps,
        guidance_scale=text_scale,
        image_guidance_scale=image_scale,
        latents=latents,
        generator=torch.Generator().manual_seed(2),
        output_type="np",
    ).images
    del reference
    ours = EditPipeline.from_pretrained(folder)
    pixels = np.stack([np.asarray(image, np.float32) / 127.5 - 1] * batch)
    edited = ours.edit_arrays(
        pixels,
        instructions,
        steps=steps,
        sampler=sampler,
        text_scale=text_scale,
        image_scale=image_scale,
        init_noise=latents.numpy().transpose(0, 2, 3, 1),
        step_noise=noise.numpy().transpose(0, 1, 3, 4, 2),
    )
    return np.clip(edited / 2 + 0.5, 0, 1), expected


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_tiny_pipeline_matches_diffusers(tiny_folder, sampler):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 24, 3), np.uint8))
    ours, expected = run_both(
        tiny_folder, sampler, image, ["make it blue", "add snow"], 6, 7.5, 1.5, factor=2
    )
    error = np.abs(ours - expected)
    assert error.mean() <= 1 / 255 and error.max() < 1e-3, (error.mean(), error.max())


def test_tiny_pipeline_matches_diffusers_with_image_scale_one(tiny_folder):
    """s_I = 1 takes our two-row path; diffusers still evaluates three rows."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8))
    ours, expected = run_both(tiny_folder, "euler", image, ["turn it red"], 4, 5.0, 1.0, factor=2)
    assert np.abs(ours - expected).max() < 1e-4


@pytest.mark.full_size
def test_full_size_sd15_pipeline_matches_diffusers(sd15_folder):
    """The real SD-1.5 IP2P architecture at 256 px, Euler ancestral, 3 steps."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), np.uint8))
    ours, expected = run_both(
        sd15_folder, "euler_ancestral", image, ["make it snowy"], 3, 7.5, 1.5, factor=8
    )
    error = np.abs(ours - expected)
    print(f"SD-1.5 pipeline: mean abs {error.mean():.3e}, max abs {error.max():.3e}")
    assert error.mean() <= 1 / 255, error.mean()
