"""A few train steps of the micro setup on fixed batches, for the device-count tests: run
as a script in a subprocess with N simulated devices.

    python tests/train/run_steps.py OUT.npz [--fsdp 2]

Any layout of the same global batch must give the same losses and params.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
BATCH = 8


def fixed_batches(tokenizer, steps: int = STEPS, batch: int = BATCH):
    import numpy as np

    rng = np.random.default_rng(0)
    for step in range(steps):
        images = rng.integers(0, 256, (2, batch, 32, 32, 3), dtype=np.uint8)
        words = [f"make shape {step} number {i} red" for i in range(batch)]
        yield {
            "input_image": images[0],
            "edited_image": images[1],
            "input_ids": np.asarray(tokenizer(words), np.int32),
        }


def run(fsdp: int) -> dict:
    """Losses per step and the final params as flat numpy."""
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from ip2p_jax.runtime.mesh import make_mesh
    from ip2p_jax.train.models import load_models
    from ip2p_jax.train.sharding import global_batch
    from ip2p_jax.train.step import host_metrics, make_trainer
    from tests.train.conftest import micro_config

    config = micro_config("unused", fsdp=fsdp, batch_size=BATCH)
    models = load_models(config.model, config.seed)
    mesh = make_mesh(fsdp)
    trainer = make_trainer(config, models, mesh)
    state = trainer.init_state()
    losses = []
    for batch in fixed_batches(models.tokenizer):
        state, metrics = trainer.step(state, global_batch(batch, mesh))
        losses.append(host_metrics(metrics)["loss"])
    params = jax.device_get(state.params)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    return {"losses": np.asarray(losses), "devices": jax.device_count(), **flat}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    np.savez(args.out, **run(args.fsdp))


if __name__ == "__main__":
    main()
