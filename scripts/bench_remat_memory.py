"""What remat per block saves: XLA's memory accounting (``compiled.memory_analysis()``) of the
SD-1.5 InstructPix2Pix train step, at 256 px, batch 1, fp32, for each remat policy
(TrainConfig.remat: each UNet ResNet block and transformer rematerialised under the policy).

    PYTHONPATH=. .venv/bin/python scripts/bench_remat_memory.py
    PYTHONPATH=. .venv/bin/python scripts/bench_remat_memory.py --policies "" dots_saveable
    PYTHONPATH=. .venv/bin/python scripts/bench_remat_memory.py --batch 8 \
        --xla-option xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED

Nothing is loaded or allocated: the models are the SD-1.5 architecture
(ip2p_jax.testing.reference_models' "sd15" preset, as scripts/bench_train.py's sd15 case) with
abstract params (jax.eval_shape), and the step is only lowered and compiled, on the running
backend with its profile (on the CPU: the leafwise optimizer update). Each compile takes about
a minute on a 2-core CPU. Per policy it prints the temporaries (activations kept for the
backward pass and everything else the program allocates), the arguments (state, frozen
encoders, batch), the outputs (the donated state aliases its argument), XLA's count of the
step's floating-point work (the recomputed forward shows there) and the compile time.

`--xla-option NAME=VALUE` adds XLA options to the profile's. On XLA:CPU the default
(concurrency-optimized) scheduler runs a block's recomputation as soon as its inputs exist,
in the forward pass, so remat saves nothing there; its memory-optimized scheduler
(`xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`) keeps it for the backward.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from ip2p_jax.models.unet import REMAT_POLICIES
from ip2p_jax.runtime.mesh import make_mesh
from ip2p_jax.runtime.profile import current_profile
from ip2p_jax.testing.reference_models import PRESETS
from ip2p_jax.train import sharding
from ip2p_jax.train.config import DataConfig, RuntimeConfig, TrainConfig
from ip2p_jax.train.models import ModelSet
from ip2p_jax.train.optim import make_optimizer
from ip2p_jax.train.step import Trainer, TrainState, training_profile
from ip2p_jax.weights.model_folder import abstract_component

GIB = 2**30


def abstract_trainer(config: TrainConfig) -> Trainer:
    """make_trainer's Trainer without weights: frozen params and the null text as shapes."""
    profile = training_profile(config.runtime)
    preset = PRESETS["sd15"]
    names = ("unet", "vae", "text_encoder")
    unet, vae, text = (abstract_component(n, preset[n], profile) for n in names)
    text_config = text.config
    frozen = {
        "vae": vae.params,
        "alphas_cumprod": jax.ShapeDtypeStruct((1000,), jnp.float32),
        "text": text.params,
        "null_text": jax.ShapeDtypeStruct(
            (1, text_config.max_position_embeddings, text_config.hidden_size), jnp.float32
        ),
    }
    models = ModelSet(unet, vae, text, tokenizer=None, schedule=None)
    optimizer = make_optimizer(config.optim, config.steps)
    return Trainer(config, models, make_mesh(), optimizer, frozen, profile)


def step_memory(
    policy: str, resolution: int, batch_size: int, xla_options: dict[str, str]
) -> dict[str, float]:
    """Compiles the step with remat `policy` and the profile's XLA options plus
    `xla_options`; XLA's byte counts (GiB), its TFLOP count and the compile time."""
    options = {**(current_profile().xla_options() or {}), **xla_options}
    config = TrainConfig(
        data=DataConfig(resolution=resolution),
        batch_size=batch_size,
        remat=policy,
        runtime=RuntimeConfig(compiler_options=options),
    )
    trainer = abstract_trainer(config)
    state: TrainState = trainer.abstract_state()
    placed = sharding.batch_sharding(trainer.mesh)
    image = jax.ShapeDtypeStruct(
        (batch_size, resolution, resolution, 3), jnp.uint8, sharding=placed
    )
    tokens = trainer.models.text_encoder.config.max_position_embeddings
    batch = {
        "input_image": image,
        "edited_image": image,
        "input_ids": jax.ShapeDtypeStruct((batch_size, tokens), jnp.int32, sharding=placed),
    }
    start = time.perf_counter()
    compiled = trainer.step_program().lower(state, trainer.frozen, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "tflop": compiled.cost_analysis().get("flops", float("nan")) / 1e12,
        "temp": memory.temp_size_in_bytes / GIB,
        "argument": memory.argument_size_in_bytes / GIB,
        "output": memory.output_size_in_bytes / GIB,
        "alias": memory.alias_size_in_bytes / GIB,
        "compile_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["", "nothing_saveable", "dots_saveable"],
        choices=["", *REMAT_POLICIES],
        help='remat policies to compile ("" none)',
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an XLA option added to the backend profile's (repeatable)",
    )
    args = parser.parse_args()
    xla_options = dict(option.split("=", 1) for option in args.xla_option)
    print(
        f"SD-1.5 train step, {args.resolution} px, batch {args.batch}, fp32, "
        f"{jax.default_backend()} x{jax.device_count()}, jax {jax.__version__}, "
        f"extra XLA options {xla_options or 'none'}",
        flush=True,
    )
    print("| remat | temp GiB | argument GiB | output GiB | aliased GiB | TFLOP | compile s |")
    print("|---|---|---|---|---|---|---|")
    for policy in args.policies:
        m = step_memory(policy, args.resolution, args.batch, xla_options)
        print(
            f"| {policy or '(none)'} | {m['temp']:.2f} | {m['argument']:.2f} | "
            f"{m['output']:.2f} | {m['alias']:.2f} | {m['tflop']:.2f} | {m['compile_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
