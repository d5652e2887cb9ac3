"""The arithmetic of a training config: FLOPs of one optimizer step (XLA's count of the step
program, lowered for a platform with shapes only: no weights, nothing compiled), the trained
parameters, and the time `config.steps` steps would take on an accelerator at an assumed
utilisation (model FLOPs / peak FLOP/s).

    .venv/bin/python scripts/train_cost.py --config configs/shapes_gpu.py
    .venv/bin/python scripts/train_cost.py --config configs/shapes_tiny.py --platform cpu
    .venv/bin/python scripts/train_cost.py --config configs/shapes_gpu.py --mfu 0.05 0.15 \
        --config.batch_size=1024

The estimate is arithmetic, not a measurement: small convolutions (the shapes world's
16x16 latents, 96-128 channels) keep a GPU far from its peak, so it is printed for a range
of utilisations. scripts/device_train_shapes.sh measures the real step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ip2p_jax.diffusion.schedules import SD_SCHEDULER_CONFIG, NoiseSchedule  # noqa: E402
from ip2p_jax.models.tokenizer import CLIPTokenizer  # noqa: E402
from ip2p_jax.runtime.mesh import make_mesh  # noqa: E402
from ip2p_jax.runtime.profile import profile_for  # noqa: E402
from ip2p_jax.train.config import TrainConfig, load_config  # noqa: E402
from ip2p_jax.train.models import ModelSet, trained_names  # noqa: E402
from ip2p_jax.train.step import abstract_trainer, profile_runtime  # noqa: E402
from ip2p_jax.weights.model_folder import abstract_component, resolve_model  # noqa: E402

# Dense bfloat16 peak FLOP/s of the accelerators this project is lent or aimed at (vendor
# figures, without sparsity).
PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "tpu-v5e": 197e12}
PROFILE_OF = {"cuda": "gpu", "tpu": "tpu", "cpu": "cpu"}


def abstract_models(config: TrainConfig, platform: str) -> ModelSet:
    """The config's models as shapes only, run as ``platform``'s profile says."""
    model = config.model
    if model.init_from:
        raise ValueError("train_cost.py reads a config's model dicts; init_from is not read")
    profile = profile_for(PROFILE_OF[platform])
    dtype = config.compute_dtype or profile.compute_dtype
    vae_raw = model.vae
    if model.vae_from:
        vae_raw = json.loads((resolve_model(model.vae_from) / "vae" / "config.json").read_text())
    unet_raw = {**model.unet, "in_channels": model.in_channels}
    return ModelSet(
        unet=abstract_component("unet", unet_raw, profile, compute_dtype=dtype),
        vae=abstract_component("vae", vae_raw, profile, compute_dtype="float32"),
        text_encoder=abstract_component(
            "text_encoder", model.text_encoder, profile, compute_dtype=dtype
        ),
        tokenizer=CLIPTokenizer.bundled(),
        schedule=NoiseSchedule.from_dict(SD_SCHEDULER_CONFIG),
    )


def batch_spec(config: TrainConfig, models: ModelSet) -> dict:
    """One step's global batch as shapes: VAE moments from a latent cache, or pixels."""
    batch, side = config.batch_size, config.data.resolution
    if config.data.cache_latents:
        down = 2 ** (len(models.vae.config.block_out_channels) - 1)
        moments = (batch, side // down, side // down, 2 * models.vae.config.latent_channels)
        images = {
            f"{name}_moments": jax.ShapeDtypeStruct(moments, jnp.float32)
            for name in ("input", "edited")
        }
    else:
        pixels = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
        images = {"input_image": pixels, "edited_image": pixels}
    return {**images, "input_ids": jax.ShapeDtypeStruct((batch, 77), jnp.int32)}


def step_flops(config: TrainConfig, platform: str) -> tuple[float, int]:
    """(FLOPs of one optimizer step, trained parameters) of ``config`` on one device."""
    # XLA's attention: the same FLOPs as a fused kernel, and it lowers anywhere
    profile = profile_for(PROFILE_OF[platform], attention_kernel="dot_product")
    config = dataclasses.replace(config, runtime=profile_runtime(profile))
    models = abstract_models(config, platform)
    trainer = abstract_trainer(config, models, make_mesh(1, devices=jax.devices()[:1]))
    state = trainer.abstract_state()
    program = trainer.step_program().jitted
    lowered = program.trace(state, trainer.frozen, batch_spec(config, models)).lower(
        lowering_platforms=(platform,)
    )
    flops = float(lowered.cost_analysis()["flops"])
    trained = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params))
    return flops, trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--platform", default="cuda", choices=sorted(PROFILE_OF))
    parser.add_argument("--device", default="h200", choices=sorted(PEAK_FLOPS))
    parser.add_argument(
        "--mfu", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="utilisations to show"
    )
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    flops, trained = step_flops(config, args.platform)
    examples = config.batch_size * config.steps
    print(f"{args.config}: batch {config.batch_size}, {config.steps} steps, {examples:,} examples")
    kind = "LoRA adapters of " if config.lora.rank else ""
    print(f"trained parameters: {trained / 1e6:.2f} M ({kind}{', '.join(trained_names(config))})")
    print(
        f"one step ({args.platform}): {flops / 1e12:.3f} TFLOP, "
        f"{flops / config.batch_size / 1e9:.2f} GFLOP per example; "
        f"the run: {flops * config.steps / 1e15:.1f} PFLOP"
    )
    peak = PEAK_FLOPS[args.device]
    for mfu in args.mfu:
        seconds = flops / (peak * mfu)
        print(
            f"  {args.device} at {mfu:.0%} of its {peak / 1e12:.0f} TFLOP/s: "
            f"{seconds * 1e3:.1f} ms a step, {seconds * config.steps / 60:.1f} min the run"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
