r"""The shapes world on one GPU (an H200): a larger UNet and a trained text encoder, from
scratch, in about 5 minutes of steps. `scripts/device_train_shapes.sh` runs the whole recipe
(generate, train, export, score) on the lent GPU machine; by hand:

ip2p datagen shapes --num 120000 --out data/shapes_gpu --workers 16
ip2p train --config configs/shapes_gpu.py --workdir runs/shapes_gpu

What changes from configs/shapes_tiny.py (the CPU recipe of the shipped model), and why:
- The UNet: 96/112/128 channels, two layers a block, cross-attention at 16x16 and 8x8 (the
  latents' full resolution, where a small shape is two or three latent pixels wide). 9.4 M
  parameters, 2.7x the shipped UNet's forward FLOPs; the largest that keeps the float16
  model folder under 30 MB (the 128/256/256 UNet would be 68 MB alone).
- The text encoder trains from the first step, with word dropout: the shipped model's
  frozen random encoder had to be unlearned in its later stages.
- The shipped model's VAE, frozen (a right edit drawn through it scores 94 %), its latents
  encoded once on the GPU (data.cache_latents).
- Batch 512 in bfloat16: 16x the CPU's batch, so 2.6 M training examples in the run's 5000
  steps, against the shipped model's 1 M over 9 h; 13.7 PFLOP against its ~2
  (scripts/train_cost.py).

Sized for 7 minutes of an H200, compile and latent encoding included. The bound is the input
pipeline, not the GPU: batches are tokenized in Python at ~8000 examples/s on one core
(63 ms a batch), where the step's 2.7 TFLOP take 28 ms at 10 % of the H200's peak.
"""

from ip2p_jax.assets import ASSETS
from ip2p_jax.models import micro
from ip2p_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

UNET = {
    **micro.UNET,
    "block_out_channels": [96, 112, 128],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    # Heads per level (diffusers' name): 32-, 28- and 32-wide heads, which cuDNN's flash
    # attention takes (it pads 28 to 32).
    "attention_head_dim": [3, 4, 4],
    "cross_attention_dim": 64,
    "norm_num_groups": 16,
}
# The shipped encoder's width (its 49,408 x 64 token table is most of its 6.5 MB), twice
# as deep.
TEXT = {**micro.TEXT_ENCODER, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4}

STEPS = 5000


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            unet=UNET,
            text_encoder=TEXT,
            vae_from=str(ASSETS / "shapes_model"),
            train_text_encoder=True,
        ),
        # No flips (they would turn "move left" into a move right under the same words), so
        # the latents are encoded once. Batches of cached latents are made in the training
        # process: a worker process would hand each example over at ~1 ms (8170 examples/s
        # here without, 890 with one worker).
        data=DataConfig(
            path="data/shapes_gpu",
            resolution=64,
            flip_prob=0.0,
            workers=0,
            cache_latents=True,
            word_dropout=0.1,
        ),
        # Warm-up, constant, then linear to 0 over the last quarter.
        optim=OptimConfig(
            learning_rate=5e-4,
            warmup_steps=200,
            weight_decay=0.0,
            schedule="wsd",
            decay_steps=STEPS // 4,
        ),
        batch_size=512,
        steps=STEPS,
        ema_decay=0.999,
        compute_dtype=None,  # the backend's: bfloat16 on a GPU (float32 in the CPU smoke run)
        # v weights the high-noise steps as x0 errors (see configs/shapes_tiny.py).
        prediction_type="v_prediction",
        log_every=100,
        # About a minute of steps at the estimated 63 ms: a run cut off by the device's time
        # limit still exports a model at most a minute old.
        checkpoint_every=1000,
        keep_checkpoints=2,
    )
