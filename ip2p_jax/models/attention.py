"""The one place attention is computed.

Every attention in the UNet, VAE and CLIP text encoder goes through :func:`attention`, so a
faster kernel (cuDNN flash on GPU, splash on TPU, blockwise on CPU) is chosen here alone.
Tensors are laid out ``[batch, length, heads, head_dim]``, as ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


def _xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, mask: jax.Array | None
) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def _cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, mask: jax.Array | None
) -> jax.Array:
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation="cudnn"
    )


KERNELS: dict[str, AttentionFn] = {
    "dot_product": _xla_attention,
    "cudnn": _cudnn_attention,
}

_active = "dot_product"


def register_kernel(name: str, fn: AttentionFn) -> None:
    """Adds an attention kernel ``fn(q, k, v, *, causal, mask) -> out`` under ``name``."""
    KERNELS[name] = fn


@contextlib.contextmanager
def attention_kernel(name: str) -> Iterator[None]:
    """Traces the models inside this block with the kernel ``name`` (see :data:`KERNELS`)."""
    global _active
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}")
    previous, _active = _active, name
    try:
        yield
    finally:
        _active = previous


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v, with the active kernel.

    ``mask`` is boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True = attend.
    """
    out = KERNELS[_active](q, k, v, causal=causal, mask=mask)
    return out.astype(jnp.result_type(q))
