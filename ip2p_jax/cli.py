"""The ``ip2p`` command: convert, export, parity, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path


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

    out = export_diffusers(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote diffusers folder {out}")
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


def _demo(args: argparse.Namespace) -> int:
    from ip2p_jax.demo import run_demo

    return run_demo(Path(args.out), preset=args.preset)


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
    export.set_defaults(run=_export)

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
    parity.set_defaults(run=_parity)

    demo = commands.add_parser("demo", help="build a random-weight model, convert, check parity")
    demo.add_argument("--out", default="out/demo", help="where the demo writes")
    demo.add_argument("--preset", default="tiny", choices=["tiny", "tiny-sd2", "sd15"])
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ip2p`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"ip2p {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
