"""bf16 edits on the device: ours, ``EditPipeline.from_pretrained(folder, dtype="bfloat16")``,
against diffusers' StableDiffusionInstructPix2PixPipeline in float16 on the same device, with
the same initial latents and the same per-step noise (Euler ancestral).

The noise: diffusers' scheduler draws each step's noise with ``randn_tensor``; here that draw
hands out precomputed float16-exact tensors in turn, and our sampler gets the same numbers
(``step_noise``), so no generator has to agree across dtypes (parity.edit_both feeds its twin
generator the same way in fp32 on the CPU). diffusers in float32 (TF32 off) runs too, as the
reference both half-precision edits are measured against.

Bound: mean absolute difference of the [0, 1] images, ours bf16 against diffusers fp16, within
the bf16 pipeline tolerance of ``ip2p parity --dtype bfloat16`` (testing.parity.TOLERANCES,
measured on the CPU against diffusers' fp32); a GPU run records all three differences, and
its figure replaces the bound once measured.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.testing.parity import TOLERANCES

pytestmark = pytest.mark.gpu

BOUND = TOLERANCES["bfloat16"].pipeline
INSTRUCTION = "make it snowy"
TEXT_SCALE, IMAGE_SCALE = 7.5, 1.5


def _diffusers_edit(folder, device, dtype, image, latents, noise, monkeypatch) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_ancestral

    draws = iter(noise)

    def next_noise(shape, *args, **kwargs):
        step = next(draws)
        assert tuple(step.shape) == tuple(shape), (step.shape, shape)
        return step.to(device=kwargs.get("device"), dtype=kwargs.get("dtype"))

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(euler_ancestral, "randn_tensor", next_noise)
        images = pipe(
            [INSTRUCTION],
            image=[image],
            num_inference_steps=len(noise),
            guidance_scale=TEXT_SCALE,
            image_guidance_scale=IMAGE_SCALE,
            latents=latents.to(device, dtype),
            output_type="np",
        ).images
    assert next(draws, None) is None, "diffusers drew fewer step noises than steps"
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return images


def test_bf16_edit_matches_diffusers_fp16(model_folder, sizes, torch_device, record, monkeypatch):
    import torch
    from diffusers import AutoencoderKL

    from ip2p_jax.pipelines.edit import EditPipeline

    side, steps = sizes.pipeline_resolution, sizes.pipeline_steps
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8))
    vae = AutoencoderKL.load_config(model_folder / "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)  # 8 for SD's VAE, 2 for the tiny one
    shape = (1, vae["latent_channels"], side // factor, side // factor)
    # float16-exact numbers: every run, in any dtype, starts from the same values.
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).half().float()
    noise = torch.randn((steps, *shape), generator=torch.Generator().manual_seed(1))
    noise = noise.half().float()

    edits = {
        name: _diffusers_edit(model_folder, torch_device, dtype, image, latents, noise, monkeypatch)
        for name, dtype in (("diffusers_fp16", torch.float16), ("diffusers_fp32", torch.float32))
    }
    ours = EditPipeline.from_pretrained(model_folder, dtype="bfloat16")
    pixels = np.asarray(image, np.float32)[None] / 127.5 - 1
    edited = ours.edit_arrays(
        pixels,
        [INSTRUCTION],
        steps=steps,
        sampler="euler_ancestral",
        text_scale=TEXT_SCALE,
        image_scale=IMAGE_SCALE,
        init_noise=latents.numpy().transpose(0, 2, 3, 1),
        step_noise=noise.numpy().transpose(0, 1, 3, 4, 2),
        progress=False,
    )
    edits["ours_bf16"] = np.clip(np.asarray(edited, np.float32) / 2 + 0.5, 0, 1)

    for name, images in edits.items():
        assert images.shape == (1, side, side, 3), (name, images.shape)
        assert np.isfinite(images).all(), f"{name} has NaN or inf pixels"
    # A flat (e.g. saturated) reference would make any two edits agree.
    assert edits["diffusers_fp32"].std() > 1e-3, edits["diffusers_fp32"].std()
    pairs = {
        "ours_bf16 vs diffusers_fp16": ("ours_bf16", "diffusers_fp16"),
        "ours_bf16 vs diffusers_fp32": ("ours_bf16", "diffusers_fp32"),
        "diffusers_fp16 vs diffusers_fp32": ("diffusers_fp16", "diffusers_fp32"),
    }
    errors = {
        label: np.abs(edits[a].astype(np.float64) - edits[b]) for label, (a, b) in pairs.items()
    }
    record(
        **{f"{label} mean abs": float(e.mean()) for label, e in errors.items()},
        **{f"{label} max abs": float(e.max()) for label, e in errors.items()},
        bound=BOUND,
        steps=steps,
        resolution=side,
    )
    measured = errors["ours_bf16 vs diffusers_fp16"].mean()
    assert measured <= BOUND, {label: float(e.mean()) for label, e in errors.items()}
