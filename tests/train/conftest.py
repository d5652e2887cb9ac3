"""A micro training setup: shapes at 32 px, models small enough to train in seconds."""

from __future__ import annotations

import dataclasses

import pytest

from ip2p_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

MICRO_VAE = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 1.0,
}
MICRO_UNET = {
    "sample_size": 16,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
MICRO_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


@pytest.fixture(scope="session")
def shapes32(tmp_path_factory):
    """256 train + 12 validation shapes examples at 32 px."""
    from ip2p_jax.data.build import build_shapes

    out = tmp_path_factory.mktemp("shapes32")
    build_shapes(out, 256, num_validation=12, num_heldout=0, size=32)
    return out


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
