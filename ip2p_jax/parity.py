"""Component parity: our Flax modules against the PyTorch classes on the same folder.

Loads a model folder with diffusers/transformers and with ours, feeds both identical random
inputs and reports the max and mean absolute error of every output. Needs the ``torch``
extra; torch is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.checkpoint import load_component
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.tokenizer import CLIPTokenizer

DEFAULT_PROMPTS = (
    "turn the sky into a starry night",
    "make it look like a watercolor painting, with soft edges & muted colours",
    "",
)
COMPONENT_NAMES = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One output compared: errors against the reference and the tolerance it must meet."""

    component: str
    output: str
    shape: tuple[int, ...]
    max_abs_error: float
    mean_abs_error: float
    reference_max_abs: float
    tolerance: float
    metric: str = "max"  # which error the tolerance bounds: "max" or "mean" (whole images)

    @property
    def passed(self) -> bool:
        error = self.max_abs_error if self.metric == "max" else self.mean_abs_error
        return error <= self.tolerance


def _compare(
    component: str, output: str, ours, reference, tolerance: float, metric: str = "max"
) -> Comparison:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise AssertionError(f"{component}.{output}: shape {ours.shape} vs {reference.shape}")
    error = np.abs(ours - reference)
    return Comparison(
        component,
        output,
        reference.shape,
        float(error.max()),
        float(error.mean()),
        float(np.abs(reference).max()),
        tolerance,
        metric,
    )


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x) -> jax.Array:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def compare_unet(
    folder: Path, resolution: int, batch: int, seed: int, tolerance: float
) -> list[Comparison]:
    """eps prediction on random latents, timesteps and text states at ``resolution`` px."""
    import torch
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(folder / "unet").float().eval()
    cfg = reference.config
    side = resolution // 8
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = reference(sample, timesteps, context).sample.numpy()
    del reference
    gc.collect()
    ours = load_component(folder, "unet")
    apply = jax.jit(ours.module.apply)
    out = apply(
        {"params": ours.params},
        _nhwc(sample),
        jnp.asarray(timesteps.numpy()),
        jnp.asarray(context.numpy()),
    )
    return [_compare("unet", "sample", _nchw(out), expected, tolerance)]


def compare_vae(
    folder: Path, resolution: int, batch: int, seed: int, tolerance: float
) -> list[Comparison]:
    """Posterior mean and logvar of random images; decoding of the posterior mean."""
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    reference = TorchAutoencoderKL.from_pretrained(folder / "vae").float().eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, reference.config.in_channels, resolution, resolution, generator=g)
    images = images * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        decoded = reference.decode(posterior.mean).sample.numpy()
    mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    del reference, posterior
    gc.collect()
    ours = load_component(folder, "vae")
    variables = {"params": ours.params}
    encode = jax.jit(lambda v, x: ours.module.apply(v, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda v, z: ours.module.apply(v, z, method=AutoencoderKL.decode))
    got = encode(variables, _nhwc(images))
    out = decode(variables, _nhwc(mean))
    return [
        _compare("vae", "posterior.mean", _nchw(got.mean), mean, tolerance),
        _compare("vae", "posterior.logvar", _nchw(got.logvar), logvar, tolerance),
        _compare("vae", "decode", _nchw(out), decoded, tolerance),
    ]


def compare_text_encoder(
    folder: Path, prompts: Sequence[str], tolerance: float
) -> list[Comparison]:
    """Last hidden state, pooled output and penultimate layer (SD-2's) on tokenized prompts."""
    import torch
    from transformers import CLIPTextModel as TorchCLIPTextModel

    reference = TorchCLIPTextModel.from_pretrained(folder / "text_encoder").float().eval()
    ids = CLIPTokenizer.from_folder(folder / "tokenizer")(list(prompts))
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    del reference
    gc.collect()
    ours = load_component(folder, "text_encoder")
    apply = jax.jit(ours.module.apply, static_argnames="output_hidden_states")
    out = apply({"params": ours.params}, jnp.asarray(ids), output_hidden_states=True)
    return [
        _compare(
            "text_encoder",
            "last_hidden_state",
            out.last_hidden_state,
            expected.last_hidden_state.numpy(),
            tolerance,
        ),
        _compare(
            "text_encoder",
            "pooler_output",
            out.pooler_output,
            expected.pooler_output.numpy(),
            tolerance,
        ),
        _compare(
            "text_encoder",
            "hidden_states[-2]",
            out.hidden_states[-2],
            expected.hidden_states[-2].numpy(),
            tolerance,
        ),
    ]


PIPELINE_SCHEDULERS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


def edit_both(
    folder: Path,
    sampler: str,
    image,
    instructions: Sequence[str],
    *,
    steps: int,
    text_scale: float = 7.5,
    image_scale: float = 1.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The same edit by diffusers' StableDiffusionInstructPix2PixPipeline and by ours:
    identical initial latents and per-step noise (diffusers draws it from its generator in
    turn; a twin generator with the same seed hands our sampler the same numbers).
    Returns (ours, diffusers') images [B, H, W, 3] in [0, 1]."""
    import diffusers
    import torch

    from ip2p_jax.pipeline import EditPipeline

    reference = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
    scheduler_class = getattr(diffusers, PIPELINE_SCHEDULERS[sampler])
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config)
    factor = 2 ** (len(reference.vae.config.block_out_channels) - 1)
    batch = len(instructions)
    shape = (
        batch,
        reference.vae.config.latent_channels,
        image.height // factor,
        image.width // factor,
    )
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    twin = torch.Generator().manual_seed(seed + 1)
    noise = torch.stack([torch.randn(shape, generator=twin) for _ in range(steps)])
    with torch.no_grad():
        expected = reference(
            list(instructions),
            image=[image] * batch,
            num_inference_steps=steps,
            guidance_scale=text_scale,
            image_guidance_scale=image_scale,
            latents=latents,
            generator=torch.Generator().manual_seed(seed + 1),
            output_type="np",
        ).images
    del reference
    gc.collect()
    ours = EditPipeline.from_pretrained(folder)
    pixels = np.stack([np.asarray(image, np.float32) / 127.5 - 1] * batch)
    edited = ours.edit_arrays(
        pixels,
        list(instructions),
        steps=steps,
        sampler=sampler,
        text_scale=text_scale,
        image_scale=image_scale,
        init_noise=latents.numpy().transpose(0, 2, 3, 1),
        step_noise=noise.numpy().transpose(0, 1, 3, 4, 2),
    )
    return np.clip(edited / 2 + 0.5, 0, 1), expected


def compare_pipeline(
    folder: Path,
    resolution: int,
    seed: int,
    steps: int = 4,
    samplers: Sequence[str] = ("euler_ancestral", "euler", "ddim"),
) -> list[Comparison]:
    """Whole edits against diffusers, per sampler: mean abs difference <= 1/255."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8))
    rows = []
    for sampler in samplers:
        ours, expected = edit_both(
            folder, sampler, image, ["make it snowy"], steps=steps, seed=seed
        )
        rows.append(_compare("pipeline", sampler, ours, expected, 1 / 255, metric="mean"))
    return rows


def run_parity(
    folder: str | Path,
    *,
    components: Sequence[str] = COMPONENT_NAMES,
    resolution: int = 256,
    batch: int = 2,
    seed: int = 0,
    tolerance: float = 1e-3,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    pipeline: bool = False,
) -> list[Comparison]:
    """Compares each component of a diffusers folder with the PyTorch reference, in float32."""
    folder = Path(folder)
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    if unknown := set(components) - set(COMPONENT_NAMES):
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENT_NAMES}")
    for name in components:
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no {name}/config.json (a diffusers folder?)")
    results: list[Comparison] = []
    if "unet" in components:
        results += compare_unet(folder, resolution, batch, seed, tolerance)
    if "vae" in components:
        results += compare_vae(folder, resolution, batch, seed, tolerance)
    if "text_encoder" in components:
        results += compare_text_encoder(folder, prompts, tolerance)
    if pipeline:
        results += compare_pipeline(folder, resolution, seed)
    return results


def format_table(results: Sequence[Comparison]) -> str:
    """A plain-text table, one row per output."""
    header = (
        f"{'component':<13} {'output':<19} {'max abs err':>12} {'mean abs err':>12} "
        f"{'ref max':>9} {'tolerance':>9}  ok"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r.component:<13} {r.output:<19} {r.max_abs_error:>12.3e} {r.mean_abs_error:>12.3e} "
            f"{r.reference_max_abs:>9.3g} {r.tolerance:>9.1e}  {'yes' if r.passed else 'NO'}"
            + ("  (tolerance on the mean)" if r.metric == "mean" else "")
        )
    return "\n".join(rows)
