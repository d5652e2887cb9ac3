"""``ip2p demo --random-weights``: build, convert, check, run, with no trained weights at all.

With no downloads, it builds a random-weight InstructPix2Pix folder with the PyTorch classes,
converts it into our checkpoint, proves the Flax components equal the PyTorch ones, and runs
one guided denoising pass on a drawn scene. The weights are random, so the "edited" image is
noise: the demo shows the machinery, not an edit.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.runtime.compilation import jit
from ip2p_jax.weights.model_folder import convert_to_flax, load_component

SIDE = {"tiny": 64, "tiny-sd2": 64, "sd15": 256}


def draw_scene(side: int) -> Image.Image:
    """A red circle and a blue square on grey: the kind of scene the shapes world renders."""
    image = Image.new("RGB", (side, side), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([side * 0.1, side * 0.2, side * 0.45, side * 0.55], fill=(220, 30, 30))
    draw.rectangle([side * 0.55, side * 0.5, side * 0.9, side * 0.85], fill=(30, 60, 220))
    return image


def guided_edit(folder: Path, image: Image.Image, instruction: str) -> Image.Image:
    """One InstructPix2Pix denoising pass at the last timestep, with two-condition guidance
    (rows: text+image, null text+image, null text+zero image; s_T = 7.5, s_I = 1.5)."""
    unet, vae, text = (load_component(folder, n) for n in ("unet", "vae", "text_encoder"))
    tokens = CLIPTokenizer.from_folder(folder / "tokenizer")([instruction, ""])
    states = text.module.apply({"params": text.params}, jnp.asarray(tokens)).last_hidden_state
    pixels = jnp.asarray(np.asarray(image, np.float32)[None] / 127.5 - 1.0)
    vae_vars = {"params": vae.params}
    image_latent = vae.module.apply(vae_vars, pixels, method=AutoencoderKL.encode).mode()
    noise = jax.random.normal(jax.random.key(0), image_latent.shape)
    sigma = 14.6  # the largest sigma of SD's scaled_linear schedule: the pure-noise end
    scaled = noise * sigma / jnp.sqrt(sigma**2 + 1)  # the k-diffusion input scaling c_in
    rows = jnp.concatenate([scaled] * 3)
    cond = jnp.concatenate([image_latent, image_latent, jnp.zeros_like(image_latent)])
    context = jnp.stack([states[0], states[1], states[1]])
    eps = jit(unet.module.apply)(
        {"params": unet.params}, jnp.concatenate([rows, cond], -1), jnp.full((3,), 999.0), context
    )
    c, i, u = eps[0:1], eps[1:2], eps[2:3]
    guided = u + 1.5 * (i - u) + 7.5 * (c - i)
    latent = (noise * sigma - sigma * guided) / vae.config.scaling_factor
    decoded = vae.module.apply(vae_vars, latent, method=AutoencoderKL.decode)
    return Image.fromarray(np.asarray((jnp.clip(decoded[0], -1, 1) + 1) * 127.5, np.uint8))


def run_random_demo(out: Path, preset: str = "tiny") -> int:
    """Runs the demo into ``out``; returns an exit status."""
    from ip2p_jax.testing.parity import format_table, run_parity
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    out.mkdir(parents=True, exist_ok=True)
    source, checkpoint = out / f"{preset}-diffusers", out / f"{preset}-flax"
    print(f"NOTE: this demo uses RANDOM weights ({preset} preset): it shows the machinery.")
    if not (source / "model_index.json").is_file():
        print(f"building a random-weight InstructPix2Pix folder with diffusers -> {source}")
        build_pipeline_folder(source, preset)
    start = time.perf_counter()
    convert_to_flax(source, checkpoint, overwrite=True)
    print(f"converted to the Flax checkpoint {checkpoint} in {time.perf_counter() - start:.1f} s")
    print("parity of our Flax components against diffusers/transformers (fp32):")
    results = run_parity(
        source, resolution=SIDE[preset], tolerance=1e-4 if preset != "sd15" else 1e-3
    )
    print(format_table(results))
    scene = draw_scene(SIDE[preset])
    scene.save(out / "scene.png")
    edited = guided_edit(checkpoint, scene, "turn the circle blue")
    grid = Image.new("RGB", (scene.width * 2, scene.height))
    grid.paste(scene, (0, 0))
    grid.paste(edited, (scene.width, 0))
    path = out / "demo_grid.png"
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)
    print(f"input | one guided pass with random weights (noise, as expected): {path}")
    return 0 if all(r.passed for r in results) else 1
