"""InstructPix2Pix on SDXL, after diffusers' train_instruct_pix2pix_sdxl.py (in
examples/instruct_pix2pix) and the run its README documents: 256 px, random flip, lr 5e-5
constant, 4 per device x grad_accum 4, gradient checkpointing, 15,000 steps, conditioning
dropout 5/5/5 %.

What the step does as that script (ip2p_jax.train.conditioning): the UNet's text states are
both encoders' penultimate hidden states joined, its added conditioning the second encoder's
pooled projection and the time ids (256, 256, 0, 0, 256, 256); dropout swaps the text states
for those of "" and keeps the pooled text; the input image's latent is a posterior draw
(image_condition="sample"). Weights fp32, UNet and text encoders computing in bfloat16, the
frozen VAE in float32 (SDXL's VAE overflows in fp16: diffusers' force_upcast).

    ip2p train --config configs/sdxl.py --workdir runs/sdxl \\
        --config.model.init_from=PATH/TO/stable-diffusion-xl-base-1.0
    # Stability's published editing model was trained at 768 px:
    #   --config.data.resolution=768 --config.data.min_resize=768 --config.data.max_resize=768
    # More devices: the global batch is per-device x devices x grad_accum, e.g. 8 GPUs:
    #   --config.batch_size=128; a pod slice also --config.fsdp=4 (see configs/sd15.py).

The trained model is an SDXL InstructPix2Pix folder: `ip2p edit --model runs/sdxl/model`,
and `ip2p export` writes what StableDiffusionXLInstructPix2PixPipeline loads.
"""

from ip2p_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(init_from="stabilityai/stable-diffusion-xl-base-1.0", in_channels=8),
        data=DataConfig(
            path="data/ip2p",
            resolution=256,
            min_resize=256,
            max_resize=256,
            flip_prob=0.5,
            workers=8,
        ),
        # The script's AdamW (decay 1e-2) at a constant 5e-5, no warmup, clipping at 1.0.
        optim=OptimConfig(learning_rate=5e-5, warmup_steps=0, weight_decay=1e-2, grad_clip=1.0),
        batch_size=16,
        grad_accum=4,
        steps=15_000,
        prediction_type="epsilon",  # SDXL base's; the script trains what the scheduler says
        image_condition="sample",  # the script encodes the input with latent_dist.sample()
        ema_decay=0.0,  # the documented run has no --use_ema; 0.9999 keeps an EMA
        compute_dtype="bfloat16",
        remat="dots_saveable",  # the script's --gradient_checkpointing
        log_every=10,
        checkpoint_every=500,
        validate_every=1000,
        validation_steps=20,  # as the script's validation edits
    )
