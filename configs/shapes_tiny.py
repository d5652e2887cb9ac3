r"""The shapes world on a CPU: small UNet, VAE and text encoder, trained from scratch.

ip2p datagen shapes --num 20000 --out data/shapes
ip2p train --config configs/shapes_tiny.py --workdir runs/shapes_tiny
ip2p train --config configs/shapes_tiny.py --workdir runs/shapes_tiny \
    --config.steps=300 --config.optim.decay_steps=100

The shipped model's second stage trains the text encoder too, from the first stage's model,
its third goes on from the second's with word dropout on the instructions, and its fourth
from the third's with more dropout (`make train-shapes` runs all four):
ip2p train --config configs/shapes_tiny.py --workdir runs/shapes_joint \
    --config.model.init_from=runs/shapes_tiny/model --config.model.train_text_encoder=True \
    --config.steps=2250 --config.optim.decay_steps=1500
ip2p train --config configs/shapes_tiny.py --workdir runs/shapes_words \
    --config.model.init_from=runs/shapes_joint/model --config.model.train_text_encoder=True \
    --config.data.word_dropout=0.1 --config.steps=4000 --config.optim.decay_steps=2000
ip2p train --config configs/shapes_tiny.py --workdir runs/shapes_words2 \
    --config.model.init_from=runs/shapes_words/model --config.model.train_text_encoder=True \
    --config.data.word_dropout=0.15 --config.steps=5000 --config.optim.decay_steps=2500
"""

from ip2p_jax.models import micro
from ip2p_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

# The micro models (ip2p_jax.models.micro: one layer a block, 4-dim attention heads, CLIP's
# vocabulary) widened. 64 px images -> 16x16x4 latents (two 2x downsamplings).
VAE = {
    **micro.VAE,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 16,
    "sample_size": 64,
    "scaling_factor": 1.0,
}
# Attention only at 8x8 and 4x4: at 16x16 it would cost more than the convolutions.
UNET = {
    **micro.UNET,
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "norm_num_groups": 16,
}
TEXT = {**micro.TEXT_ENCODER, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(unet=UNET, vae=VAE, text_encoder=TEXT),
        # No flips: they would turn "move left" into a move right under the same words. With
        # no augmentation the VAE latents are encoded once (a 0.96 s step becomes 0.72 s).
        data=DataConfig(
            path="data/shapes", resolution=64, flip_prob=0.0, workers=0, cache_latents=True
        ),
        # Constant 3e-4, then linear to 0 over the last 4000 steps: a run can be extended at the
        # constant rate (--config.steps moves only the cool-down), as the shipped one was.
        optim=OptimConfig(
            learning_rate=3e-4,
            warmup_steps=100,
            weight_decay=0.0,
            schedule="wsd",
            decay_steps=4000,
        ),
        batch_size=32,
        steps=21500,
        ema_decay=0.999,
        # From scratch, epsilon prediction learns the high-noise end too slowly: after 1000
        # steps its x0 estimate at t >= 700 was worse than copying the input image's latent,
        # and every edit came out in wrong colours. v weights those steps as x0 errors.
        prediction_type="v_prediction",
        log_every=10,
        checkpoint_every=250,
        validate_every=500,
    )
