"""The shapes world's autoencoder, trained on its own images before the UNet: the VAE of
configs/shapes_tiny.py (64 px -> 16x16x4 latents), on that config's data.

ip2p datagen shapes --num 20000 --out data/shapes
ip2p train-vae --config configs/shapes_vae.py --workdir runs/shapes_vae
ip2p train --config configs/shapes_tiny.py --workdir runs/shapes_tiny \
    --config.model.vae_from=runs/shapes_vae/vae_model
"""

import dataclasses
from pathlib import Path

from ip2p_jax.train.config import OptimConfig, load_config
from ip2p_jax.train.vae import VAETrainConfig


def get_config() -> VAETrainConfig:
    # shapes_tiny.py is the one place its architecture and data are written down.
    tiny = load_config(Path(__file__).with_name("shapes_tiny.py"))
    return VAETrainConfig(
        vae=tiny.model.vae,
        # 64 px, no flips; the VAE trains on the pixels, so no latent cache
        data=dataclasses.replace(tiny.data, cache_latents=False),
        optim=OptimConfig(
            learning_rate=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.0
        ),
        batch_size=32,  # pairs: 64 images a step
        steps=4000,
        kl_weight=1e-6,
        log_every=10,
        checkpoint_every=250,
        validate_every=500,
    )
