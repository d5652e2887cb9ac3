"""Random-weight Stable Diffusion / InstructPix2Pix folders, saved by the PyTorch classes.

There is no model hub here, so tests, benchmarks and the demo build their own checkpoints in
the real diffusers layout. Imports torch, diffusers and transformers (the ``torch`` extra)
inside functions only: the rest of ip2p_jax never needs them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ip2p_jax.models import micro
from ip2p_jax.models.tokenizer import BUNDLED_DIR

# SD-1.x in miniature: the micro models with attention at the top level (where SD has it),
# two layers a block, a wider VAE and a deeper text encoder than the training tests'.
_TINY_UNET = {
    **micro.UNET,
    "in_channels": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
}
_TINY_VAE = {**micro.VAE, "block_out_channels": [32, 64]}
_TINY_TEXT = {**micro.TEXT_ENCODER, "intermediate_size": 37, "num_hidden_layers": 3}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # SD-1.x in miniature.
    "tiny": {"unet": _TINY_UNET, "vae": _TINY_VAE, "text_encoder": _TINY_TEXT},
    # SD-2.x in miniature: linear projections, per-block heads, wider text, gelu, upcasting.
    "tiny-sd2": {
        "unet": {
            **_TINY_UNET,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [2, 4, 8],
            "use_linear_projection": True,
            "upcast_attention": True,
            "cross_attention_dim": 48,
        },
        "vae": _TINY_VAE,
        "text_encoder": {**_TINY_TEXT, "hidden_size": 48, "hidden_act": "gelu"},
    },
    # SDXL in miniature (diffusers' own SDXL InstructPix2Pix test model, made stricter): no
    # attention at the top level, per-level transformer depths and heads, linear projections,
    # the "text_time" added conditioning, and two text encoders of different widths whose
    # penultimate states are joined (32 + 48 = 80), the second one's pooled output projected.
    "tiny-sdxl": {
        "unet": {
            **_TINY_UNET,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "use_linear_projection": True,
            "cross_attention_dim": 80,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 24,
        },
        "vae": {**_TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _TINY_TEXT,
        "text_encoder_2": {
            **_TINY_TEXT,
            "hidden_size": 48,
            "hidden_act": "gelu",
            "projection_dim": 24,
        },
    },
    # The real SD-1.5 architecture (UNet widened to 8 input channels as InstructPix2Pix).
    "sd15": {
        "unet": {"in_channels": 8, "cross_attention_dim": 768, "sample_size": 64},
        "vae": {
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 512,
        },
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
    },
}

# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), widened
# to 8 input channels as SDXL InstructPix2Pix: 2.57 B parameters, 10.3 GB in float32.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _perturb(module: Any, seed: int) -> None:
    """Moves norm scales off 1 and biases off 0, so a swapped or dropped one shows in parity."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def build_modules(preset: str = "tiny", seed: int = 0, overrides: dict | None = None) -> dict:
    """The preset's PyTorch components with random weights, in eval mode, by folder name:
    unet, vae, text_encoder, and SDXL's text_encoder_2 (a CLIPTextModelWithProjection)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    configs = copy.deepcopy(PRESETS[preset])
    for name, fields in (overrides or {}).items():
        configs[name].update(fields)
    torch.manual_seed(seed)
    modules = {
        "unet": UNet2DConditionModel(**configs["unet"]),
        "vae": AutoencoderKL(**configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    }
    if "text_encoder_2" in configs:
        text_config = CLIPTextConfig(**configs["text_encoder_2"])
        modules["text_encoder_2"] = CLIPTextModelWithProjection(text_config)
    for offset, module in enumerate(modules.values()):
        _perturb(module, seed + offset)
        module.eval()
    return modules


def random_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DConditionModel of ``config`` with random weights drawn fast: the
    scale of torch's default init (uniform within 1 / sqrt(fan_in)), norm scales about 1 and
    biases about 0 off them as `_perturb` puts them. numpy's generator fills SDXL's 2.6 B
    weights in seconds, where torch's own init takes half a minute on 2 cores."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            values = param.numpy()  # the tensor's memory: drawn into, shifted and scaled in place
            rng.random(dtype=np.float32, out=values)
            if param.ndim > 1:
                values -= 0.5
                values *= 2 * param[0].numel() ** -0.5
            else:
                values -= 0.5
                values *= 0.2
                values += 1.0 if name.endswith("weight") else 0.0
    return unet


def build_components(preset: str = "tiny", seed: int = 0, overrides: dict | None = None):
    """PyTorch (unet, vae, text_encoder) with random weights for a preset, in eval mode."""
    modules = build_modules(preset, seed, overrides)
    return modules["unet"], modules["vae"], modules["text_encoder"]


def build_pipeline_folder(
    path: str | Path, preset: str = "tiny", seed: int = 0, overrides: dict | None = None
) -> Path:
    """Saves a random-weight ``StableDiffusionInstructPix2PixPipeline`` folder at ``path``."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder = build_components(preset, seed, overrides)
    tokenizer = CLIPTokenizer.from_pretrained(str(BUNDLED_DIR))
    if preset == "tiny-sd2":  # SD-2 pads with "!" (id 0) where SD-1 pads with the EOS token
        tokenizer.pad_token = "!"
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    return Path(path)


def build_sdxl_folder(
    path: str | Path,
    preset: str = "tiny-sdxl",
    seed: int = 0,
    overrides: dict | None = None,
    *,
    scheduler: str = "EulerDiscreteScheduler",
) -> Path:
    """Saves a random-weight ``StableDiffusionXLInstructPix2PixPipeline`` folder at ``path``:
    both tokenizers are the bundled CLIP one, the second padding with "!" as SDXL's does.
    ``scheduler`` "EDMEulerScheduler" makes a CosXL-Edit-style folder (v-prediction)."""
    import diffusers
    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from transformers import CLIPTokenizer

    modules = build_modules(preset, seed, overrides)
    tokenizer = CLIPTokenizer.from_pretrained(str(BUNDLED_DIR))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(BUNDLED_DIR), pad_token="!")
    schedulers = {
        "EulerDiscreteScheduler": SCHEDULER,
        "EDMEulerScheduler": {
            "sigma_min": 0.002,
            "sigma_max": 120.0,
            "sigma_data": 1.0,
            "prediction_type": "v_prediction",
            "sigma_schedule": "exponential",
        },
    }
    if scheduler not in schedulers:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(schedulers)}")
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=getattr(diffusers, scheduler)(**schedulers[scheduler]),
        add_watermarker=False,
        is_cosxl_edit=scheduler == "EDMEulerScheduler",
    )
    pipe.save_pretrained(str(path))
    return Path(path)


# A CLIP (text and vision towers) in miniature for the data generator's filter: the SD-1
# tokenizer's vocabulary, 32 px images in 8 px patches.
TINY_CLIP = {
    "text_config": _TINY_TEXT,
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "quick_gelu",
    },
    "projection_dim": 16,
}


def build_clip_folder(path: str | Path, seed: int = 0) -> Path:
    """Saves a random-weight transformers ``CLIPModel`` and its tokenizer at ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**copy.deepcopy(TINY_CLIP))).eval()
    _perturb(model, seed)
    model.save_pretrained(str(path))
    CLIPTokenizer.from_pretrained(str(BUNDLED_DIR)).save_pretrained(str(path))
    return Path(path)


def build_vit_folder(
    path: str | Path, *, image_size: int = 32, patch_size: int = 8, seed: int = 0
) -> Path:
    """Saves a random-weight transformers ``ViTModel`` in miniature (DINO's architecture:
    hidden 32, 2 layers) taking ``image_size`` px images in ``patch_size`` patches."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=image_size,
        patch_size=patch_size,
    )
    ViTModel(config).eval().save_pretrained(str(path))
    return Path(path)
