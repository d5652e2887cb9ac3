"""Building blocks shared by the UNet and the VAE, named as diffusers names them.

Activations are NHWC. Normalisations compute their statistics as torch does (two-pass
variance, in float32) so the ports agree to the last decimal with the PyTorch modules.
Blocks take an ``execution`` (models.execution): their compute dtype, attention kernel and
convolution lowering.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.attention import attention
from ip2p_jax.models.execution import Execution


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the channel (last) axis; params ``scale`` and ``bias``."""

    num_groups: int
    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        grouped = x.astype(jnp.float32).reshape(
            *x.shape[:-1], self.num_groups, channels // self.num_groups
        )
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale + bias).astype(x.dtype)


def layer_norm(epsilon: float, name: str, execution: Execution) -> nn.LayerNorm:
    """torch.nn.LayerNorm: two-pass variance (flax's fast variance loses digits), statistics
    in float32, output in the compute dtype."""
    return nn.LayerNorm(
        epsilon=epsilon, use_fast_variance=False, dtype=execution.compute_dtype, name=name
    )


def dense(features: int, name: str, execution: Execution, use_bias: bool = True) -> nn.Dense:
    """torch.nn.Linear computing in the execution's dtype (inputs and kernel cast to it)."""
    return nn.Dense(features, use_bias=use_bias, dtype=execution.compute_dtype, name=name)


class Conv2d(nn.Module):
    """torch.nn.Conv2d in NHWC with symmetric zero padding; params ``kernel`` (HWIO), ``bias``.

    ``patches_max_rows`` picks the lowering (the backend profile's ``conv_patches_max_rows``,
    see runtime.profile): 0 runs the native convolution; N > 0 runs 1x1 convolutions, and
    those whose output has at most N rows (batch x positions), as one matmul over gathered
    patches (im2col). Both give the same numbers to float rounding, and the same params.
    ``dtype`` is the compute dtype (input, kernel and bias cast to it); None: the input's.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    patches_max_rows: int = 0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size, stride, pad = self.kernel_size, self.stride, self.padding
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (size, size, x.shape[-1], self.features)
        )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        kernel = kernel.astype(x.dtype)
        height, width = x.shape[1:3]
        out_h = (height + 2 * pad - size) // stride + 1
        out_w = (width + 2 * pad - size) // stride + 1
        rows = x.shape[0] * out_h * out_w
        as_matmul = self.patches_max_rows > 0 and (
            (size == 1 and stride == 1) or rows <= self.patches_max_rows
        )
        if not as_matmul:
            out = jax.lax.conv_general_dilated(
                x,
                kernel,
                (stride, stride),
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            return out + bias
        if pad:
            x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        rows = lambda i: slice(i, i + stride * (out_h - 1) + 1, stride)
        cols = lambda j: slice(j, j + stride * (out_w - 1) + 1, stride)
        taps = [x[:, rows(i), cols(j)] for i in range(size) for j in range(size)]
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        return patches @ kernel.reshape(-1, self.features) + bias


def conv(
    features: int,
    kernel: int,
    name: str,
    stride: int = 1,
    padding: int | None = None,
    *,
    execution: Execution,
) -> Conv2d:
    """A torch-style Conv2d: symmetric padding, default ``kernel // 2``, lowered and computed
    as ``execution`` says (see :class:`Conv2d`)."""
    pad = kernel // 2 if padding is None else padding
    return Conv2d(
        features,
        kernel,
        stride,
        pad,
        execution.conv_patches_max_rows,
        execution.compute_dtype,
        name=name,
    )


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode="nearest") to ``size``: source index floor(dst * in / out)."""
    height, width = x.shape[1:3]
    rows = jnp.minimum(jnp.floor(jnp.arange(size[0]) * (height / size[0])), height - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(size[1]) * (width / size[1])), width - 1)
    return x[:, rows.astype(jnp.int32)][:, :, cols.astype(jnp.int32)]


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm="default", silu)."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        run = self.execution
        x = x.astype(run.compute_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1")(x))
        h = conv(self.out_channels, 3, "conv1", execution=run)(h)
        if temb is not None:
            h = h + dense(self.out_channels, "time_emb_proj", run)(nn.silu(temb))[:, None, None]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2")(h))
        h = conv(self.out_channels, 3, "conv2", execution=run)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", execution=run)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 is the VAE's variant: pad right and bottom by one first."""

    out_channels: int
    padding: int = 1
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.out_channels, 3, "conv", stride=2, padding=self.padding, execution=self.execution
        )(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to ``size``, for sides that were odd on the way down), then a 3x3 conv."""

    out_channels: int
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        if size is None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = nearest_resize(x, size)
        return conv(self.out_channels, 3, "conv", execution=self.execution)(x)


class Attention(nn.Module):
    """diffusers Attention: to_q/to_k/to_v, multi-head attention, to_out.0.

    ``group_norm_groups`` gives the VAE's single-head spatial variant: a GroupNorm before the
    projections and a residual connection around the whole block.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    group_norm_groups: int | None = None
    eps: float = 1e-6
    upcast: bool = False  # diffusers' upcast_attention: q, k, v in float32 whatever the dtype
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        run = self.execution
        x = residual = x.astype(run.compute_dtype)
        spatial = x.ndim == 4
        if spatial:
            batch, height, width, channels = x.shape
            x = x.reshape(batch, height * width, channels)
        if self.group_norm_groups is not None:
            x = GroupNorm(self.group_norm_groups, self.eps, name="group_norm")(x)
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def project(name: str, source: jax.Array) -> jax.Array:
            out = dense(inner, name, run, use_bias=self.qkv_bias)(source)
            return out.reshape(*out.shape[:2], self.heads, self.dim_head)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = attention(q, k, v, kernel=run.attention).astype(x.dtype)
        out = dense(residual.shape[-1], "to_out_0", run)(out.reshape(*out.shape[:2], inner))
        if spatial:
            out = out.reshape(residual.shape)
        if self.group_norm_groups is not None:
            out = out + residual
        return out
