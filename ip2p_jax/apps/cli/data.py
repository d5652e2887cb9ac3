"""``ip2p datagen``: build edit-pair datasets (TFDS array_record).

shapes: the synthetic shapes world; import: the original release's folders or the hub's
parquet sets; info: a dataset's splits and metadata; instructions, finetune-set and pairs: the
PyTorch side (datagen/), whose options and runners come from datagen/ (torch is imported when
they run, and finetune-set needs none).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


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
        workers=args.workers,
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


def _add_torch_side(parser: argparse.ArgumentParser, module: str, name: str) -> None:
    """Options and runner from datagen/ (which imports torch only when it runs)."""
    cli = importlib.import_module(module)
    getattr(cli, f"add_{name}_arguments")(parser)
    parser.set_defaults(run=getattr(cli, f"run_{name}"))


def add_parsers(commands) -> None:
    """Registers ``datagen`` with its kinds on ``commands`` (add_subparsers())."""
    datagen = commands.add_parser("datagen", help="build edit-pair datasets (TFDS array_record)")
    kinds = datagen.add_subparsers(dest="kind", required=True)

    shapes = kinds.add_parser("shapes", help="the synthetic shapes world, exact ground truth")
    shapes.add_argument("--num", type=int, required=True, help="train examples")
    shapes.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    shapes.add_argument("--num-validation", type=int, default=None, help="default num/20")
    shapes.add_argument("--num-heldout", type=int, default=None, help="default num/20")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--workers",
        type=int,
        default=1,
        help="rendering processes (about 700 examples/s each at 64 px); same dataset for any",
    )
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

    finetune_set = kinds.add_parser(
        "finetune-set",
        help="hand-written examples -> prompt/completion JSONL to fine-tune the instruction LLM",
    )
    _add_torch_side(finetune_set, "datagen.finetune_set", "finetune_set")

    pairs = kinds.add_parser(
        "pairs", help="prompts -> Prompt-to-Prompt image pairs -> CLIP filter (PyTorch side)"
    )
    _add_torch_side(pairs, "datagen.pairs_cli", "pairs")

    info = kinds.add_parser("info", help="splits, sizes and metadata of a dataset")
    info.add_argument("dataset", type=Path)
    info.set_defaults(run=_datagen_info)
