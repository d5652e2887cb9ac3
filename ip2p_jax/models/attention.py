"""The one place attention is computed.

Every attention in the UNet, VAE and CLIP text encoder goes through :func:`attention`, with
the kernel named by the model's static ``Execution.attention`` (models.execution), which the
backend profile chooses (runtime.profile): the CPU's ``blockwise`` is exact attention
computed one head and block of queries at a time (short sequences and masked (causal)
attention take plain ``dot_product``); GPUs take cuDNN's fused attention, TPUs Pallas'.
Tensors are laid out ``[batch, length, heads, head_dim]``, as ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None,
    scale: float | None = None,
) -> jax.Array:
    """XLA's attention (``jax.nn.dot_product_attention``), the softmax in float32; ``scale``
    defaults to 1/sqrt(head_dim). The kernel every other kernel falls back to."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, scale=scale, implementation="xla"
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
    if q.dtype == jnp.float16:
        # XLA:CPU has no float16 dot with float32 accumulation (the F16_F16_F32 preset
        # jax.nn.dot_product_attention asks for), and no fast float16 at all: float32 here.
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    batch, length, heads, dim = q.shape
    keys = k.shape[1]
    if causal or mask is not None or batch * heads * length * keys <= block_logits:
        return xla_attention(q, k, v, causal=causal, mask=mask)
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


def _cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, mask: jax.Array | None
) -> jax.Array:
    from ip2p_jax.models.accelerator_attention import cudnn_attention  # imports this module

    return cudnn_attention(q, k, v, causal=causal, mask=mask)


def _pallas_tpu_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, mask: jax.Array | None
) -> jax.Array:
    from ip2p_jax.models.accelerator_attention import pallas_tpu_attention

    return pallas_tpu_attention(q, k, v, causal=causal, mask=mask)


KERNELS: dict[str, AttentionFn] = {
    "dot_product": xla_attention,
    "blockwise": _blockwise_attention,
    "cudnn": _cudnn_attention,
    "pallas_tpu": _pallas_tpu_attention,
}


def register_kernel(name: str, fn: AttentionFn) -> None:
    """Adds an attention kernel ``fn(q, k, v, *, causal, mask) -> out`` under ``name``; models
    use it once their ``Execution.attention`` names it (models.execution)."""
    KERNELS[name] = fn


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kernel: str = "dot_product",
    causal: bool = False,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v, with the kernel named
    ``kernel`` (see :data:`KERNELS`; the models pass their ``Execution.attention``).

    ``mask`` is boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True = attend.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {sorted(KERNELS)}")
    out = KERNELS[kernel](q, k, v, causal=causal, mask=mask)
    return out.astype(jnp.result_type(q))
