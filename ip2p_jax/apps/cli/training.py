"""``ip2p train`` and ``ip2p train-vae``: a config file, a workdir, and the run.

Any config field can be set on the command line as --config.a.b=value; main.py collects those
(this module's parsers set ``overrides``) and load_config checks them against the config.
JAX is imported when a run starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(value is not None for value in explicit):
        # Every process runs the same command; JAX finds the others or is told where.
        from ip2p_jax.runtime.distributed import initialize

        initialize(*explicit)
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
        help="one process of a multi-host run: JAX detects the cluster (TPU pod, SLURM, ...)",
    )
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, for clusters JAX does not detect (implies --distributed)",
    )
    parser.add_argument("--num-processes", type=int, help="with --coordinator: how many")
    parser.add_argument("--process-id", type=int, help="with --coordinator: this one (0..N-1)")
    # overrides: main() fills it with the --config.a.b=value arguments argparse leaves unknown.
    parser.set_defaults(run=lambda args: _run_training(args, kind), overrides=[])


def add_parsers(commands) -> None:
    """Registers train and train-vae on ``commands`` (add_subparsers())."""
    _add_training_parser(commands, "train", "unet", "train an InstructPix2Pix model")
    _add_training_parser(commands, "train-vae", "vae", "train the VAE on edit-pair images")
