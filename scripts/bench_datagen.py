"""Pair generation speed on this CPU: our Prompt-to-Prompt sampler (datagen.pairs) against
diffusers' StableDiffusionPipeline rendering the same two captions as a plain batch of two
(no attention borrowed, its default SDPA attention), in one run, on the tiny random SD.

    PYTHONPATH=. .venv/bin/python scripts/bench_datagen.py [--resolution 64 --steps 20]

Prints pairs/s for each, the ratio, and where our time goes: UNet calls (of which the
Prompt-to-Prompt bookkeeping: copying and mixing attention maps), and the rest (text
encoding, VAE decode, the CLIP filter's scoring). Model loading is excluded from the rates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8, help="pairs rendered per measurement")
    parser.add_argument("--pairs-per-call", type=int, default=4)
    parser.add_argument("--mode", default="self", choices=["self", "replace", "refine"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    from datagen.clip_filter import ClipSimilarity
    from datagen.pair_job import sample_seeds
    from datagen.pairs import PairConfig, PairSampler
    from ip2p_jax.testing.reference_models import build_clip_folder, build_pipeline_folder

    work = Path(tempfile.mkdtemp(prefix="bench_datagen_"))
    folder = build_pipeline_folder(work / "sd", "tiny", overrides={"unet": {"in_channels": 4}})
    clip = ClipSimilarity(build_clip_folder(work / "clip"))
    config = PairConfig(steps=args.steps, resolution=args.resolution, mode=args.mode)
    sampler = PairSampler(folder, config, pairs_per_call=args.pairs_per_call)
    captions = ("a red car parked on a street", "a blue car parked on a street")
    draws = [config.draw(seed) for seed in sample_seeds(0, 0, args.samples)]

    sampler.render(*captions, draws[: args.pairs_per_call])  # warm-up
    sampler.unet_seconds = sampler.controller.edit_seconds = 0.0
    start = time.perf_counter()
    images = sampler.render(*captions, draws)
    render_seconds = time.perf_counter() - start
    start = time.perf_counter()
    clip.scores(
        torch.from_numpy(images[:, 0]),
        torch.from_numpy(images[:, 1]),
        [captions[0]] * len(draws),
        [captions[1]] * len(draws),
    )
    clip_seconds = time.perf_counter() - start
    ours = render_seconds + clip_seconds

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    options = dict(height=args.resolution, width=args.resolution, num_inference_steps=args.steps)
    pipe(list(captions), **options)  # warm-up
    start = time.perf_counter()
    for draw in draws:
        pipe(list(captions), guidance_scale=draw.cfg_scale, output_type="np", **options)
    reference = time.perf_counter() - start

    n = len(draws)
    unet, edit = sampler.unet_seconds, sampler.controller.edit_seconds
    print(
        f"tiny SD, {args.resolution} px, {args.steps} Euler ancestral steps, mode {args.mode}, "
        f"{args.pairs_per_call} pairs per UNet call, {torch.get_num_threads()} threads, {n} pairs"
    )
    print(f"{'':34}{'pairs/s':>10}{'s/pair':>10}")
    print(f"{'ours: P2P sampler + CLIP scores':34}{n / ours:>10.3f}{ours / n:>10.3f}")
    print(f"{'diffusers pipeline, 2 captions':34}{n / reference:>10.3f}{reference / n:>10.3f}")
    print(f"ratio (our time / diffusers'): {ours / reference:.2f}")
    print("where our time goes:")
    for name, seconds in (
        ("UNet calls, without P2P bookkeeping", unet - edit),
        ("P2P bookkeeping (inside UNet calls)", edit),
        ("text, VAE decode, sampler arithmetic", render_seconds - unet),
        ("CLIP filter scores", clip_seconds),
    ):
        print(f"  {name:40}{seconds:8.2f} s {100 * seconds / ours:6.1f} %")


if __name__ == "__main__":
    main()
