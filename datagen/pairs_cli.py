"""`ip2p datagen pairs`: prompts JSONL -> Prompt-to-Prompt image pairs -> CLIP filter ->
the original folder layout (and, once every prompt is done, the TFDS dataset).

    ip2p datagen pairs --prompts prompts.jsonl --model SD15_DIR --clip CLIP_DIR \\
        --out pairs/ --dataset data/ [--shard i --num-shards n] [--ray [ADDRESS]]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datagen.pair_job import JobSpec

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
    parser.add_argument(
        "--clip-img-threshold",
        type=float,
        default=0.75,
        help="image-image sim (the paper's 0.75; the released script's 0.7)",
    )
    parser.add_argument("--shard", type=int, default=0, help="this job's shard index")
    parser.add_argument("--num-shards", type=int, default=1, help="jobs sharing the prompts")
    parser.add_argument("--seed", type=int, default=0, help="job seed: fixes every sample seed")
    parser.add_argument("--pairs-per-call", type=int, default=1, help="samples per UNet call")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="diffusers VAE folder to decode with (the "
        "original used stabilityai/sd-vae-ft-mse); default: the model's own",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: one worker per GPU (per node where there are none); ADDRESS joins a "
        "cluster (auto, ray://head:10001), none starts one here (or joins $RAY_ADDRESS)",
    )
    parser.add_argument("--workers", type=int, default=None, help="Ray workers (default: above)")
    parser.add_argument(
        "--max-failed",
        type=float,
        default=0.01,
        help="fraction of attempted prompts that may fail before the job exits non-zero",
    )
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true")


def _job_spec(args: argparse.Namespace) -> JobSpec:
    """The job from the options; every bad option fails here, before any model loads."""
    from datagen.clip_filter import FilterConfig
    from datagen.pair_job import JobSpec
    from datagen.pairs import PairConfig, check_folders

    check_folders(args.model, args.vae)
    if args.samples < 1 or args.keep < 1:
        raise ValueError(f"--samples and --keep must be positive, got {args.samples}, {args.keep}")
    if not 0 <= args.max_failed <= 1:
        raise ValueError(f"--max-failed is a fraction in [0, 1], got {args.max_failed}")
    if args.workers is not None and args.ray is None:
        raise ValueError("--workers is the number of Ray workers: it needs --ray")
    return JobSpec(
        model=str(args.model),
        clip=str(args.clip),
        out=str(args.out),
        config=PairConfig(
            steps=args.steps,
            resolution=args.resolution,
            min_p2p=args.min_p2p,
            max_p2p=args.max_p2p,
            min_cfg=args.min_cfg,
            max_cfg=args.max_cfg,
            mode=args.mode,
        ),
        filter_config=FilterConfig(
            args.clip_threshold, args.clip_dir_threshold, args.clip_img_threshold, args.keep
        ),
        samples=args.samples,
        seed=args.seed,
        vae=None if args.vae is None else str(args.vae),
        device=args.device,
        dtype=args.dtype,
        pairs_per_call=args.pairs_per_call,
    )


def run_pairs(args: argparse.Namespace) -> int:
    """Runs the job for this shard, in this process or on Ray; builds the dataset when asked
    and every prompt is done. Exits non-zero when more than --max-failed of the prompts it
    attempted failed."""
    from datagen.pair_job import build_runner, run_locally, shard_indices
    from datagen.prompts import read_prompts
    from datagen.writer import PairFolder
    from ip2p_jax.data.importers import write_seeds_json

    prompts = read_prompts(args.prompts)
    spec = _job_spec(args)
    indices = shard_indices(len(prompts), args.shard, args.num_shards)
    if args.ray is not None:
        from datagen.ray_pairs import import_ray, run_on_ray

        import_ray()  # a missing Ray fails before the recipe's fingerprints are computed
    out = PairFolder(args.out, spec.recipe())
    progress = not args.no_progress
    if args.ray is not None:
        address = args.ray or None
        summary = run_on_ray(
            spec, prompts, indices, address=address, workers=args.workers, progress=progress
        )
    else:
        summary = run_locally(build_runner(spec), prompts, indices, progress)
    job = f"shard-{args.shard:05d}-of-{args.num_shards:05d}"
    summary_path = out.write_job_summary(job, summary.to_json())
    print(summary.describe())
    print(f"job summary: {summary_path}")
    write_seeds_json(args.out)
    if summary.failed_fraction > args.max_failed:
        print(
            f"error: {len(summary.failures)} of the prompts attempted failed "
            f"({summary.failed_fraction:.1%}, above --max-failed {args.max_failed:.1%}); "
            f"their reasons are in {summary_path}. Fix the cause and rerun the same command: "
            "done prompts are skipped, failed ones tried again."
        )
        return 1
    if args.dataset is not None:
        missing = [i for i in range(len(prompts)) if not out.is_done(i)]
        if missing:
            print(
                f"{len(missing)} prompts are not done yet (other shards, or failed); build the "
                f"dataset when they are: ip2p datagen import original {args.out} --out "
                f"{args.dataset}"
            )
            return 0
        from ip2p_jax.data import build  # TFDS: imported only to write the dataset

        path, reports = build.import_original(args.out, args.dataset, overwrite=args.overwrite)
        for report in reports:
            print(report.summary())
        print(build.describe(path))
    return 0
