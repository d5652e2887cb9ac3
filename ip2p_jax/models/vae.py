"""AutoencoderKL (the Stable Diffusion VAE) in Flax linen, NHWC; names mirror diffusers."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.config import ConfigError, load_json, read_fields
from ip2p_jax.models.execution import Execution
from ip2p_jax.models.layers import (
    Attention,
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
)
from ip2p_jax.models.layers import conv as conv2d

_USED = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_PINNED = {"act_fn": "silu"}
# force_upcast only says the PyTorch pipeline should run the VAE in float32.
_HARMLESS = frozenset({"force_upcast"})
_EPS = 1e-6  # diffusers' Encoder/Decoder use 1e-6 everywhere


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The hyperparameters of a diffusers AutoencoderKL that this port implements."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "vae config") -> VAEConfig:
        """Builds the config from a diffusers ``vae/config.json`` dict, refusing what we lack."""
        f = read_fields(raw, source=source, used=_USED, pinned=_PINNED, harmless=_HARMLESS)
        blocks = len(f["block_out_channels"])
        for name, kind in (("down", "DownEncoderBlock2D"), ("up", "UpDecoderBlock2D")):
            types = list(f[f"{name}_block_types"])
            if types != [kind] * blocks:
                raise ConfigError(f"{source}: {name}_block_types={types}, expected {blocks} {kind}")
        if f["latents_mean"] is not None or f["latents_std"] is not None:
            raise ConfigError(f"{source}: latents_mean / latents_std are not supported")
        return cls(
            in_channels=f["in_channels"],
            out_channels=f["out_channels"],
            block_out_channels=tuple(f["block_out_channels"]),
            layers_per_block=f["layers_per_block"],
            latent_channels=f["latent_channels"],
            norm_num_groups=f["norm_num_groups"],
            scaling_factor=f["scaling_factor"],
            shift_factor=f["shift_factor"],
            use_quant_conv=f["use_quant_conv"],
            use_post_quant_conv=f["use_post_quant_conv"],
            mid_block_add_attention=f["mid_block_add_attention"],
            sample_size=f["sample_size"],
        )

    @classmethod
    def from_file(cls, path: str | Path) -> VAEConfig:
        """Reads ``vae/config.json``."""
        return cls.from_dict(load_json(Path(path)), source=str(path))


class MidBlock2D(nn.Module):
    """UNetMidBlock2D: resnet, single-head spatial attention (optional), resnet."""

    channels: int
    groups: int
    add_attention: bool
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        resnet = functools.partial(ResnetBlock2D, execution=self.execution)
        h = resnet(self.channels, self.groups, _EPS, name="resnets_0")(h)
        if self.add_attention:
            h = Attention(
                1,
                self.channels,
                qkv_bias=True,
                group_norm_groups=self.groups,
                eps=_EPS,
                execution=self.execution,
                name="attentions_0",
            )(h)
        return resnet(self.channels, self.groups, _EPS, name="resnets_1")(h)


class ResampleBlock(nn.Module):
    """DownEncoderBlock2D (resnets, then a downsampler) or UpDecoderBlock2D (then an upsampler)."""

    channels: int
    resnets: int
    groups: int
    resample: bool
    up: bool
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        run = self.execution
        for j in range(self.resnets):
            h = ResnetBlock2D(self.channels, self.groups, _EPS, execution=run, name=f"resnets_{j}")(
                h
            )
        if self.resample and self.up:
            h = Upsample2D(self.channels, run, name="upsamplers_0")(h)
        elif self.resample:
            h = Downsample2D(self.channels, padding=0, execution=run, name="downsamplers_0")(h)
        return h


class Encoder(nn.Module):
    """Image [B,H,W,3] in [-1, 1] -> moments [B,H/f,W/f,2*latent] (mean, logvar)."""

    config: VAEConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, run = self.config, self.execution
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        h = conv2d(channels[0], 3, "conv_in", execution=run)(x)
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            block = ResampleBlock(
                ch,
                cfg.layers_per_block,
                groups,
                not last,
                up=False,
                execution=run,
                name=f"down_blocks_{i}",
            )
            h = block(h)
        mid = MidBlock2D(channels[-1], groups, cfg.mid_block_add_attention, run, name="mid_block")
        h = nn.silu(GroupNorm(groups, _EPS, name="conv_norm_out")(mid(h)))
        return conv2d(2 * cfg.latent_channels, 3, "conv_out", execution=run)(h)


class Decoder(nn.Module):
    """Latent [B,h,w,latent] -> image [B,H,W,3] in about [-1, 1]."""

    config: VAEConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, run = self.config, self.execution
        channels, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        h = conv2d(channels[0], 3, "conv_in", execution=run)(z)
        mid = MidBlock2D(channels[0], groups, cfg.mid_block_add_attention, run, name="mid_block")
        h = mid(h)
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            block = ResampleBlock(
                ch,
                cfg.layers_per_block + 1,
                groups,
                not last,
                up=True,
                execution=run,
                name=f"up_blocks_{i}",
            )
            h = block(h)
        h = nn.silu(GroupNorm(groups, _EPS, name="conv_norm_out")(h))
        return conv2d(cfg.out_channels, 3, "conv_out", execution=run)(h)


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The VAE posterior: ``mean`` and ``logvar`` (clipped to [-30, 20] as diffusers)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        """The mean: the image-conditioning latent of InstructPix2Pix (unscaled)."""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * N(0, 1)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


jax.tree_util.register_dataclass(DiagonalGaussian, data_fields=["mean", "logvar"], meta_fields=[])


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL. ``encode`` gives the posterior, ``decode`` the image.

    Latents are unscaled here: multiply by ``config.scaling_factor`` for the diffusion space.
    ``execution`` (models.execution) is the compute dtype, attention kernel and convolution
    lowering, set from the backend profile where the module is built (weights.model_folder);
    it changes neither the params nor, beyond float rounding, the numbers. The posterior
    and the decoded images come out in float32 whatever the compute dtype.
    """

    config: VAEConfig
    execution: Execution = Execution()

    def setup(self) -> None:
        cfg, run = self.config, self.execution
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg, run)
        self.decoder = Decoder(cfg, run)
        quant = lambda features: Conv2d(
            features, 1, patches_max_rows=run.conv_patches_max_rows, dtype=run.compute_dtype
        )
        self.quant_conv = quant(2 * latent) if cfg.use_quant_conv else None
        self.post_quant_conv = quant(latent) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Images [B,H,W,C] in [-1, 1] -> the latent posterior."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B,h,w,latent] -> images [B,H,W,C], about [-1, 1]."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mode (also what ``init`` traces)."""
        return self.decode(self.encode(images).mode())
