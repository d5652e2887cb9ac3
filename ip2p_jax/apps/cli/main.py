"""The ``ip2p`` command: its parser, assembled from one module per command group, and main().

models.py: convert, export, export-run, parity. editing.py: edit, grid, app, demo.
evaluate.py: eval shapes, eval edits, eval magicbrush (its handler in eval_magicbrush.py).
data.py: datagen. training.py: train, train-vae.
arguments.py: the options they share (model, sampling, scales). Every handler imports what it
runs (JAX, torch) when it runs, so ``ip2p --help`` stays fast. main() maps the errors a user can
cause (a missing file, a bad value) to exit code 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ip2p_jax.apps.cli import data, editing, evaluate, models, training

DESCRIPTION = "The ``ip2p`` command: edit, grid, eval, app, convert, export, parity, datagen, demo."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ip2p``; the commands in the order ``ip2p --help`` lists them."""
    parser = argparse.ArgumentParser(prog="ip2p", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    models.add_parsers(commands)
    editing.add_parsers(commands, ["edit", "grid"])
    evaluate.add_parsers(commands)
    editing.add_parsers(commands, ["app"])
    data.add_parsers(commands)
    training.add_parsers(commands)
    editing.add_parsers(commands, ["demo"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ip2p`` command."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # train, train-vae: --config.a.b=value, checked by the config
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
