"""The one place attention is computed.

Every attention in the UNet, VAE and CLIP text encoder goes through :func:`attention`, so a
faster kernel (cuDNN flash on GPU, splash on TPU) is chosen here alone. The CPU's default,
``blockwise``, is exact attention computed one head and block of queries at a time (short
sequences and masked (causal) attention take plain ``dot_product``); other backends default
to ``dot_product``.
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


def _softmax_rows(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact attention for one head and a block of queries: q [Tq, H], k/v [Tk, H]."""
    logits = jnp.matmul(q * q.shape[-1] ** -0.5, jnp.swapaxes(k, -1, -2))
    logits = logits.astype(jnp.float32)
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    out = jnp.matmul(weights.astype(v.dtype), v)
    return out / weights.sum(axis=-1, keepdims=True).astype(v.dtype)


# The most logits one step of the blockwise kernel holds (8 MB in fp32): small enough to stay
# in this CPU's L3 cache between the QK^T matmul, the softmax and the AV matmul.
BLOCK_LOGITS = 1 << 21


def _blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None,
    block_logits: int = BLOCK_LOGITS,
) -> jax.Array:
    """Exact attention one head at a time, and for long sequences one block of queries at a
    time (each block against all keys, so the softmax is exact). A step's logits stay in cache
    instead of a [batch, heads, T, T] array in memory. On this CPU that runs SD's 1024-token
    self-attention 1.5x and its 4096-token one 2.7x faster than batched blocks of queries over
    all heads at once, and 3-6x faster than one big softmax (``scripts/bench_attention.py``).
    Attention whose logits fit in one step anyway takes plain ``dot_product``."""
    batch, length, heads, dim = q.shape
    keys = k.shape[1]
    if causal or mask is not None or batch * heads * length * keys <= block_logits:
        return _xla_attention(q, k, v, causal=causal, mask=mask)
    block = max(1, min(length, block_logits // keys))
    blocks = -(-length // block)
    q = jnp.pad(q, ((0, 0), (0, blocks * block - length), (0, 0), (0, 0)))
    # [batch * heads, T, dim]: one head per row of the loop.
    per_head = lambda t: jnp.transpose(t, (0, 2, 1, 3)).reshape(batch * heads, -1, dim)
    k, v = per_head(k), per_head(v)
    q_blocks = per_head(q).reshape(batch * heads * blocks, block, dim)
    head_of_block = jnp.arange(batch * heads * blocks) // blocks
    out = jax.lax.map(
        lambda qh: _softmax_rows(qh[0], k[qh[1]], v[qh[1]]), (q_blocks, head_of_block)
    )
    out = out.reshape(batch, heads, blocks * block, dim)[:, :, :length]
    return jnp.transpose(out, (0, 2, 1, 3))


KERNELS: dict[str, AttentionFn] = {
    "dot_product": _xla_attention,
    "blockwise": _blockwise_attention,
    "cudnn": _cudnn_attention,
}

# The kernel each backend traces with unless attention_kernel() picks one: the blockwise loop
# suits a CPU's caches, but on a GPU or TPU its loop over heads would be hundreds of small
# sequential kernels, so they take XLA's attention.
BACKEND_DEFAULTS = {"cpu": "blockwise"}
_active: str | None = None  # set by attention_kernel(); None: the backend's default


def active_kernel() -> str:
    """The name of the kernel :func:`attention` uses now."""
    return _active or BACKEND_DEFAULTS.get(jax.default_backend(), "dot_product")


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
    out = KERNELS[active_kernel()](q, k, v, causal=causal, mask=mask)
    return out.astype(jnp.result_type(q))
