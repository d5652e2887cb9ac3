"""The paper's recipe: InstructPix2Pix fine-tuned from Stable Diffusion 1.5.

256 px, random crop + flip, AdamW lr 1e-4, total batch 1024, EMA 0.9999, conditioning
dropout 5/5/5 %, epsilon loss, 10,000 steps, conv_in widened 4 -> 8 (new channels zero).

    ip2p datagen import parquet PATH/TO/instructpix2pix-clip-filtered --out data/ip2p
    ip2p train --config configs/sd15.py --workdir runs/sd15 \\
        --config.model.init_from=PATH/TO/stable-diffusion-v1-5
    # 8 GPUs of 80 GB: 1024 = 32 per device x 8 devices x grad_accum 4 (the default here).
    # A v4-64 pod slice (32 chips): --config.grad_accum=1 --config.fsdp=4; see
    # scripts/launch_tpu_pod.sh. Resume after preemption: the same command with --resume.
"""

from ip2p_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(init_from="stable-diffusion-v1-5/stable-diffusion-v1-5", in_channels=8),
        data=DataConfig(
            path="data/ip2p",
            resolution=256,
            min_resize=256,
            max_resize=256,
            flip_prob=0.5,
            workers=8,
        ),
        # The original's LDM config: lr 1e-4 unscaled, no warmup, torch AdamW's decay 0.01.
        # Clipping at 1.0 as diffusers' training script (the original clipped nothing).
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, weight_decay=1e-2, grad_clip=1.0),
        batch_size=1024,
        grad_accum=4,
        steps=10_000,
        prediction_type="epsilon",
        ema_decay=0.9999,
        compute_dtype="bfloat16",  # fp32 master weights and optimizer state
        # Each UNet block recomputes its elementwise work in the backward pass, keeping its
        # matmul outputs: on XLA:CPU nearly the memory of nothing_saveable for 0.2 % more
        # FLOPs, against 11 % (docs/performance.md, "Remat per block"; GPU not measured).
        remat="dots_saveable",
        log_every=10,
        checkpoint_every=500,
        validate_every=1000,
        validation_steps=50,
    )
