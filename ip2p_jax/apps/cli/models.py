"""``ip2p convert``, ``export``, ``export-run`` and ``parity``: checkpoints in and out.

convert: a diffusers folder or hub id -> our Flax checkpoint; export: back to a diffusers
folder; export-run: a training run's weights at a saved step -> a checkpoint; parity: our
components against the PyTorch ones. JAX and torch are imported when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ip2p_jax.apps.cli.arguments import DTYPE_NAMES, SAMPLER_NAMES, add_cosxl_argument


def _convert(args: argparse.Namespace) -> int:
    from ip2p_jax.weights.model_folder import convert_to_flax

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
    from ip2p_jax.weights.model_folder import export_diffusers

    if args.lora:
        from ip2p_jax.train.snapshot import export_run_lora

        if args.dtype:
            raise SystemExit("--dtype casts a model folder's weights; a LoRA file is float32")

        out = export_run_lora(
            args.checkpoint, args.out, step=args.step, raw_weights=args.raw_weights
        )
        print(f"wrote LoRA {out} (diffusers: pipe.load_lora_weights; ip2p edit --lora)")
        return 0
    if args.step is not None or args.raw_weights:
        raise SystemExit("--step and --raw-weights choose a training run's adapters: use --lora")
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
    from ip2p_jax.testing.parity import format_table, run_parity

    results = run_parity(
        args.model,
        components=args.components,
        resolution=args.resolution,
        batch=args.batch,
        seed=args.seed,
        tolerance=args.tolerance,
        pipeline=args.pipeline,
        dtype=args.dtype,
        samplers=args.samplers,
        cosxl_edit=args.cosxl_edit,
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


def add_parsers(commands) -> None:
    """Registers convert, export, export-run and parity on ``commands`` (add_subparsers())."""
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
        "--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the stored params"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    convert.set_defaults(run=_convert)

    export = commands.add_parser(
        "export",
        help="ip2p-jax checkpoint -> diffusers folder; with --lora, a LoRA run's adapters -> "
        "a PEFT-layout LoRA file",
    )
    export.add_argument(
        "checkpoint", help="ip2p-jax checkpoint folder (with --lora: a run's workdir)"
    )
    export.add_argument(
        "out",
        type=Path,
        help="diffusers folder to write (with --lora: a .safetensors file, or a folder to "
        "hold pytorch_lora_weights.safetensors)",
    )
    export.add_argument(
        "--lora",
        action="store_true",
        help="write the LoRA adapters of a training run (--config.lora.rank) at a saved step, "
        "in the PEFT layout diffusers' load_lora_weights reads",
    )
    export.add_argument("--step", type=int, help="with --lora: a saved step (default: the latest)")
    export.add_argument(
        "--raw-weights", action="store_true", help="with --lora: the optimizer's, not the EMA's"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
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
        default=None,
        choices=["unet", "vae", "text_encoder", "text_encoder_2"],
        help="default: every one the folder has (SDXL's has text_encoder_2)",
    )
    parity.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    parity.add_argument("--batch", type=int, default=2)
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument(
        "--tolerance",
        type=float,
        help="max abs error allowed per component output (default: the dtype's bound, "
        "1e-3 in float32; ip2p_jax.testing.parity.TOLERANCES)",
    )
    parity.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_NAMES,
        help="our UNet's and text encoder's params and compute dtype (the reference: float32)",
    )
    parity.add_argument("--json", action="store_true", help="machine-readable output")
    parity.add_argument(
        "--pipeline",
        action="store_true",
        help="also compare whole edits with diffusers' InstructPix2Pix pipeline",
    )
    parity.add_argument(
        "--samplers",
        nargs="+",
        default=["euler_ancestral", "euler", "ddim"],
        choices=SAMPLER_NAMES,
        help="the samplers of --pipeline's edits",
    )
    add_cosxl_argument(parity)
    parity.set_defaults(run=_parity)
