"""The cost per 1000 kept pairs of `ip2p datagen pairs`: (a) measured on this CPU with the tiny
random models, through the job's own code path; (b) estimated from FLOPs for the real SD-1.5
at 512 px on an NVIDIA H100 and H200.

    PYTHONPATH=. .venv/bin/python scripts/datagen_cost.py
    PYTHONPATH=. .venv/bin/python scripts/datagen_cost.py --prompts 8 --samples 4 --steps 20 \
        --resolution 64 --samples-per-kept 25 --mfu 0.3 0.5

(a) The tiny SD (4-channel UNet) and tiny CLIP are saved in a temp dir and a job runs as
`ip2p datagen pairs` runs one (JobSpec -> PairFolder -> build_runner -> run_locally): rendering,
the CLIP filter's scores, JPEG writing; model loading is not timed. The random CLIP's scores
mean nothing, so the filter passes every sample (thresholds -1) and keeps 1 per prompt: the
run's kept count is no yield. Kept-pair figures take the yield from `--samples-per-kept`
instead: the original rendered 100 samples a prompt and kept at most 4, so 25 rendered
samples per kept pair at best. Prompts where fewer than 4 pass the filter keep fewer, so the
true figure is higher and every kept-pair cost here is a lower bound. The tiny model's
seconds say what the pipeline's overhead costs on this CPU, not what SD-1.5 would.

(b) FLOPs per rendered sample (one pair of images), with the original's settings (100 steps,
one pair per UNet call, 100 samples a prompt):

    steps x UNet(4 rows: unconditional and conditional, input and edited caption;
                 64x64x4 latents, 77 text tokens)
    + VAE decoder(2 images at 512 px)
    + CLIP ViT-L/14 image tower(2 images at 224 px)    [the filter]
    + CLIP ViT-L/14 text tower(2 captions)              [the filter encodes them per sample]
    + SD text encoder(2 captions) / samples per prompt  [once per prompt]

The UNet, the VAE decoder and the text encoder are XLA's cost analysis (a dot or convolution
counted as 2 x multiply-adds) of our Flax models in the SD-1.5 architecture (reference_models'
"sd15" preset, in_channels 4), lowered from abstract params (jax.eval_shape) in bf16 with
XLA's attention: nothing is allocated. CLIP's text tower is SD-1.5's text encoder's
architecture (12 layers, width 768, 77 tokens), so it takes that count too. We have no Flax
CLIP image tower; its FLOPs are 2 x 303M params x 257 tokens (16 x 16 patches of 14 px and
the class token) for the matmuls, plus 4 x 24 layers x 257^2 x 1024 for the attention scores
and their weighted sum: 162 GFLOP an image. Time = FLOPs / (dense bf16 peak x MFU); it assumes
the job runs in bf16 or fp16 (`--dtype`; its default float32 does not run at this peak).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import torch

from datagen.clip_filter import FilterConfig
from datagen.pair_job import JobSpec, PairSummary, build_runner, run_locally
from datagen.pairs import PairConfig
from datagen.writer import PairFolder
from ip2p_jax.runtime.profile import profile_for
from ip2p_jax.testing.reference_models import PRESETS, build_clip_folder, build_pipeline_folder
from ip2p_jax.weights.model_folder import abstract_component

# (input caption, instruction, edited caption): the measured job's prompts, cycled.
PROMPTS = [
    ("a red car parked on a street", "make it blue", "a blue car parked on a street"),
    ("a cat sleeping on a sofa", "turn it into a dog", "a dog sleeping on a sofa"),
    ("a house in a snowy forest", "make it summer", "a house in a green summer forest"),
    ("a bowl of apples on a table", "make them oranges", "a bowl of oranges on a table"),
    ("a portrait of an old man", "give him a hat", "a portrait of an old man wearing a hat"),
    ("a beach at sunset", "add a sailboat", "a beach at sunset with a sailboat"),
    ("a city street at night", "make it rain", "a rainy city street at night"),
    ("a mountain lake in the morning", "make it autumn", "a mountain lake in autumn"),
]
# Every random-CLIP score passes (cosines are >= -1); one pair kept a prompt.
PERMISSIVE = FilterConfig(min_caption_sim=-1.0, min_direction_sim=-1.0, min_image_sim=-1.0, keep=1)
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s: the H200 is the H100's compute with
# more and faster memory.
GPUS = {"H100 SXM": 989.0, "H200": 989.0}
# CLIP ViT-L/14 image tower: params (with its projection), tokens at 224 px, layers, width.
CLIP_VISION_PARAMS = 303e6
CLIP_VISION_TOKENS = (224 // 14) ** 2 + 1
CLIP_VISION_LAYERS, CLIP_VISION_WIDTH = 24, 1024


@dataclass
class Measurement:
    """A timed job on this CPU."""

    seconds: float
    unet_seconds: float
    threads: int
    summary: PairSummary


def measure(args: argparse.Namespace) -> Measurement:
    """Runs a job over `args.prompts` prompts on the tiny random models; times it without
    model loading."""
    work = Path(tempfile.mkdtemp(prefix="datagen_cost_"))
    try:
        model = build_pipeline_folder(work / "sd", "tiny", overrides={"unet": {"in_channels": 4}})
        spec = JobSpec(
            model=str(model),
            clip=str(build_clip_folder(work / "clip")),
            out=str(work / "pairs"),
            config=PairConfig(steps=args.steps, resolution=args.resolution),
            filter_config=PERMISSIVE,
            samples=args.samples,
            pairs_per_call=args.pairs_per_call,
        )
        PairFolder(spec.out, spec.recipe())  # the driver's part: the runner's folder reads it
        runner = build_runner(spec)
        prompts = [
            dict(zip(("input", "edit", "output"), PROMPTS[i % len(PROMPTS)], strict=True))
            for i in range(args.prompts)
        ]
        # torch's first calls pay one-time setup that a long job does not
        runner.sampler.render(prompts[0]["input"], prompts[0]["output"], [spec.config.draw(0)])
        runner.sampler.unet_seconds = 0.0
        start = time.perf_counter()
        summary = run_locally(runner, prompts, range(len(prompts)), progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if summary.failures:
        raise RuntimeError(f"the measured job failed: {summary.describe()}")
    return Measurement(seconds, runner.sampler.unet_seconds, torch.get_num_threads(), summary)


def lowered_flops(function: Callable, *args) -> float:
    """XLA's FLOP count of `function` lowered (not compiled) for these abstract args."""
    return float(jax.jit(function).lower(*args).cost_analysis()["flops"])


def sd15_flops(resolution: int, unet_rows: int) -> dict[str, float]:
    """FLOPs of one UNet call over `unet_rows` rows, one VAE decode of 2 images and one text
    encoding of 2 captions, SD-1.5 at `resolution` px, bf16, from shapes alone."""
    # bf16 compute as on a GPU; XLA's attention, as cuDNN's kernel lowers only on a GPU
    profile = profile_for("gpu", attention_kernel="dot_product")
    preset = PRESETS["sd15"]
    raw = {"unet": {**preset["unet"], "in_channels": 4}, "vae": preset["vae"]}
    raw["text_encoder"] = preset["text_encoder"]
    # inference weights in bf16, so no float32 -> bf16 converts are counted
    models = {
        name: abstract_component(name, config, profile, param_dtype="bfloat16")
        for name, config in raw.items()
    }
    params = {name: model.params for name, model in models.items()}
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    tokens = text.config.max_position_embeddings
    shape = lambda *dims, dtype=jnp.float32: jax.ShapeDtypeStruct(dims, jnp.dtype(dtype))
    return {
        "unet": lowered_flops(
            lambda p, x, t, c: unet.module.apply({"params": p}, x, t, c),
            params["unet"],
            shape(unet_rows, side, side, unet.config.in_channels),
            shape(unet_rows),
            shape(unet_rows, tokens, unet.config.cross_attention_dim, dtype=jnp.bfloat16),
        ),
        "vae_decoder": lowered_flops(
            lambda p, z: vae.module.apply({"params": p}, z, method="decode"),
            params["vae"],
            shape(2, side, side, vae.config.latent_channels),
        ),
        "text_encoder": lowered_flops(
            lambda p, ids: text.module.apply({"params": p}, ids).last_hidden_state,
            params["text_encoder"],
            shape(2, tokens, dtype=jnp.int32),
        ),
    }


def clip_image_flops(images: int) -> float:
    """CLIP ViT-L/14 image tower at 224 px: 2 x params x tokens for the matmuls, plus
    4 x layers x tokens^2 x width for the attention scores and their weighted sum."""
    n = CLIP_VISION_TOKENS
    matmuls = 2 * CLIP_VISION_PARAMS * n
    attention = 4 * CLIP_VISION_LAYERS * n**2 * CLIP_VISION_WIDTH
    return images * (matmuls + attention)


def print_measured(m: Measurement, args: argparse.Namespace) -> None:
    summary = m.summary
    per_sample = m.seconds / summary.samples
    per_kept = per_sample * args.samples_per_kept
    core_hours = 1000 * per_kept * m.threads / 3600
    print(
        f"(a) measured: tiny random SD + CLIP, {args.resolution} px, {args.steps} steps, "
        f"{args.pairs_per_call} pair(s) per UNet call, {m.threads} torch threads, this CPU"
    )
    print(
        f"    {summary.prompts} prompts x {args.samples} samples = {summary.samples} samples in "
        f"{m.seconds:.1f} s (model loading excluded), UNet calls "
        f"{100 * m.unet_seconds / m.seconds:.0f} % of it"
    )
    print(
        f"    kept {summary.kept}: the filter passes all and keeps 1 a prompt (random CLIP), "
        f"so the kept figures take {args.samples_per_kept:g} samples per kept pair"
    )
    rows = [
        ("s / rendered sample (pair of images)", f"{per_sample:.3f}"),
        (f"s / kept pair (x {args.samples_per_kept:g} samples)", f"{per_kept:.2f}"),
        (f"CPU-core-hours / 1000 kept pairs ({m.threads} cores)", f"{core_hours:.2f}"),
    ]
    for name, value in rows:
        print(f"    {name:<46}{value:>10}")


def print_estimate(flops: dict[str, float], args: argparse.Namespace) -> None:
    steps, samples = args.sd15_steps, args.sd15_samples
    rows = 4 * args.pairs_per_call
    parts = [
        (
            f"UNet: {steps} steps x {flops['unet'] / 1e9:,.0f} GFLOP ({rows} rows)",
            steps * flops["unet"] / args.pairs_per_call,
        ),
        (f"VAE decoder: 2 images at {args.sd15_resolution} px", flops["vae_decoder"]),
        ("CLIP filter, ViT-L/14 image tower: 2 images", clip_image_flops(2)),
        ("CLIP filter, text tower: 2 captions", flops["text_encoder"]),
        (f"SD text encoder: 2 captions / {samples} samples", flops["text_encoder"] / samples),
    ]
    total = sum(value for _, value in parts)
    print(
        f"(b) estimated: SD-1.5 at {args.sd15_resolution} px, {steps} Euler ancestral steps, "
        f"{args.pairs_per_call} pair(s) per UNet call, {samples} samples a prompt, bf16"
    )
    print(f"    {'FLOPs per rendered sample (pair of images)':<52}{'TFLOP':>10}{'share':>9}")
    for name, value in parts:
        print(f"    {name:<52}{value / 1e12:>10.4f}{100 * value / total:>8.2f}%")
    print(f"    {'total':<52}{total / 1e12:>10.4f}")
    header = ("GPU", "bf16 TFLOP/s", "MFU", "s/sample", "s/kept pair", "GPU-h/1000 kept")
    print(f"    {header[0]:<10}" + "".join(f"{h:>16}" for h in header[1:]))
    for gpu, peak in GPUS.items():
        for mfu in args.mfu:
            per_sample = total / (peak * 1e12 * mfu)
            per_kept = per_sample * args.samples_per_kept
            cells = (f"{peak:g}", f"{mfu:g}", f"{per_sample:.3f}", f"{per_kept:.2f}")
            cells += (f"{1000 * per_kept / 3600:.2f}",)
            print(f"    {gpu:<10}" + "".join(f"{c:>16}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the measured job")
    parser.add_argument("--samples", type=int, default=4, help="measured samples per prompt")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--resolution", type=int, default=64, help="measured resolution, px")
    parser.add_argument("--pairs-per-call", type=int, default=1, help="samples per UNet call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (measured)")
    parser.add_argument(
        "--samples-per-kept",
        type=float,
        default=25.0,
        help="rendered samples per kept pair: the original's 100 a prompt for at most 4 "
        "kept is 25 at best, so the costs are lower bounds",
    )
    parser.add_argument("--sd15-steps", type=int, default=100, help="estimated steps")
    parser.add_argument("--sd15-resolution", type=int, default=512, help="estimated px")
    parser.add_argument("--sd15-samples", type=int, default=100, help="estimated per prompt")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--skip-measure", action="store_true", help="only the estimate")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if not args.skip_measure:
        print_measured(measure(args), args)
        print()
    print_estimate(sd15_flops(args.sd15_resolution, 4 * args.pairs_per_call), args)
    print(f"\n(run time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
