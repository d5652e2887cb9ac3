"""Component parity: our Flax modules against the PyTorch classes on the same folder.

Loads a model folder with diffusers/transformers and with ours, feeds both identical random
inputs and reports the max and mean absolute error of every output. Needs the ``torch``
extra; torch is imported inside the functions only.

The reference always runs in float32. Ours runs the UNet and text encoder in ``dtype`` (as
``EditPipeline.from_pretrained(dtype=...)``; the VAE stays float32), so a low-precision run
measures how far bf16 or fp16 compute lands from the float32 model; :data:`TOLERANCES` are
the bounds each dtype must meet (measured on the random-weight test models, see
docs/parity.md).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.models.config import load_json
from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.runtime import memory
from ip2p_jax.runtime.compilation import jit
from ip2p_jax.weights.convert import state_dict_to_params
from ip2p_jax.weights.model_folder import (
    COMPONENTS,
    LoadedComponent,
    abstract_params,
    build_module,
    load_component,
)

DEFAULT_PROMPTS = (
    "turn the sky into a starry night",
    "make it look like a watercolor painting, with soft edges & muted colours",
    "",
)
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The bounds one compute dtype must meet against the float32 reference: the max abs
    error of a component's outputs (of order 1), and the mean abs error of whole edits on
    [0, 1] images."""

    component: float
    pipeline: float


# float32: ports of the same math, apart by float rounding. bfloat16 / float16: about twice
# the largest error measured on the tiny random-weight SD-1 and SD-2 models at 32 px, 4 steps
# (docs/parity.md: bf16 3.2e-2 on text states of size 3, 1.24e-2 mean on DDIM's images; fp16
# 5.7e-3 and 1.65e-3), 8 bits (bf16) or 11 (fp16) of mantissa through every layer.
TOLERANCES = {
    "float32": Tolerances(component=1e-3, pipeline=1 / 255),
    "bfloat16": Tolerances(component=0.06, pipeline=0.025),
    "float16": Tolerances(component=0.012, pipeline=0.004),
}


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


def _release_torch_memory(torch) -> None:
    """Frees the dropped reference's memory (torch's CUDA cache too) before ours computes."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _host(tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x) -> jax.Array:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _unet_inputs(cfg, resolution: int, batch: int, seed: int):
    """Random latents, timesteps, text states (and SDXL's pooled text and time ids) for a
    UNet of diffusers config ``cfg``, as torch tensors: (args, added_cond_kwargs)."""
    import torch

    side = resolution // 8
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    added = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        # (original size, crop top-left, target size) as the pipeline makes them, in pixels
        sizes = torch.randint(resolution // 2, 2 * resolution, (batch, 2), generator=g)
        crops = torch.randint(0, resolution // 4, (batch, 2), generator=g)
        added = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.cat([sizes, crops, sizes], dim=1).float(),
        }
    return (sample, timesteps, context), added


def _reference_unet_output(reference, args, added, device: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        inputs = (t.to(device) for t in args)
        kwargs = {"added_cond_kwargs": {k: v.to(device) for k, v in added.items()}} if added else {}
        return _host(reference(*inputs, **kwargs).sample)


def _our_unet_output(ours: LoadedComponent, args, added) -> np.ndarray:
    # Placed leaf by leaf, so the host copy goes as it is placed: one copy of the weights at
    # the peak, not two (the full-size SDXL UNet is 10.3 GB in float32).
    memory.move_to_devices(ours, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    sample, timesteps, context = args
    out = jit(ours.module.apply)(
        {"params": ours.params},
        _nhwc(sample),
        jnp.asarray(timesteps.numpy()),
        jnp.asarray(context.numpy()),
        **{k: jnp.asarray(v.numpy()) for k, v in added.items()},
    )
    return _nchw(out)


def compare_unet(
    folder: Path,
    resolution: int,
    batch: int,
    seed: int,
    tolerance: float,
    dtype: str = "float32",
    device: str = "cpu",
) -> list[Comparison]:
    """eps prediction on random latents, timesteps and text states at ``resolution`` px; ours
    with params and compute in ``dtype``, the reference in float32 on torch's ``device``."""
    import torch
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(folder / "unet").float().eval().to(device)
    args, added = _unet_inputs(reference.config, resolution, batch, seed)
    expected = _reference_unet_output(reference, args, added, device)
    del reference
    _release_torch_memory(torch)
    ours = load_component(folder, "unet", dtype=dtype, compute_dtype=dtype)
    return [_compare("unet", "sample", _our_unet_output(ours, args, added), expected, tolerance)]


def compare_unet_in_memory(
    make_reference, resolution: int, batch: int, seed: int, tolerance: float
) -> Comparison:
    """`compare_unet` in float32 on a torch UNet that ``make_reference()`` builds, with no
    folder: after the reference runs, its weights are converted tensor by tensor as it lets
    go of them (one copy of the weights at the peak, and none written or read back: for a
    UNet too large to save and load in a test's time, as SDXL's 10 GB)."""
    import torch

    reference = make_reference().eval()
    raw = dict(reference.config)
    args, added = _unet_inputs(reference.config, resolution, batch, seed)
    expected = _reference_unet_output(reference, args, added, "cpu")
    state = reference.state_dict()
    del reference
    _release_torch_memory(torch)
    component = COMPONENTS["unet"]
    config = component.config_class.from_dict(raw, source="the reference's config")
    params = state_dict_to_params(
        ((name, state.pop(name).numpy()) for name in list(state)),
        abstract_params(component, config),
        source="the reference's state_dict",
    )
    ours = LoadedComponent(config, raw, build_module(component, config), params)
    del params  # the component's is the only reference: placing it frees the host copy
    return _compare("unet", "sample", _our_unet_output(ours, args, added), expected, tolerance)


def compare_vae(
    folder: Path, resolution: int, batch: int, seed: int, tolerance: float, device: str = "cpu"
) -> list[Comparison]:
    """Posterior mean and logvar of random images; decoding of the posterior mean. Both in
    float32 (the reference on torch's ``device``)."""
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    reference = TorchAutoencoderKL.from_pretrained(folder / "vae").float().eval().to(device)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, reference.config.in_channels, resolution, resolution, generator=g)
    images = images * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(images.to(device)).latent_dist
        decoded = _host(reference.decode(posterior.mean).sample)
    mean, logvar = _host(posterior.mean), _host(posterior.logvar)
    del reference, posterior
    _release_torch_memory(torch)
    ours = load_component(folder, "vae", compute_dtype="float32")
    variables = {"params": ours.params}
    encode = jit(lambda v, x: ours.module.apply(v, x, method=AutoencoderKL.encode))
    decode = jit(lambda v, z: ours.module.apply(v, z, method=AutoencoderKL.decode))
    got = encode(variables, _nhwc(images))
    out = decode(variables, _nhwc(mean))
    return [
        _compare("vae", "posterior.mean", _nchw(got.mean), mean, tolerance),
        _compare("vae", "posterior.logvar", _nchw(got.logvar), logvar, tolerance),
        _compare("vae", "decode", _nchw(out), decoded, tolerance),
    ]


def compare_text_encoder(
    folder: Path,
    prompts: Sequence[str],
    tolerance: float,
    dtype: str = "float32",
    device: str = "cpu",
    name: str = "text_encoder",
) -> list[Comparison]:
    """Last hidden state, the penultimate layer (SD-2's and SDXL's) and the pooled output on
    tokenized prompts: ``pooler_output`` for a CLIPTextModel, ``text_embeds`` (the projected
    pool) for a CLIPTextModelWithProjection (SDXL's ``text_encoder_2``, with ``tokenizer_2``).
    Ours with params and compute in ``dtype``, the reference in float32 on torch's ``device``."""
    import torch
    import transformers

    config = load_json(folder / name / "config.json")
    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    reference = getattr(transformers, architecture).from_pretrained(folder / name)
    reference = reference.float().eval().to(device)
    projected = architecture == "CLIPTextModelWithProjection"
    tokenizer = folder / name.replace("text_encoder", "tokenizer")
    ids = CLIPTokenizer.from_folder(tokenizer)(list(prompts))
    with torch.no_grad():
        tokens = torch.as_tensor(ids, dtype=torch.long, device=device)
        outputs = reference(tokens, output_hidden_states=True)
        pooled = outputs.text_embeds if projected else outputs.pooler_output
        expected = {
            "last_hidden_state": _host(outputs.last_hidden_state),
            "text_embeds" if projected else "pooler_output": _host(pooled),
            "hidden_states[-2]": _host(outputs.hidden_states[-2]),
        }
    del reference, outputs
    _release_torch_memory(torch)
    ours = load_component(folder, name, dtype=dtype, compute_dtype=dtype)
    apply = jit(ours.module.apply, static_argnames="output_hidden_states")
    out = apply({"params": ours.params}, jnp.asarray(ids), output_hidden_states=True)
    got = {
        "last_hidden_state": out.last_hidden_state,
        "text_embeds" if projected else "pooler_output": (
            out.text_embeds if projected else out.pooler_output
        ),
        "hidden_states[-2]": out.hidden_states[-2],
    }
    return [_compare(name, k, got[k], expected[k], tolerance) for k in expected]


PIPELINE_SCHEDULERS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "edm_euler": "EDMEulerScheduler",
}


# The samplers whole edits are compared with by default (PIPELINE_SCHEDULERS has them all).
PIPELINE_SAMPLERS = ("euler_ancestral", "euler", "ddim")


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
    dtype: str = "float32",
    negative_prompt: str | None = None,
    cosxl_edit: bool = False,
    guidance_rescale: float = 0.0,
    lora: Path | None = None,
    lora_scale: float = 1.0,
    fuse_lora: bool = False,
    **sdxl_options,
) -> tuple[np.ndarray, np.ndarray]:
    """The same edit by diffusers' StableDiffusionInstructPix2PixPipeline (float32) and by
    ours (computing in ``dtype``): identical initial latents and per-step noise (diffusers
    draws it from its generator in turn; a twin generator with the same seed hands our
    sampler the same numbers). ``sdxl_options`` (denoising_end, original_size,
    crops_coords_top_left, target_size) go to both pipelines under diffusers' names. With
    ``lora`` both load that LoRA file at ``lora_scale`` (diffusers: ``load_lora_weights``,
    then ``fuse_lora`` or the scale in ``cross_attention_kwargs``).
    Returns (ours, diffusers') images [B, H, W, 3] in [0, 1]."""
    import diffusers
    import torch

    from ip2p_jax.pipelines.auto import edit_pipeline_class, load_edit_pipeline
    from ip2p_jax.pipelines.sdxl_edit import SDXLEditPipeline

    sdxl = edit_pipeline_class(folder) is SDXLEditPipeline
    reference_class = (
        diffusers.StableDiffusionXLInstructPix2PixPipeline
        if sdxl
        else diffusers.StableDiffusionInstructPix2PixPipeline
    )
    reference = reference_class.from_pretrained(
        folder, **({"is_cosxl_edit": True} if cosxl_edit else {})
    )
    # SDXL's pipeline renders unet.sample_size x 8 unless told the image's size
    size = {"height": image.height, "width": image.width} if sdxl else {}
    scheduler_class = getattr(diffusers, PIPELINE_SCHEDULERS[sampler])
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config)
    lora_options = {}
    if lora is not None:
        reference.load_lora_weights(lora)
        if fuse_lora:
            reference.fuse_lora(lora_scale=lora_scale)
        else:
            lora_options = {"cross_attention_kwargs": {"scale": lora_scale}}
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
            negative_prompt=None if negative_prompt is None else [negative_prompt] * batch,
            **size,
            **({"guidance_rescale": guidance_rescale} if guidance_rescale else {}),
            **lora_options,
            **sdxl_options,
        ).images
    del reference
    gc.collect()
    ours = load_edit_pipeline(folder, dtype=dtype, cosxl_edit=cosxl_edit)
    if lora is not None:
        ours.load_lora(lora, scale=lora_scale)
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
        negative_prompt=negative_prompt,
        guidance_rescale=guidance_rescale,
        **sdxl_options,
    )
    return np.clip(edited / 2 + 0.5, 0, 1), expected


def compare_pipeline(
    folder: Path,
    resolution: int,
    seed: int,
    steps: int = 4,
    samplers: Sequence[str] = PIPELINE_SAMPLERS,
    dtype: str = "float32",
    cosxl_edit: bool = False,
) -> list[Comparison]:
    """Whole edits against diffusers' float32 ones, per sampler: mean abs difference on
    [0, 1] images within ``TOLERANCES[dtype].pipeline`` (1/255 in float32). ``cosxl_edit``:
    both pipelines in CosXL Edit mode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8))
    rows = []
    for sampler in samplers:
        ours, expected = edit_both(
            folder,
            sampler,
            image,
            ["make it snowy"],
            steps=steps,
            seed=seed,
            dtype=dtype,
            cosxl_edit=cosxl_edit,
        )
        bound = TOLERANCES[dtype].pipeline
        rows.append(_compare("pipeline", sampler, ours, expected, bound, metric="mean"))
    return rows


def run_parity(
    folder: str | Path,
    *,
    components: Sequence[str] | None = None,
    resolution: int = 256,
    batch: int = 2,
    seed: int = 0,
    tolerance: float | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    pipeline: bool = False,
    dtype: str = "float32",
    samplers: Sequence[str] = PIPELINE_SAMPLERS,
    cosxl_edit: bool = False,
) -> list[Comparison]:
    """Compares each component of a diffusers folder with the float32 PyTorch reference, ours
    computing the UNet and text encoder in ``dtype`` (the VAE in float32); ``tolerance``
    bounds each component output's max abs error (default: ``TOLERANCES[dtype]``, and
    float32's for the VAE)."""
    folder = Path(folder)
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(TOLERANCES)}")
    low = TOLERANCES[dtype].component if tolerance is None else tolerance
    exact = TOLERANCES["float32"].component if tolerance is None else tolerance
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    if components is None:  # those the folder has (SDXL's has text_encoder_2)
        components = [n for n in COMPONENT_NAMES if (folder / n / "config.json").is_file()]
    if unknown := set(components) - set(COMPONENT_NAMES):
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENT_NAMES}")
    for name in components:
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no {name}/config.json (a diffusers folder?)")
    results: list[Comparison] = []
    if "unet" in components:
        results += compare_unet(folder, resolution, batch, seed, low, dtype)
    if "vae" in components:
        results += compare_vae(folder, resolution, batch, seed, exact)
    for name in ("text_encoder", "text_encoder_2"):
        if name in components:
            results += compare_text_encoder(folder, prompts, low, dtype, name=name)
    if pipeline:
        results += compare_pipeline(
            folder, resolution, seed, samplers=samplers, dtype=dtype, cosxl_edit=cosxl_edit
        )
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


# The PyTorch reference training step -----------------------------------------------------


def torch_diffusion_loss(
    unet,
    scheduler,
    *,
    latents,
    image_latent,
    noise,
    text,
    null_text,
    timesteps,
    random_p,
    conditioning_dropout_prob: float = 0.05,
    prediction_type: str = "epsilon",
    added_cond_kwargs: dict | None = None,
):
    """The loss of diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py from encoded
    inputs (torch tensors, NCHW): the conditioning dropout of the original's ddpm_edit.py
    (r < 2p: the text becomes ``null_text``; p <= r < 3p: the image latent becomes zeros),
    ``DDPMScheduler.add_noise``, the 8-channel UNet and the epsilon / v MSE. ``latents`` are
    already scaled by the VAE factor. ``added_cond_kwargs`` (SDXL's text_embeds and time_ids)
    go to the UNet as they are, as train_instruct_pix2pix_sdxl.py's step passes them.
    Returns the scalar loss tensor (backward not taken)."""
    import torch
    import torch.nn.functional as F

    uncond = conditioning_dropout_prob
    bsz = latents.shape[0]
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    prompt_mask = (random_p < 2 * uncond).reshape(bsz, 1, 1)
    encoder_hidden_states = torch.where(prompt_mask, null_text, text)
    image_mask_dtype = image_latent.dtype
    image_mask = 1 - (
        (random_p >= uncond).to(image_mask_dtype) * (random_p < 3 * uncond).to(image_mask_dtype)
    )
    image_latent = image_mask.reshape(bsz, 1, 1, 1) * image_latent
    concatenated_noisy_latents = torch.cat([noisy_latents, image_latent], dim=1)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type must be epsilon or v_prediction: {prediction_type!r}")
    model_pred = unet(
        concatenated_noisy_latents,
        timesteps,
        encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
    ).sample
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


class TorchTrainStep:
    """One optimizer step of diffusers' train_instruct_pix2pix.py on a diffusers folder, in
    float32: the frozen AutoencoderKL (target = ``latent_dist.sample() * scaling_factor``,
    image latent = ``latent_dist.mode()``) and CLIPTextModel (``last_hidden_state``), the
    conditioning dropout against the encoding of "", noise, timesteps and the loss of
    `torch_diffusion_loss`, backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` with the
    script's warmup schedule, and ``EMAModel.step`` on the UNet's params: the same work per
    step as `ip2p_jax.train.step`. Random draws come from a seeded torch generator (not the
    same numbers as ours; the work doesn't depend on them).

    Call it with a host batch as ours takes it: uint8 ``input_image`` / ``edited_image``
    [B, H, W, 3] and int ``input_ids`` [B, 77]; it returns loss, grad_norm, learning_rate.
    ``device`` is torch's; ``dtype`` other than float32 is the script's mixed precision: the
    frozen encoders' weights in it and the UNet's fp32 weights under its autocast.
    (EMAModel's decay warmup lags ours by one update: 0 at its first, ours 0.1.)
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
        total_steps: int = 1000,
        decay_steps: int = 0,
        ema_decay: float = 0.9999,
        conditioning_dropout_prob: float = 0.05,
        prediction_type: str = "epsilon",
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        import torch
        from diffusers import AutoencoderKL as TorchAutoencoderKL
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from transformers import CLIPTextModel

        if schedule not in ("constant", "cosine", "wsd"):
            raise ValueError(f"schedule must be constant, cosine or wsd, got {schedule!r}")
        folder = Path(folder)
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        frozen = lambda model: model.to(self.dtype).to(self.device)
        self.vae = frozen(TorchAutoencoderKL.from_pretrained(folder / "vae"))
        self.text_encoder = frozen(CLIPTextModel.from_pretrained(folder / "text_encoder"))
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").float().to(self.device)
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.train()
        tokenizer_dir = folder / "tokenizer"
        tokenizer = (
            CLIPTokenizer.from_folder(tokenizer_dir)
            if tokenizer_dir.is_dir()
            else CLIPTokenizer.bundled()
        )
        with torch.no_grad():
            null_ids = torch.as_tensor(tokenizer([""]), dtype=torch.long, device=self.device)
            self.null_text = self.text_encoder(null_ids)[0]
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=learning_rate,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        if schedule == "wsd":  # diffusers has no warmup-stable-decay: its factor by hand

            def factor(step: int) -> float:
                if step < warmup_steps:
                    return step / warmup_steps
                return min(1.0, max(0.0, (total_steps - step) / max(decay_steps, 1)))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        else:
            self.lr_scheduler = get_scheduler(
                "constant_with_warmup" if schedule == "constant" else "cosine",
                optimizer=self.optimizer,
                num_warmup_steps=warmup_steps,
                num_training_steps=total_steps,
            )
        # foreach: the same update, batched over the params (on a GPU, many fewer kernels).
        foreach = self.device.type == "cuda"
        self.ema = (
            EMAModel(self.unet.parameters(), decay=ema_decay, foreach=foreach)
            if ema_decay
            else None
        )
        self.grad_clip = grad_clip
        self.conditioning_dropout_prob = conditioning_dropout_prob
        self.prediction_type = prediction_type
        self.generator = torch.Generator(self.device).manual_seed(seed)

    @classmethod
    def from_config(cls, folder: str | Path, config, seed: int | None = None) -> TorchTrainStep:
        """The reference step for one of our TrainConfigs (its optimizer, EMA, dropout)."""
        rates = config.dropout
        if not rates.text_only == rates.both == rates.image_only:
            raise ValueError(f"the reference drops with one probability p (p, p, p), not {rates}")
        optim = config.optim
        return cls(
            folder,
            learning_rate=optim.learning_rate,
            betas=(optim.b1, optim.b2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            grad_clip=optim.grad_clip,
            warmup_steps=optim.warmup_steps,
            schedule=optim.schedule,
            total_steps=config.steps,
            decay_steps=optim.decay_steps,
            ema_decay=config.ema_decay,
            conditioning_dropout_prob=rates.text_only,
            prediction_type=config.prediction_type,
            seed=config.seed if seed is None else seed,
        )

    def encode(self, batch: dict):
        """The frozen encoders -> (text states, scaled target latents, image latents)."""
        import torch

        def pixels(name):
            images = torch.from_numpy(np.ascontiguousarray(batch[name])).to(self.device)
            return images.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0

        with torch.no_grad():
            ids = torch.as_tensor(
                np.asarray(batch["input_ids"]), dtype=torch.long, device=self.device
            )
            text = self.text_encoder(ids)[0]
            posterior = self.vae.encode(pixels("edited_image")).latent_dist
            latents = posterior.sample(generator=self.generator) * self.vae.config.scaling_factor
            image_latent = self.vae.encode(pixels("input_image")).latent_dist.mode()
        return text, latents, image_latent

    def __call__(self, batch: dict) -> dict[str, float]:
        import torch

        text, latents, image_latent = self.encode(batch)
        bsz = latents.shape[0]
        generator, device = self.generator, self.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (bsz,), generator=generator, device=device).long()
        random_p = torch.rand(bsz, generator=generator, device=device)
        mixed = self.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.dtype, enabled=mixed):
            loss = self._loss(text, latents, image_latent, noise, timesteps, random_p)
        return self._update(loss)

    def _loss(self, text, latents, image_latent, noise, timesteps, random_p):
        return torch_diffusion_loss(
            self.unet,
            self.scheduler,
            latents=latents,
            image_latent=image_latent,
            noise=noise,
            text=text,
            null_text=self.null_text,
            timesteps=timesteps,
            random_p=random_p,
            conditioning_dropout_prob=self.conditioning_dropout_prob,
            prediction_type=self.prediction_type,
        )

    def _update(self, loss) -> dict[str, float]:
        import torch

        loss.backward()
        parameters = self.unet.parameters()
        max_norm = self.grad_clip if self.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "learning_rate": float(learning_rate),
        }
