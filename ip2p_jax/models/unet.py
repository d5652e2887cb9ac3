"""UNet2DConditionModel (SD-1.x / SD-2.x families) in Flax linen, NHWC.

Submodule names mirror diffusers (``down_blocks_0/attentions_1/transformer_blocks_0/attn2``
for ``down_blocks.0.attentions.1.transformer_blocks.0.attn2``), so conversion is a rename.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.config import ConfigError, load_json, per_block, read_fields
from ip2p_jax.models.execution import Execution
from ip2p_jax.models.layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv,
    dense,
    layer_norm,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# Stable Diffusion's layout: three cross-attention levels and a plain one at the bottom.
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

_USED = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": SD_DOWN_BLOCKS,
    "up_block_types": SD_UP_BLOCKS,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
# Fields of diffusers' UNet2DConditionModel that change the math; we implement one value each.
_PINNED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Only read by the "text" addition embedding, which we do not implement.
_HARMLESS = frozenset({"addition_embed_type_num_heads"})
# The added conditioning we implement: SDXL's time ids and pooled text ("text_time").
ADDITION_EMBED_TYPES = (None, "text_time")
# The jax.checkpoint_policies (those without arguments) a UNet's blocks can be rematerialised
# with, by name: what each block saves for the backward pass (the rest is recomputed).
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The hyperparameters of a diffusers UNet2DConditionModel that this port implements."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = SD_DOWN_BLOCKS
    up_block_types: tuple[str, ...] = SD_UP_BLOCKS
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64
    # SDXL: sinusoidal features of the time ids (addition_time_embed_dim each) joined to the
    # pooled text embedding, projection_class_embeddings_input_dim in all, added to temb.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "unet config") -> UNetConfig:
        """Builds the config from a diffusers ``unet/config.json`` dict, refusing what we lack."""
        f = read_fields(raw, source=source, used=_USED, pinned=_PINNED, harmless=_HARMLESS)
        blocks = len(f["block_out_channels"])
        down, up = tuple(f["down_block_types"]), tuple(f["up_block_types"])
        for kind, allowed in ((down, DOWN_BLOCKS), (up, UP_BLOCKS)):
            if unknown := [b for b in kind if b not in allowed]:
                raise ConfigError(f"{source}: unsupported blocks {unknown} (only {allowed})")
        if len(down) != blocks or len(up) != blocks:
            raise ConfigError(f"{source}: need {blocks} down and up blocks, got {down}, {up}")
        if isinstance(f["layers_per_block"], (list, tuple)):
            raise ConfigError(f"{source}: per-block layers_per_block is not supported")
        if isinstance(f["cross_attention_dim"], (list, tuple)):
            raise ConfigError(f"{source}: per-block cross_attention_dim is not supported")
        if f["block_out_channels"][0] % 2:
            raise ConfigError(f"{source}: block_out_channels[0] must be even")
        if f["addition_embed_type"] not in ADDITION_EMBED_TYPES:
            raise ConfigError(
                f"{source}: addition_embed_type={f['addition_embed_type']!r} is not supported "
                f"(only {ADDITION_EMBED_TYPES})"
            )
        added = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        if f["addition_embed_type"] == "text_time" and not all(f[k] for k in added):
            raise ConfigError(f"{source}: addition_embed_type 'text_time' needs {added}")
        # diffusers' historic naming: attention_head_dim holds the number of heads.
        heads = f["num_attention_heads"] or f["attention_head_dim"]
        return cls(
            in_channels=f["in_channels"],
            out_channels=f["out_channels"],
            block_out_channels=tuple(f["block_out_channels"]),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=f["layers_per_block"],
            num_attention_heads=per_block(heads, blocks, "num_attention_heads", source),
            transformer_layers_per_block=per_block(
                f["transformer_layers_per_block"], blocks, "transformer_layers_per_block", source
            ),
            cross_attention_dim=f["cross_attention_dim"],
            use_linear_projection=f["use_linear_projection"],
            upcast_attention=f["upcast_attention"],
            flip_sin_to_cos=f["flip_sin_to_cos"],
            freq_shift=f["freq_shift"],
            downsample_padding=f["downsample_padding"],
            mid_block_scale_factor=f["mid_block_scale_factor"],
            norm_num_groups=f["norm_num_groups"],
            norm_eps=f["norm_eps"],
            sample_size=f["sample_size"],
            addition_embed_type=f["addition_embed_type"],
            addition_time_embed_dim=f["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=f["projection_class_embeddings_input_dim"],
        )

    @classmethod
    def from_file(cls, path: str | Path) -> UNetConfig:
        """Reads ``unet/config.json``."""
        return cls.from_dict(load_json(Path(path)), source=str(path))


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float
) -> jax.Array:
    """diffusers get_timestep_embedding: sinusoidal features of shape [batch, dim]."""
    half = dim // 2
    exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> silu -> linear_2."""

    dim: int
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        run = self.execution
        return dense(self.dim, "linear_2", run)(nn.silu(dense(self.dim, "linear_1", run)(x)))


class GEGLU(nn.Module):
    """proj to 2 x inner, then hidden * gelu(gate) (exact gelu)."""

    inner: int
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(dense(self.inner * 2, "proj", self.execution)(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward: net.0 (GEGLU to 4 x dim), net.1 dropout, net.2 linear."""

    dim: int
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        run = self.execution
        return dense(self.dim, "net_2", run)(GEGLU(self.dim * 4, run, name="net_0")(x))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm."""

    dim: int
    heads: int
    upcast: bool
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        run, head_dim = self.execution, self.dim // self.heads
        attn = lambda name: Attention(
            self.heads, head_dim, upcast=self.upcast, execution=run, name=name
        )
        x = x + attn("attn1")(layer_norm(1e-5, "norm1", run)(x))
        x = x + attn("attn2")(layer_norm(1e-5, "norm2", run)(x), context)
        return x + FeedForward(self.dim, run, name="ff")(layer_norm(1e-5, "norm3", run)(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear for SD-2), transformer blocks, proj_out, residual."""

    heads: int
    layers: int
    groups: int
    linear_projection: bool
    upcast: bool
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        tokens = lambda t: t.reshape(batch, height * width, channels)
        run = self.execution
        h = GroupNorm(self.groups, 1e-6, name="norm")(x)
        if self.linear_projection:
            h = dense(channels, "proj_in", run)(tokens(h))
        else:
            h = tokens(conv(channels, 1, "proj_in", execution=run)(h))
        for i in range(self.layers):
            block = BasicTransformerBlock(
                channels, self.heads, self.upcast, run, name=f"transformer_blocks_{i}"
            )
            h = block(h, context)
        if self.linear_projection:
            h = dense(channels, "proj_out", run)(h).reshape(x.shape)
        else:
            h = conv(channels, 1, "proj_out", execution=run)(h.reshape(x.shape))
        return h + x


def remat_policy(name: str) -> Callable | None:
    """The jax.checkpoint policy named ``name`` (one of :data:`REMAT_POLICIES`), None for ""
    (no rematerialisation). Raises ValueError naming the choices."""
    if not name:
        return None
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"remat={name!r} is not a remat policy; choose '' (none) or one of {REMAT_POLICIES}"
        )
    return getattr(jax.checkpoint_policies, name)


@functools.cache
def rematerialised(module_class: type[nn.Module], policy: str) -> type[nn.Module]:
    """``module_class``, or with ``policy`` (a name, see :func:`remat_policy`) its ``nn.remat``:
    the backward pass recomputes the block's activations that the policy does not save. The
    block's name, so its param paths, stay as they are."""
    if not policy:
        return module_class
    return nn.remat(module_class, policy=remat_policy(policy))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one down, mid or up block of the UNet is made of."""

    channels: int
    resnets: int
    heads: int | None  # None: no cross-attention transformers in this block
    transformer_layers: int
    resample: bool  # a downsampler (down blocks) or an upsampler (up blocks) at the end


class UNetBlock(nn.Module):
    """A down block (CrossAttnDownBlock2D / DownBlock2D) or an up block (the Up variants).

    Down blocks return their output and the skip activations they produce. Up blocks take
    their skips (one per resnet, consumed from the end) and the size to upsample to.
    """

    spec: BlockSpec
    config: UNetConfig
    up: bool
    execution: Execution = Execution()
    remat_policy: str = ""

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        temb: jax.Array,
        context: jax.Array,
        skips: tuple[jax.Array, ...] = (),
        upsample_size: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, list[jax.Array]]:
        spec, cfg, run = self.spec, self.config, self.execution
        resnet_class = rematerialised(ResnetBlock2D, self.remat_policy)
        produced = []
        for j in range(spec.resnets):
            if self.up:
                h = jnp.concatenate([h, skips[-1 - j]], axis=-1)
            h = resnet_class(
                spec.channels,
                cfg.norm_num_groups,
                cfg.norm_eps,
                execution=run,
                name=f"resnets_{j}",
            )(h, temb)
            if spec.heads is not None:
                transformer = _transformer(spec, cfg, run, self.remat_policy, f"attentions_{j}")
                h = transformer(h, context)
            produced.append(h)
        if spec.resample and self.up:
            doubled = (h.shape[1] * 2, h.shape[2] * 2)
            size = None if upsample_size in (None, doubled) else upsample_size
            h = Upsample2D(spec.channels, run, name="upsamplers_0")(h, size)
        elif spec.resample:
            h = Downsample2D(spec.channels, cfg.downsample_padding, run, name="downsamplers_0")(h)
            produced.append(h)
        return h, produced


def _transformer(
    spec: BlockSpec, cfg: UNetConfig, execution: Execution, remat: str, name: str
) -> Transformer2DModel:
    return rematerialised(Transformer2DModel, remat)(
        spec.heads,
        spec.transformer_layers,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        cfg.upcast_attention,
        execution,
        name=name,
    )


class MidBlock2DCrossAttn(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    spec: BlockSpec
    config: UNetConfig
    execution: Execution = Execution()
    remat_policy: str = ""

    @nn.compact
    def __call__(self, h, temb, context):
        spec, cfg, run = self.spec, self.config, self.execution
        resnet = lambda name: rematerialised(ResnetBlock2D, self.remat_policy)(
            spec.channels,
            cfg.norm_num_groups,
            cfg.norm_eps,
            cfg.mid_block_scale_factor,
            run,
            name=name,
        )
        h = resnet("resnets_0")(h, temb)
        h = _transformer(spec, cfg, run, self.remat_policy, "attentions_0")(h, context)
        return resnet("resnets_1")(h, temb)


class UNet2DConditionModel(nn.Module):
    """The denoiser: ``(sample [B,H,W,C], timesteps [B], text [B,T,D]) -> eps [B,H,W,out]``.

    Two fields change how it runs, never its params or (beyond float rounding) its numbers:
    ``execution`` (models.execution: compute dtype, attention kernel, convolution lowering;
    set from the backend profile where the module is built, weights.model_folder), and
    ``remat_policy``, a name from :data:`REMAT_POLICIES` that rematerialises each ResNet
    block and each transformer (Transformer2DModel) under that policy ("" none; the
    trainer sets it from TrainConfig.remat). The output is in the compute dtype.
    """

    config: UNetConfig
    execution: Execution = Execution()
    remat_policy: str = ""

    def block_specs(self) -> tuple[list[BlockSpec], BlockSpec, list[BlockSpec]]:
        """The down, mid and up blocks as diffusers builds them from the config."""
        cfg = self.config
        last = len(cfg.block_out_channels) - 1

        def spec(index: int, kind: str, resnets: int, resample: bool) -> BlockSpec:
            cross = kind.startswith("CrossAttn")
            return BlockSpec(
                cfg.block_out_channels[index],
                resnets,
                cfg.num_attention_heads[index] if cross else None,
                cfg.transformer_layers_per_block[index],
                resample,
            )

        down = [
            spec(i, kind, cfg.layers_per_block, i < last)
            for i, kind in enumerate(cfg.down_block_types)
        ]
        up = [
            spec(last - i, kind, cfg.layers_per_block + 1, i < last)
            for i, kind in enumerate(cfg.up_block_types)
        ]
        return down, spec(last, "CrossAttn", 1, False), up

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``text_embeds`` [B, D] (the pooled text) and ``time_ids`` [B, 6] are SDXL's added
        conditioning (diffusers' ``added_cond_kwargs``), needed when the config's
        addition_embed_type is "text_time" and refused otherwise."""
        cfg = self.config
        first = cfg.block_out_channels[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        t_emb = timestep_embedding(timesteps, first, cfg.flip_sin_to_cos, cfg.freq_shift)
        run, remat = self.execution, self.remat_policy
        # The sinusoidal features in float32 (as diffusers), the MLP in the compute dtype.
        temb = TimestepEmbedding(first * 4, run, name="time_embedding")(
            t_emb.astype(run.compute_dtype)
        )
        added = self._added_embedding(text_embeds, time_ids, sample.shape[0])
        if added is not None:
            temb = temb + added
        context = encoder_hidden_states.astype(run.compute_dtype)
        down, mid, up = self.block_specs()
        block = functools.partial(UNetBlock, execution=run, remat_policy=remat)

        h = conv(first, 3, "conv_in", execution=run)(sample)
        skips = [h]
        for i, spec in enumerate(down):
            h, produced = block(spec, cfg, up=False, name=f"down_blocks_{i}")(h, temb, context)
            skips += produced
        h = MidBlock2DCrossAttn(mid, cfg, run, remat, name="mid_block")(h, temb, context)
        for i, spec in enumerate(up):
            mine, skips = skips[-spec.resnets :], skips[: -spec.resnets]
            # Sides that were odd on the way down come back at the next skip's size, as diffusers.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            h, _ = block(spec, cfg, up=True, name=f"up_blocks_{i}")(
                h, temb, context, tuple(mine), size
            )

        h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(h))
        return conv(cfg.out_channels, 3, "conv_out", execution=run)(h)

    def _added_embedding(
        self, text_embeds: jax.Array | None, time_ids: jax.Array | None, batch: int
    ) -> jax.Array | None:
        """SDXL's "text_time" embedding (diffusers' add_time_proj + add_embedding), or None
        for a UNet without added conditioning. Shapes are checked here, at trace time."""
        cfg, run = self.config, self.execution
        given = text_embeds is not None or time_ids is not None
        if cfg.addition_embed_type is None:
            if given:
                raise ValueError(
                    "this UNet takes no text_embeds or time_ids (no addition_embed_type)"
                )
            return None
        if text_embeds is None or time_ids is None:
            raise ValueError(
                "an SDXL UNet (addition_embed_type 'text_time') needs text_embeds [batch, D] "
                "and time_ids [batch, 6]"
            )
        width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
        if (
            text_embeds.shape[0] != batch
            or time_ids.shape[0] != batch
            or (width != cfg.projection_class_embeddings_input_dim)
        ):
            raise ValueError(
                f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
                f"{width} features for batch {batch}; the UNet expects "
                f"{cfg.projection_class_embeddings_input_dim} (pooled text + time ids x "
                f"{cfg.addition_time_embed_dim})"
            )
        features = timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(batch, -1)
        joined = jnp.concatenate([text_embeds.astype(jnp.float32), features], axis=-1)
        embedding = TimestepEmbedding(cfg.block_out_channels[0] * 4, run, name="add_embedding")
        return embedding(joined.astype(run.compute_dtype))
