"""A few train steps of the micro setup on fixed batches, for the device-count tests: run
as a script in a subprocess with N simulated devices, or as one of several JAX processes.

    python tests/train/run_steps.py OUT.npz [--fsdp 2] [--processes 2 --process-id 0 --port P]

Every process builds the same global batches and feeds its own rows, so any layout of the
same global batch must give the same losses and params.
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


def run(fsdp: int, process_id: int, processes: int) -> dict:
    """Losses per step and the final params (gathered to every process) as flat numpy."""
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict
    from jax.experimental import multihost_utils

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
    rows = BATCH // processes
    losses = []
    for batch in fixed_batches(models.tokenizer):
        local = {k: v[process_id * rows : (process_id + 1) * rows] for k, v in batch.items()}
        state, metrics = trainer.step(state, global_batch(local, mesh))
        losses.append(host_metrics(metrics)["loss"])
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    return {"losses": np.asarray(losses), "devices": jax.device_count(), **flat}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.processes > 1:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    import numpy as np

    result = run(args.fsdp, args.process_id, args.processes)
    if args.process_id == 0:
        np.savez(args.out, **result)


if __name__ == "__main__":
    main()
