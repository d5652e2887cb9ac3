"""`ip2p datagen pairs`: prompts JSONL -> Prompt-to-Prompt image pairs -> CLIP filter ->
the original folder layout (and, once every prompt is done, the TFDS dataset).

    ip2p datagen pairs --prompts prompts.jsonl --model SD15_DIR --clip CLIP_DIR \\
        --out pairs/ --dataset data/ [--shard i --num-shards n]
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("float32", "float16", "bfloat16")


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ip2p datagen pairs`; defaults are the original generator's."""
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL: input, edit, output")
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD folder (4 ch)")
    parser.add_argument("--clip", type=Path, required=True, help="transformers CLIPModel folder")
    parser.add_argument("--out", type=Path, required=True, help="pair folder (original layout)")
    parser.add_argument("--dataset", type=Path, default=None, help="TFDS folder to build at end")
    parser.add_argument("--samples", type=int, default=100, help="samples rendered per prompt")
    parser.add_argument("--keep", type=int, default=4, help="pairs kept per prompt at most")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mode", choices=["self", "replace", "refine"], default="self")
    parser.add_argument("--min-p2p", type=float, default=0.1)
    parser.add_argument("--max-p2p", type=float, default=0.9)
    parser.add_argument("--min-cfg", type=float, default=7.5)
    parser.add_argument("--max-cfg", type=float, default=15.0)
    parser.add_argument("--clip-threshold", type=float, default=0.2, help="image-caption sims")
    parser.add_argument("--clip-dir-threshold", type=float, default=0.2, help="direction sim")
    parser.add_argument("--clip-img-threshold", type=float, default=0.75, help="image-image sim")
    parser.add_argument("--shard", type=int, default=0, help="this job's shard index")
    parser.add_argument("--num-shards", type=int, default=1, help="jobs sharing the prompts")
    parser.add_argument("--seed", type=int, default=0, help="job seed: fixes every sample seed")
    parser.add_argument("--pairs-per-call", type=int, default=1, help="samples per UNet call")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true")


def run_pairs(args: argparse.Namespace) -> int:
    """Runs the job for this shard; builds the dataset when asked and every prompt is done."""
    import torch

    from datagen.clip_filter import ClipSimilarity, FilterConfig
    from datagen.pair_job import generate_pairs, recipe
    from datagen.pairs import PairConfig, PairSampler
    from datagen.prompts import read_prompts
    from datagen.writer import PairFolder
    from ip2p_jax.data import build
    from ip2p_jax.data.importers import write_seeds_json

    # Everything that can be wrong with the options fails here, before any model loads.
    prompts = read_prompts(args.prompts)
    config = PairConfig(
        steps=args.steps,
        resolution=args.resolution,
        min_p2p=args.min_p2p,
        max_p2p=args.max_p2p,
        min_cfg=args.min_cfg,
        max_cfg=args.max_cfg,
        mode=args.mode,
    )
    filter_config = FilterConfig(
        args.clip_threshold, args.clip_dir_threshold, args.clip_img_threshold, args.keep
    )
    if args.samples < 1 or args.keep < 1:
        raise ValueError(f"--samples and --keep must be positive, got {args.samples}, {args.keep}")
    job_recipe = recipe(
        config,
        filter_config,
        samples=args.samples,
        seed=args.seed,
        model=args.model,
        clip=args.clip,
    )
    out = PairFolder(args.out, job_recipe)
    sampler = PairSampler(
        args.model,
        config,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        pairs_per_call=args.pairs_per_call,
    )
    clip = ClipSimilarity(args.clip, device=args.device)
    summary = generate_pairs(
        prompts,
        sampler,
        clip,
        out,
        samples=args.samples,
        filter_config=filter_config,
        shard=args.shard,
        num_shards=args.num_shards,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(summary.describe())
    write_seeds_json(args.out)
    if args.dataset is not None:
        missing = [i for i in range(len(prompts)) if not out.is_done(i)]
        if missing:
            print(
                f"{len(missing)} prompts are not done yet (other shards?); build the dataset "
                f"when they are: ip2p datagen import original {args.out} --out {args.dataset}"
            )
            return 0
        path, reports = build.import_original(args.out, args.dataset, overwrite=args.overwrite)
        for report in reports:
            print(report.summary())
        print(build.describe(path))
    return 0
