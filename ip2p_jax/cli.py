"""The ``ip2p`` command: edit, grid, eval, app, convert, export, parity, datagen, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ip2p_jax.evaluation.edits_cli import add_edits_arguments, comma_floats, run_edits
from ip2p_jax.shipped import (
    REFERENCE_SAMPLING,
    SHAPES_SAMPLING,
    sampling_defaults,
    shipped_model,
)

# ip2p_jax.samplers.SAMPLERS' names, written out: importing it would load JAX for --help.
SAMPLER_NAMES = ("euler_ancestral", "euler", "ddim", "dpmpp_2m")


def _convert(args: argparse.Namespace) -> int:
    from ip2p_jax.checkpoint import convert_to_flax

    start = time.perf_counter()
    out = convert_to_flax(
        args.model,
        args.out,
        in_channels=args.in_channels,
        overwrite=args.overwrite,
        dtype=args.dtype,
    )
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ip2p_jax.checkpoint import export_diffusers

    out = export_diffusers(args.checkpoint, args.out, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote diffusers folder {out}")
    return 0


def _export_run(args: argparse.Namespace) -> int:
    from ip2p_jax.train.snapshot import export_run

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    out = export_run(args.workdir, args.out, step=args.step, raw_weights=args.raw_weights)
    print(f"wrote {out}")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from ip2p_jax.parity import format_table, run_parity

    results = run_parity(
        args.model,
        components=args.components,
        resolution=args.resolution,
        batch=args.batch,
        seed=args.seed,
        tolerance=args.tolerance,
        pipeline=args.pipeline,
    )
    if args.json:
        print(
            json.dumps([{**dataclasses.asdict(r), "passed": r.passed} for r in results], indent=2)
        )
    else:
        print(format_table(results))
    failed = [f"{r.component}.{r.output}" for r in results if not r.passed]
    if failed:
        print(f"FAILED: {', '.join(failed)} exceed the tolerance", file=sys.stderr)
        return 1
    return 0


def _sampling_options(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "sampler": args.sampler,
        "resolution": args.resolution,
        "negative_prompt": args.negative_prompt,
    }


def _edit(args: argparse.Namespace) -> int:
    from ip2p_jax.manifest import EditJob, read_manifest, run_jobs
    from ip2p_jax.pipeline import EditPipeline

    if (args.manifest is None) == (args.image is None):
        raise ValueError("give either --image with --instruction and --out, or --manifest")
    _fill_model_defaults(args)
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
    pipe = EditPipeline.from_pretrained(args.model)
    edited, skipped = run_jobs(
        pipe,
        jobs,
        batch_size=args.batch_size,
        resume=args.manifest is not None,
        **_sampling_options(args),
    )
    target = args.out_dir if args.manifest is not None else args.out
    print(f"wrote {edited} edit(s) to {target}" + (f", skipped {skipped} done" if skipped else ""))
    return 0


def _grid(args: argparse.Namespace) -> int:
    from ip2p_jax.grid import scale_grid
    from ip2p_jax.images import load_image
    from ip2p_jax.pipeline import EditPipeline

    image = load_image(args.image)
    _fill_model_defaults(args)
    pipe = EditPipeline.from_pretrained(args.model)
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


def _eval_shapes(args: argparse.Namespace) -> int:
    from ip2p_jax.evaluation.shapes import evaluate_shapes, format_table, write_report
    from ip2p_jax.pipeline import EditPipeline

    _fill_model_defaults(args)
    options = {
        "steps": args.steps,
        "text_scale": args.text_scale,
        "image_scale": args.image_scale,
        "sampler": args.sampler,
    }
    pipe = EditPipeline.from_pretrained(args.model)
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


def _default_help(name: str) -> str:
    """'default: X; Y for the shapes model', from the two SamplingDefaults."""
    ours, theirs = getattr(SHAPES_SAMPLING, name), getattr(REFERENCE_SAMPLING, name)
    return f"default: {theirs}" + ("" if ours == theirs else f"; {ours} for the shapes model")


def _add_sampler_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--sampler; with no default, _fill_model_defaults picks the model's."""
    help_text = _default_help("sampler") if default is None else None
    parser.add_argument("--sampler", default=default, choices=SAMPLER_NAMES, help=help_text)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="model folder, hub id or checkpoint (default: the bundled shapes model)"
    )


def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-scale", type=float, help=f"s_T ({_default_help('text_scale')})")
    parser.add_argument("--image-scale", type=float, help=f"s_I ({_default_help('image_scale')})")


def _fill_model_defaults(args: argparse.Namespace) -> None:
    """No --model: the bundled shapes model, sampled as its quality table was measured
    (shipped.SHAPES_SAMPLING) where the arguments leave a setting open. With a model: the
    reference's settings (100 steps at 512 px, s_T 7.5, s_I 1.5)."""
    shipped = args.model is None
    if shipped:
        args.model = shipped_model()
    defaults = sampling_defaults(shipped)
    for field in dataclasses.fields(defaults):
        if getattr(args, field.name, 0) is None:
            setattr(args, field.name, getattr(defaults, field.name))


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_argument(parser)
    parser.add_argument("--steps", type=int, help=f"sampling steps ({_default_help('steps')})")
    _add_sampler_argument(parser)
    parser.add_argument(
        "--resolution", type=int, help=f"long side, pixels ({_default_help('resolution')})"
    )
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=0)


def _demo(args: argparse.Namespace) -> int:
    if args.random_weights:
        from ip2p_jax.random_demo import run_random_demo

        return run_random_demo(Path(args.out), preset=args.preset)
    from ip2p_jax.demo import run_demo

    return run_demo(Path(args.out), model=args.model, steps=args.steps, seed=args.seed)


def _app(args: argparse.Namespace) -> int:
    from ip2p_jax.app import launch_app

    launch_app(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        resolution=args.resolution,
        steps=args.steps,
    )
    return 0


def _datagen_shapes(args: argparse.Namespace) -> int:
    from ip2p_jax.data.build import build_shapes, describe

    path = build_shapes(
        args.out,
        args.num,
        num_validation=args.num_validation,
        num_heldout=args.num_heldout,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(describe(path))
    return 0


def _datagen_import(args: argparse.Namespace) -> int:
    from ip2p_jax.data import build

    if args.format == "original":
        if len(args.source) != 1:
            raise ValueError("the original format is one folder (with seeds.json)")
        path, reports = build.import_original(args.source[0], args.out, overwrite=args.overwrite)
    else:
        path, reports = build.import_parquet(args.source, args.out, overwrite=args.overwrite)
    for report in reports:
        print(report.summary())
    print(build.describe(path))
    return 0


def _datagen_info(args: argparse.Namespace) -> int:
    from ip2p_jax.data.build import describe

    print(describe(args.dataset))
    return 0


def _run_training(args: argparse.Namespace, kind: str) -> int:
    """`ip2p train` (kind "unet") and `ip2p train-vae` (kind "vae"): one config check, one
    way to report divergence, preemption and the result."""
    from ip2p_jax.train.config import TrainConfig, load_config
    from ip2p_jax.train.loop import TrainingDiverged, train
    from ip2p_jax.train.vae import VAETrainConfig, train_vae

    expected, run, result = {
        "unet": (TrainConfig, train, "model"),
        "vae": (VAETrainConfig, train_vae, "vae_model"),
    }[kind]
    config = load_config(args.config, args.overrides)
    if not isinstance(config, expected):
        raise ValueError(
            f"{args.config} gives a {type(config).__name__}; `ip2p {args.command}` needs a "
            f"{expected.__name__}"
        )
    if args.distributed:  # every host runs the same command; JAX finds the others
        import jax

        jax.distributed.initialize()
    try:
        state = run(config, args.workdir, resume=args.resume)
    except TrainingDiverged as err:
        print(f"ip2p {args.command}: {err}", file=sys.stderr)
        return 1
    step = int(state.step)
    done = step >= config.steps
    print(f"{'finished' if done else 'stopped'} at step {step} in {args.workdir}")
    if done:
        print(f"result: {args.workdir / result}")
    return 0


def _add_training_parser(commands, name: str, kind: str, help_text: str) -> None:
    parser = commands.add_parser(name, help=f"{help_text} (any config field: --config.a.b=value)")
    parser.add_argument("--config", type=Path, required=True, help="configs/*.py")
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoints, logs, result")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host (TPU pod, SLURM): call jax.distributed.initialize() first",
    )
    parser.set_defaults(run=lambda args: _run_training(args, kind), overrides=[])


def _add_torch_side(parser: argparse.ArgumentParser, module: str, name: str) -> None:
    """Options and runner from datagen/ (which imports torch only when it runs)."""
    import importlib

    cli = importlib.import_module(module)
    getattr(cli, f"add_{name}_arguments")(parser)
    parser.set_defaults(run=getattr(cli, f"run_{name}"))


def _add_datagen_parser(commands) -> None:
    datagen = commands.add_parser("datagen", help="build edit-pair datasets (TFDS array_record)")
    kinds = datagen.add_subparsers(dest="kind", required=True)

    shapes = kinds.add_parser("shapes", help="the synthetic shapes world, exact ground truth")
    shapes.add_argument("--num", type=int, required=True, help="train examples")
    shapes.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    shapes.add_argument("--num-validation", type=int, default=None, help="default num/20")
    shapes.add_argument("--num-heldout", type=int, default=None, help="default num/20")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    shapes.set_defaults(run=_datagen_shapes)

    imports = kinds.add_parser(
        "import", help="the original release's folder format or the hub parquet sets"
    )
    imports.add_argument("format", choices=["original", "parquet"])
    imports.add_argument("source", nargs="+", help="folder with seeds.json, or parquet files")
    imports.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    imports.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    imports.set_defaults(run=_datagen_import)

    instructions = kinds.add_parser(
        "instructions", help="captions -> instruction + edited caption by an LLM (PyTorch side)"
    )
    _add_torch_side(instructions, "datagen.instructions_cli", "instructions")

    pairs = kinds.add_parser(
        "pairs", help="prompts -> Prompt-to-Prompt image pairs -> CLIP filter (PyTorch side)"
    )
    _add_torch_side(pairs, "datagen.pairs_cli", "pairs")

    info = kinds.add_parser("info", help="splits, sizes and metadata of a dataset")
    info.add_argument("dataset", type=Path)
    info.set_defaults(run=_datagen_info)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ip2p``."""
    parser = argparse.ArgumentParser(prog="ip2p", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="diffusers folder or hub id -> ip2p-jax Flax checkpoint"
    )
    convert.add_argument("model", help="diffusers model folder or hub id")
    convert.add_argument("out", type=Path, help="checkpoint folder to write")
    convert.add_argument(
        "--in-channels",
        type=int,
        default=None,
        help="widen the UNet's conv_in (8 turns an SD model into an InstructPix2Pix start)",
    )
    convert.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the stored params",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    convert.set_defaults(run=_convert)

    export = commands.add_parser("export", help="ip2p-jax checkpoint -> diffusers folder")
    export.add_argument("checkpoint", help="ip2p-jax checkpoint folder")
    export.add_argument("out", type=Path, help="diffusers folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast the stored weights (default: keep the checkpoint's dtype)",
    )
    export.set_defaults(run=_export)

    export_run = commands.add_parser(
        "export-run", help="a training run's model at a saved step -> ip2p-jax checkpoint"
    )
    export_run.add_argument("workdir", type=Path, help="the run's --workdir")
    export_run.add_argument("out", type=Path, help="checkpoint folder to write")
    export_run.add_argument("--step", type=int, help="a saved step (default: the latest)")
    export_run.add_argument(
        "--raw-weights", action="store_true", help="the optimizer's weights, not the EMA's"
    )
    export_run.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export_run.set_defaults(run=_export_run)

    parity = commands.add_parser(
        "parity", help="compare our components with the PyTorch ones on a diffusers folder"
    )
    parity.add_argument("model", type=Path, help="diffusers model folder")
    parity.add_argument(
        "--components",
        nargs="+",
        default=["unet", "vae", "text_encoder"],
        choices=["unet", "vae", "text_encoder"],
    )
    parity.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    parity.add_argument("--batch", type=int, default=2)
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument(
        "--tolerance", type=float, default=1e-3, help="max abs error allowed per output"
    )
    parity.add_argument("--json", action="store_true", help="machine-readable output")
    parity.add_argument(
        "--pipeline",
        action="store_true",
        help="also compare whole edits with diffusers' InstructPix2Pix pipeline (3 samplers)",
    )
    parity.set_defaults(run=_parity)

    edit = commands.add_parser("edit", help="edit images by instruction")
    _add_sampling_arguments(edit)
    edit.add_argument("--image", type=Path, help="input image")
    edit.add_argument("--instruction", help="what to change")
    edit.add_argument("--out", type=Path, help="output image")
    edit.add_argument("--manifest", type=Path, help="JSON lines: image, instruction, ...")
    edit.add_argument("--out-dir", type=Path, help="output folder for --manifest")
    edit.add_argument("--batch-size", type=int, default=4)
    _add_scale_arguments(edit)
    edit.set_defaults(run=_edit)

    grid = commands.add_parser("grid", help="one edit over a grid of s_T x s_I, as one PNG")
    _add_sampling_arguments(grid)
    grid.add_argument("--image", type=Path, required=True)
    grid.add_argument("--instruction", required=True)
    grid.add_argument("--out", type=Path, required=True)
    grid.add_argument("--text-scales", type=comma_floats, default=[3.0, 5.0, 7.5, 10.0])
    grid.add_argument("--image-scales", type=comma_floats, default=[1.0, 1.2, 1.5, 2.0])
    grid.set_defaults(run=_grid)

    evaluate = commands.add_parser("eval", help="score edit quality")
    worlds = evaluate.add_subparsers(dest="world", required=True)
    shapes = worlds.add_parser(
        "shapes", help="the shapes world's held-out edits, scored against the exact truth"
    )
    _add_model_argument(shapes)
    shapes.add_argument("--num", type=int, default=200, help="examples")
    shapes.add_argument("--split", default="heldout", choices=["heldout", "validation", "train"])
    shapes.add_argument("--size", type=int, default=64, help="image side, pixels")
    shapes.add_argument("--steps", type=int, help=f"sampling steps ({_default_help('steps')})")
    _add_scale_arguments(shapes)
    _add_sampler_argument(shapes)
    shapes.add_argument("--batch-size", type=int, default=16)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--train-phrasing",
        action="store_true",
        help="say each held-out edit in its nearest training phrasing (same scenes and edits)",
    )
    shapes.add_argument("--json", type=Path, help="also write the table and every score here")
    shapes.set_defaults(run=_eval_shapes)
    edits = worlds.add_parser(
        "edits",
        help="a real model on an edit-pair dataset: the paper's CLIP metrics over s_I "
        "(and an SDEdit baseline), metrics.json, plot.png, grid.png",
    )
    add_edits_arguments(edits)
    _add_sampler_argument(edits, REFERENCE_SAMPLING.sampler)
    edits.set_defaults(run=run_edits)

    app = commands.add_parser("app", help="a web page (Gradio) to edit images by instruction")
    _add_model_argument(app)
    app.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--share", action="store_true", help="a public gradio.live link")
    app.add_argument("--resolution", type=int, help="long side (default: the model's)")
    app.add_argument("--steps", type=int, help="default steps (default: the model's)")
    app.set_defaults(run=_app)

    _add_datagen_parser(commands)
    _add_training_parser(commands, "train", "unet", "train an InstructPix2Pix model")
    _add_training_parser(commands, "train-vae", "vae", "train the VAE on edit-pair images")

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ip2p`` command."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in ("train", "train-vae"):  # --config.a.b=value, checked against the config
        bad = [arg for arg in unknown if not arg.startswith("--config.")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"ip2p {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
