"""``ip2p eval magicbrush``: a model on the MagicBrush test set, by the MagicBrush protocol.

Edits every session (single-turn, multi-turn or both) into OUT/images in the naming of the
MagicBrush evaluation script, then scores L1, L2, CLIP-I, CLIP-T and DINO as that script
does; writes OUT/metrics.json (per-setting means and every pair's scores) and prints a table.
A rerun edits only the images still missing. Neither JAX nor torch is imported before the
command runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ip2p_jax.apps.cli.arguments import (
    add_model_argument,
    add_precision_arguments,
    add_sampler_argument,
    add_scale_arguments,
    add_steps_argument,
    fill_model_defaults,
    precision_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ip2p eval magicbrush``; unset sampling options are the model's (for
    a given model the reference's, which are the MagicBrush edit script's too)."""
    add_model_argument(parser)
    parser.add_argument(
        "--data", required=True, type=Path, help="the MagicBrush test folder (edit_sessions.json)"
    )
    parser.add_argument(
        "--clip", help="transformers CLIPModel folder for CLIP-I and CLIP-T (clip-vit-base-patch32)"
    )
    parser.add_argument("--dino", help="transformers ViTModel folder for DINO (dino-vits16)")
    parser.add_argument(
        "--turns",
        default="both",
        choices=["single", "multi", "both"],
        help="single-turn (each turn from its ground-truth input), multi-turn (each turn "
        "from the model's previous output), or both",
    )
    parser.add_argument(
        "--captions",
        default="local",
        choices=["local", "global"],
        help="the target descriptions CLIP-T compares with (the script's README: local)",
    )
    parser.add_argument("--num", type=int, help="only the first N sessions (default: all)")
    add_steps_argument(parser)
    add_scale_arguments(parser)
    add_sampler_argument(parser)
    parser.add_argument("--resolution", type=int, help="long side the inputs are fitted to")
    parser.add_argument("--seed", type=int, default=0, help="every edit's seed, as the script")
    parser.add_argument("--batch-size", type=int, default=8)
    add_precision_arguments(parser)
    parser.add_argument(
        "--metrics-device", default="cpu", help="torch device of CLIP/DINO (cpu, cuda)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/eval-magicbrush"), help="output folder"
    )


def run(args: argparse.Namespace) -> int:
    """Checks the data and the scoring models, edits what is missing, scores, reports."""
    from ip2p_jax.evaluation import magicbrush
    from ip2p_jax.evaluation.magicbrush_layout import read_layout
    from ip2p_jax.evaluation.magicbrush_metrics import MagicBrushScorer

    start = time.perf_counter()
    fill_model_defaults(args)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    magicbrush.edit_size(1, 1, args.resolution)  # a resolution the script's fit can use
    settings = magicbrush.TURN_CHOICES[args.turns]
    captions = args.captions if args.clip else None
    sessions = read_layout(args.data, captions=captions, num=args.num)
    turns = sum(len(s.turns) for s in sessions)
    print(f"{len(sessions)} sessions, {turns} turns of {args.data}")
    edit_settings = {
        "model": str(args.model),
        "steps": args.steps,
        "text_scale": args.text_scale,
        "image_scale": args.image_scale,
        "sampler": args.sampler,
        "seed": args.seed,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "attention": args.attention,
    }
    out = Path(args.out)
    images = out / "images"
    magicbrush.check_settings(out, edit_settings)
    scorer = MagicBrushScorer(args.clip, args.dino, device=args.metrics_device)
    waves = magicbrush.plan_waves(sessions, images, settings)
    if any(not job.out.exists() for wave in waves for job in wave):
        from ip2p_jax.pipelines.auto import load_edit_pipeline

        pipe = load_edit_pipeline(args.model, **precision_options(args))
        editor = magicbrush.pipeline_editor(
            pipe,
            steps=args.steps,
            text_scale=args.text_scale,
            image_scale=args.image_scale,
            sampler=args.sampler,
            seed=args.seed,
            resolution=args.resolution,
        )
        edited, skipped = magicbrush.generate(
            sessions, editor, images, settings=settings, batch_size=args.batch_size
        )
        del pipe
    else:
        edited, skipped = 0, sum(len(wave) for wave in waves)
    print(f"edited {edited} images ({skipped} were there already)")
    result = magicbrush.score(sessions, images, scorer, settings=settings)
    report_settings = {
        **edit_settings,
        "data": str(args.data),
        "sessions": len(sessions),
        "turns": args.turns,
        "captions": captions,
        "clip": args.clip and str(args.clip),
        "dino": args.dino and str(args.dino),
    }
    metrics = out / "metrics.json"
    magicbrush.write_metrics(metrics, result, report_settings)
    print(magicbrush.format_table(result["summary"]))
    print(f"wrote {metrics} in {time.perf_counter() - start:.0f} s")
    return 0
