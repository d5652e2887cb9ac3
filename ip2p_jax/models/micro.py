"""The smallest SD-1.x-shaped models: diffusers config dicts that the small models build on.

Each user writes its model as one of these plus the fields it changes (``{**UNET, ...}``):
the micro models the training tests train in seconds (tests/train/conftest.py, these dicts
as they are), the random-weight "tiny" presets of ip2p_jax.testing.reference_models, and the
shipped shapes model (configs/shapes_tiny.py). A change here changes all of them, the
shipped model's architecture included. Plain dicts, no imports: a config file reads them
without jax or torch.
"""

# 32 px images -> 16x16x4 latents; cross-attention only at the 8x8 level.
UNET = {
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
# One 2x downsampling. No scaling_factor: diffusers' default (SD's 0.18215) unless a user sets it.
VAE = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}
# CLIP's vocabulary and 77 positions (the bundled SD-1 tokenizer), hidden size = UNET's
# cross_attention_dim.
TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
