"""Options the ``ip2p`` subcommands share: the model, how it samples, and their defaults.

No --model means the bundled shapes model, sampled as its quality table was measured
(shipped.SHAPES_SAMPLING); a given model gets the reference's settings. The options leave a
setting unset (None) and ``fill_model_defaults`` fills it once the model is known. Nothing here
imports JAX: ``ip2p --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ip2p_jax.apps.shipped import (
    REFERENCE_SAMPLING,
    SHAPES_SAMPLING,
    sampling_defaults,
    shipped_model,
)

# ip2p_jax.diffusion.samplers.SAMPLERS' names, written out: importing it would load JAX for --help.
SAMPLER_NAMES = ("euler_ancestral", "euler", "ddim", "dpmpp_2m", "edm_euler")
# The dtypes a checkpoint's params can be stored or loaded in, and models compute in.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# ip2p_jax.models.attention.KERNELS' names, written out for the same reason.
ATTENTION_NAMES = ("blockwise", "cudnn", "dot_product", "pallas_tpu")


def comma_floats(text: str) -> list[float]:
    """An argparse type: "1,1.5,2" -> [1.0, 1.5, 2.0]; at least one number."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _default_help(name: str) -> str:
    """'default: X; Y for the shapes model', from the two SamplingDefaults."""
    ours, theirs = getattr(SHAPES_SAMPLING, name), getattr(REFERENCE_SAMPLING, name)
    return f"default: {theirs}" + ("" if ours == theirs else f"; {ours} for the shapes model")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="model folder, hub id or checkpoint (default: the bundled shapes model)"
    )


def add_steps_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help=f"sampling steps ({_default_help('steps')})")


def add_sampler_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--sampler; with no default, fill_model_defaults picks the model's."""
    help_text = _default_help("sampler") if default is None else None
    parser.add_argument("--sampler", default=default, choices=SAMPLER_NAMES, help=help_text)


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-scale", type=float, help=f"s_T ({_default_help('text_scale')})")
    parser.add_argument("--image-scale", type=float, help=f"s_I ({_default_help('image_scale')})")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --attention: how the models compute (None: the backend's choice)."""
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="UNet and text encoder params and compute dtype (default: float32 on a CPU, "
        "bfloat16 on GPUs and TPUs; the VAE and the sampler stay float32)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_NAMES,
        help="attention kernel (default: the backend's: blockwise on a CPU, cudnn on GPUs, "
        "pallas_tpu on TPUs)",
    )


def precision_options(args: argparse.Namespace) -> dict:
    """``from_pretrained``'s keywords from :func:`add_precision_arguments`' options."""
    return {"dtype": args.dtype, "attention": args.attention}


def add_cosxl_argument(parser: argparse.ArgumentParser) -> None:
    """--cosxl-edit: diffusers' is_cosxl_edit, which a saved folder does not record."""
    parser.add_argument(
        "--cosxl-edit",
        action="store_true",
        help="the model is a CosXL Edit (SDXL, EDM scheduler; use --sampler edm_euler)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --steps, --sampler, --cosxl-edit, --resolution, --negative-prompt,
    --guidance-rescale, --seed, --lora, --lora-scale (edit, grid)."""
    add_model_argument(parser)
    add_steps_argument(parser)
    add_sampler_argument(parser)
    add_cosxl_argument(parser)
    parser.add_argument(
        "--resolution", type=int, help=f"long side, pixels ({_default_help('resolution')})"
    )
    parser.add_argument(
        "--negative-prompt",
        default=None,
        help="default: none (the empty prompt's text; for SDXL zeros, as diffusers)",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="0 to 1: pull the guided prediction towards the text branch's scale, as "
        "diffusers' guidance_rescale (0, the default, leaves it as it is)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lora",
        type=Path,
        help="a LoRA .safetensors file (diffusers', PEFT's or kohya's layout) merged into the "
        "model's weights",
    )
    parser.add_argument(
        "--lora-scale", type=float, default=1.0, help="the LoRA's weight (diffusers' lora_scale)"
    )


def fill_model_defaults(args: argparse.Namespace) -> None:
    """No --model: the bundled shapes model, sampled as its quality table was measured
    (shipped.SHAPES_SAMPLING) where the arguments leave a setting open. With a model: the
    reference's settings (100 steps at 512 px, s_T 7.5, s_I 1.5)."""
    shipped = args.model is None
    if shipped:
        args.model = shipped_model()
    defaults = sampling_defaults(shipped, getattr(args, "cosxl_edit", False))
    for field in dataclasses.fields(defaults):
        if getattr(args, field.name, 0) is None:
            setattr(args, field.name, getattr(defaults, field.name))
