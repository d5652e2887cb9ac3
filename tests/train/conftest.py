"""A micro training setup: shapes at 32 px, models small enough to train in seconds."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from ip2p_jax.models import micro
from ip2p_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

MICRO_UNET = micro.UNET
MICRO_VAE = {**micro.VAE, "scaling_factor": 1.0}  # trained from scratch: no SD latent scale
MICRO_TEXT = micro.TEXT_ENCODER


@pytest.fixture(scope="session")
def shapes32(tmp_path_factory):
    """256 train + 12 validation shapes examples at 32 px."""
    from ip2p_jax.data.build import build_shapes

    out = tmp_path_factory.mktemp("shapes32")
    build_shapes(out, 256, num_validation=12, num_heldout=0, size=32)
    return out


ROOT = Path(__file__).resolve().parents[2]


def write_config_file(path: Path, imports: str, call: str) -> Path:
    """A config file for `ip2p train --config` whose get_config() returns `call`, after
    `imports` (this checkout's tests are importable from it, in any process)."""
    path.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            {imports}

            def get_config():
                return {call}
            """
        )
    )
    return path


def micro_config(data_path, **changes) -> TrainConfig:
    config = TrainConfig(
        model=ModelConfig(unet=MICRO_UNET, vae=MICRO_VAE, text_encoder=MICRO_TEXT),
        data=DataConfig(path=str(data_path), resolution=32, flip_prob=0.0, workers=0),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=5, weight_decay=0.0),
        batch_size=8,
        steps=6,
        ema_decay=0.99,
        log_every=1,
        checkpoint_every=3,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="session")
def six_step_run(shapes32, tmp_path_factory):
    """``micro_config(shapes32)`` trained to its end (6 steps): the workdir and final state,
    trained once for the tests that compare with it or export from it (they only read it)."""
    from ip2p_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("six_steps")
    return workdir, train(micro_config(shapes32), workdir)


@pytest.fixture(scope="session")
def three_step_run(shapes32, tmp_path_factory):
    """The same config stopped after 3 steps (checkpointed at 3): its workdir, read only."""
    from ip2p_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("three_steps")
    train(micro_config(shapes32, steps=3), workdir)
    return workdir


def fixed_batches(tokenizer, steps: int = 3, batch: int = 8):
    """Random 32 px pairs with numbered instructions, the same every call: batches for steps
    compared across configs without a dataset."""
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
