"""``ip2p edit``, ``grid``, ``app`` and ``demo``: a model edits images by instruction.

edit: one image, or a manifest of many (resumable); grid: one edit over a grid of s_T x s_I;
app: a Gradio page; demo: the bundled shapes model on the bundled scenes (or, with
--random-weights, a random-weight model built, converted and checked). The model and its
sampling options are arguments.py's. JAX is imported when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from ip2p_jax.apps.cli.arguments import (
    add_cosxl_argument,
    add_model_argument,
    add_precision_arguments,
    add_sampling_arguments,
    add_scale_arguments,
    comma_floats,
    fill_model_defaults,
    precision_options,
)


def _sampling_options(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "sampler": args.sampler,
        "resolution": args.resolution,
        "negative_prompt": args.negative_prompt,
        "guidance_rescale": args.guidance_rescale,
    }


def _load_pipeline(args: argparse.Namespace):
    """The model's edit pipeline, with --lora merged at --lora-scale."""
    from ip2p_jax.pipelines.auto import load_edit_pipeline

    pipe = load_edit_pipeline(args.model, cosxl_edit=args.cosxl_edit, **precision_options(args))
    if args.lora is not None:
        pipe.load_lora(args.lora, scale=args.lora_scale)
    return pipe


def _edit(args: argparse.Namespace) -> int:
    from ip2p_jax.apps.manifest import EditJob, read_manifest, run_jobs

    if (args.manifest is None) == (args.image is None):
        raise ValueError("give either --image with --instruction and --out, or --manifest")
    fill_model_defaults(args)
    if args.manifest is not None:
        if args.out_dir is None:
            raise ValueError("--manifest needs --out-dir")
        defaults = {
            "seed": args.seed,
            "text_scale": args.text_scale,
            "image_scale": args.image_scale,
        }
        jobs = read_manifest(args.manifest, args.out_dir, defaults)
    else:
        if args.instruction is None or args.out is None:
            raise ValueError("--image needs --instruction and --out")
        jobs = [
            EditJob(
                1,
                args.image,
                args.instruction,
                args.out,
                args.seed,
                args.text_scale,
                args.image_scale,
            )
        ]
    pipe = _load_pipeline(args)
    edited, skipped = run_jobs(
        pipe,
        jobs,
        batch_size=args.batch_size,
        resume=args.manifest is not None,
        buckets=_buckets(args, pipe),
        **_sampling_options(args),
    )
    target = args.out_dir if args.manifest is not None else args.out
    print(f"wrote {edited} edit(s) to {target}" + (f", skipped {skipped} done" if skipped else ""))
    return 0


def _buckets(args: argparse.Namespace, pipe) -> tuple | None:
    """The model's aspect-ratio buckets at --bucket-area pixels (default --resolution
    squared), sides multiples of its size factor; None without --buckets."""
    from ip2p_jax.data.buckets import bucket_list, size_multiple

    if not (args.buckets or args.bucket_area):
        return None
    area = args.bucket_area or args.resolution**2
    return bucket_list(area, size_multiple(pipe.unet.config, pipe.vae.config))


def _grid(args: argparse.Namespace) -> int:
    from ip2p_jax.apps.grid import scale_grid
    from ip2p_jax.pipelines.images import load_image

    image = load_image(args.image)
    fill_model_defaults(args)
    pipe = _load_pipeline(args)
    sheet = scale_grid(
        pipe,
        image,
        args.instruction,
        args.text_scales,
        args.image_scales,
        seed=args.seed,
        **_sampling_options(args),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(args.text_scales)} x {len(args.image_scales)} edits)")
    return 0


def _app(args: argparse.Namespace) -> int:
    from ip2p_jax.apps.app import launch_app

    launch_app(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        resolution=args.resolution,
        steps=args.steps,
        cosxl_edit=args.cosxl_edit,
        **precision_options(args),
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.random_weights:
        from ip2p_jax.testing.random_demo import run_random_demo

        return run_random_demo(Path(args.out), preset=args.preset)
    from ip2p_jax.apps.demo import run_demo

    return run_demo(Path(args.out), model=args.model, steps=args.steps, seed=args.seed)


def _add_edit_parser(commands) -> None:
    edit = commands.add_parser("edit", help="edit images by instruction")
    add_sampling_arguments(edit)
    edit.add_argument("--image", type=Path, help="input image")
    edit.add_argument("--instruction", help="what to change")
    edit.add_argument("--out", type=Path, help="output image")
    edit.add_argument("--manifest", type=Path, help="JSON lines: image, instruction, ...")
    edit.add_argument("--out-dir", type=Path, help="output folder for --manifest")
    edit.add_argument("--batch-size", type=int, default=4)
    edit.add_argument(
        "--buckets",
        action="store_true",
        help="edit each image at its nearest aspect-ratio bucket (about --resolution squared "
        "pixels, sides multiples of the model's factor), batched by bucket: one compile each",
    )
    edit.add_argument(
        "--bucket-area", type=int, help="the buckets' pixel budget (implies --buckets)"
    )
    add_precision_arguments(edit)
    add_scale_arguments(edit)
    edit.set_defaults(run=_edit)


def _add_grid_parser(commands) -> None:
    grid = commands.add_parser("grid", help="one edit over a grid of s_T x s_I, as one PNG")
    add_sampling_arguments(grid)
    grid.add_argument("--image", type=Path, required=True)
    grid.add_argument("--instruction", required=True)
    grid.add_argument("--out", type=Path, required=True)
    grid.add_argument("--text-scales", type=comma_floats, default=[3.0, 5.0, 7.5, 10.0])
    grid.add_argument("--image-scales", type=comma_floats, default=[1.0, 1.2, 1.5, 2.0])
    add_precision_arguments(grid)
    grid.set_defaults(run=_grid)


def _add_app_parser(commands) -> None:
    app = commands.add_parser("app", help="a web page (Gradio) to edit images by instruction")
    add_model_argument(app)
    app.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--share", action="store_true", help="a public gradio.live link")
    app.add_argument("--resolution", type=int, help="long side (default: the model's)")
    app.add_argument("--steps", type=int, help="default steps (default: the model's)")
    add_cosxl_argument(app)
    add_precision_arguments(app)
    app.set_defaults(run=_app)


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo", help="the bundled shapes model edits the bundled example scenes -> a grid PNG"
    )
    demo.add_argument("--out", default="out/demo", help="where the demo writes")
    demo.add_argument("--model", help="another model folder (default: the bundled shapes model)")
    demo.add_argument("--steps", type=int, help="sampling steps (default: the shapes model's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--random-weights",
        action="store_true",
        help="instead: build a random-weight model with diffusers, convert it, check parity",
    )
    demo.add_argument(
        "--preset", default="tiny", choices=["tiny", "tiny-sd2", "sd15"], help="--random-weights"
    )
    demo.set_defaults(run=_demo)


_PARSERS = {
    "edit": _add_edit_parser,
    "grid": _add_grid_parser,
    "app": _add_app_parser,
    "demo": _add_demo_parser,
}


def add_parsers(commands, names: Iterable[str] = tuple(_PARSERS)) -> None:
    """Registers ``names`` (default: edit, grid, app, demo) on ``commands`` (add_subparsers()),
    in that order: main.py interleaves them with the other groups as ``ip2p --help`` lists them."""
    for name in names:
        _PARSERS[name](commands)
