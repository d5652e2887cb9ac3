"""``ip2p eval shapes`` and ``ip2p eval edits`` (``eval magicbrush``: eval_magicbrush.py).

eval shapes: the shapes world's held-out edits, scored against the exact truth (a table, and
with --json every score). eval edits: the paper's evaluation of a real model on an edit-pair
dataset; writes DIR/metrics.json (a row per sweep point, every example's scores), DIR/plot.png
(CLIP direction vs image similarity, one line per method) and DIR/grid.png (inputs, edits at
each scale, targets). Neither JAX nor torch is imported until a command runs (``--help`` stays
fast).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from ip2p_jax.apps.cli import eval_magicbrush
from ip2p_jax.apps.cli.arguments import (
    add_model_argument,
    add_precision_arguments,
    add_sampler_argument,
    add_scale_arguments,
    add_steps_argument,
    comma_floats,
    fill_model_defaults,
    precision_options,
)
from ip2p_jax.apps.shipped import REFERENCE_SAMPLING
from ip2p_jax.evaluation.sweep import DEFAULT_STRENGTHS, PAPER_IMAGE_SCALES, PAPER_TEXT_SCALES


def _run_shapes(args: argparse.Namespace) -> int:
    from ip2p_jax.evaluation.shapes import evaluate_shapes, format_table, write_report
    from ip2p_jax.pipelines.auto import load_edit_pipeline

    fill_model_defaults(args)
    options = {
        "steps": args.steps,
        "text_scale": args.text_scale,
        "image_scale": args.image_scale,
        "sampler": args.sampler,
    }
    pipe = load_edit_pipeline(args.model, **precision_options(args))
    table, results = evaluate_shapes(
        pipe,
        num=args.num,
        split=args.split,
        seed=args.seed,
        size=args.size,
        batch_size=args.batch_size,
        train_phrasing=args.train_phrasing,
        **options,
    )
    print(format_table(table))
    if args.json:
        settings = {
            "model": str(args.model),
            "num": args.num,
            "split": args.split,
            "train_phrasing": args.train_phrasing,
            "seed": args.seed,
        }
        write_report(args.json, table, results, {**settings, **options})
        print(f"wrote {args.json}")
    return 0


def _add_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ip2p eval shapes``: unset sampling options are the model's."""
    add_model_argument(parser)
    parser.add_argument("--num", type=int, default=200, help="examples")
    parser.add_argument("--split", default="heldout", choices=["heldout", "validation", "train"])
    parser.add_argument("--size", type=int, default=64, help="image side, pixels")
    add_steps_argument(parser)
    add_scale_arguments(parser)
    add_sampler_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    add_precision_arguments(parser)
    parser.add_argument(
        "--train-phrasing",
        action="store_true",
        help="say each held-out edit in its nearest training phrasing (same scenes and edits)",
    )
    parser.add_argument("--json", type=Path, help="also write the table and every score here")


def _add_edits_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ip2p eval edits``: the paper's settings, not the shapes model's."""
    parser.add_argument(
        "--model", required=True, help="InstructPix2Pix model: folder, hub id or checkpoint"
    )
    parser.add_argument("--data", required=True, type=Path, help="edit-pair dataset folder")
    parser.add_argument(
        "--clip", required=True, help="transformers CLIPModel folder (ViT-L/14: the paper's)"
    )
    parser.add_argument("--split", default="validation")
    parser.add_argument("--num", type=int, default=100, help="examples")
    parser.add_argument(
        "--order",
        default="first",
        choices=["first", "random"],
        help="the first examples, or the first of a permutation seeded by --seed",
    )
    parser.add_argument(
        "--image-scales",
        type=comma_floats,
        default=list(PAPER_IMAGE_SCALES),
        help="s_I values, comma-separated (default: the paper's 1.0,1.2,...,2.2)",
    )
    parser.add_argument(
        "--text-scales", type=comma_floats, default=list(PAPER_TEXT_SCALES), help="s_T values"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=256, help="square side, pixels")
    parser.add_argument("--seed", type=int, default=0, help="example k is edited with seed + k")
    parser.add_argument("--batch-size", type=int, default=8)
    add_precision_arguments(parser)
    parser.add_argument(
        "--sdedit", help="also run SDEdit with this 4-channel text-to-image SD model folder"
    )
    parser.add_argument(
        "--strengths", type=comma_floats, default=list(DEFAULT_STRENGTHS), help="SDEdit strengths"
    )
    parser.add_argument("--sdedit-scale", type=float, default=7.5, help="SDEdit's text CFG")
    parser.add_argument("--dino", help="also score DINO similarity with this ViT/DINOv2 folder")
    parser.add_argument("--grid-rows", type=int, default=4, help="examples in grid.png")
    parser.add_argument(
        "--metrics-device", default="cpu", help="torch device of CLIP/DINO (cpu, cuda)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/eval-edits"), help="output folder")
    add_sampler_argument(parser, REFERENCE_SAMPLING.sampler)


def run_edits(args: argparse.Namespace) -> int:
    """Runs the sweep; every input is checked before a model is compiled."""
    from ip2p_jax.diffusion.samplers import get_sampler
    from ip2p_jax.evaluation import sweep
    from ip2p_jax.evaluation.clip_metrics import EditScorer
    from ip2p_jax.evaluation.plots import plot_tradeoff, save_png, sweep_grid

    start = time.perf_counter()
    for name in ("steps", "batch_size", "grid_rows"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {getattr(args, name)}")
    get_sampler(args.sampler)
    points = sweep.ip2p_points(args.text_scales, args.image_scales)
    if args.sdedit:
        from ip2p_jax.pipelines.sdedit import check_text_to_image_model, kept_steps

        for strength in args.strengths:
            kept_steps(args.steps, strength)
        check_text_to_image_model(args.sdedit)
        points += sweep.sdedit_points(args.strengths, args.sdedit_scale)
    examples = sweep.load_examples(
        args.data,
        split=args.split,
        num=args.num,
        resolution=args.resolution,
        order=args.order,
        seed=args.seed,
    )
    print(f"{len(examples)} examples of {args.data} ({args.split}), {len(points)} sweep points")
    scorer = EditScorer(args.clip, dino=args.dino, device=args.metrics_device)

    def run(method: str, editor) -> sweep.SweepResult:
        return sweep.run_sweep(
            examples,
            scorer,
            {method: editor},
            [p for p in points if p.method == method],
            seed=args.seed,
            batch_size=args.batch_size,
            grid_rows=args.grid_rows,
            progress=True,
        )

    from ip2p_jax.pipelines.auto import load_edit_pipeline

    pipe = load_edit_pipeline(args.model, **precision_options(args))
    execution = pipe.unet.module.execution  # the dtype and kernel the backend chose
    results = [run(sweep.IP2P, sweep.ip2p_editor(pipe, steps=args.steps, sampler=args.sampler))]
    del pipe  # one model in memory at a time
    gc.collect()
    if args.sdedit:
        from ip2p_jax.pipelines.sdedit import SDEditPipeline

        sd = SDEditPipeline.from_pretrained(args.sdedit, **precision_options(args))
        results.append(
            run(sweep.SDEDIT, sweep.sdedit_editor(sd, steps=args.steps, sampler=args.sampler))
        )
        del sd
    result = sweep.SweepResult(
        rows=[row for r in results for row in r.rows],
        examples=[record for r in results for record in r.examples],
        grid_edits={p: edits for r in results for p, edits in r.grid_edits.items()},
    )
    settings = {
        "model": str(args.model),
        "data": str(args.data),
        "split": args.split,
        "num": len(examples),
        "order": args.order,
        "steps": args.steps,
        "sampler": args.sampler,
        "resolution": args.resolution,
        "seed": args.seed,
        "clip": str(args.clip),
        "dino": args.dino and str(args.dino),
        "sdedit": args.sdedit and str(args.sdedit),
        "dtype": execution.dtype,
        "attention": execution.attention,
    }
    out = Path(args.out)
    metrics, plot, grid = out / "metrics.json", out / "plot.png", out / "grid.png"
    sweep.write_metrics(metrics, result, settings)
    plot_tradeoff(result.rows, plot, title=f"{Path(str(args.model)).name} on {args.split}")
    shown = examples[: args.grid_rows]
    targets = None if any(e.target is None for e in shown) else [e.target for e in shown]
    sheet = sweep_grid([e.image for e in shown], result.grid_edits, targets)
    save_png(sheet, grid)
    print(sweep.format_table(result.rows))
    print(f"wrote {metrics}, {plot}, {grid} in {time.perf_counter() - start:.0f} s")
    return 0


def add_parsers(commands) -> None:
    """Registers ``eval`` with its worlds (shapes, edits, magicbrush) on ``commands``
    (add_subparsers())."""
    evaluate = commands.add_parser("eval", help="score edit quality")
    worlds = evaluate.add_subparsers(dest="world", required=True)
    shapes = worlds.add_parser(
        "shapes", help="the shapes world's held-out edits, scored against the exact truth"
    )
    _add_shapes_arguments(shapes)
    shapes.set_defaults(run=_run_shapes)
    edits = worlds.add_parser(
        "edits",
        help="a real model on an edit-pair dataset: the paper's CLIP metrics over s_I "
        "(and an SDEdit baseline), metrics.json, plot.png, grid.png",
    )
    _add_edits_arguments(edits)
    edits.set_defaults(run=run_edits)
    magicbrush = worlds.add_parser(
        "magicbrush",
        help="a model on the MagicBrush test set by its authors' protocol: single- and "
        "multi-turn edits, L1, L2, CLIP-I, CLIP-T, DINO",
    )
    eval_magicbrush.add_arguments(magicbrush)
    magicbrush.set_defaults(run=eval_magicbrush.run)
