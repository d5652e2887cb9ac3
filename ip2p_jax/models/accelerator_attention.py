"""Attention kernels for accelerators: cuDNN flash attention (GPU) and Pallas splash attention
(TPU), each with XLA's attention for the calls its fast kernel cannot take.

Both have the signature of :mod:`ip2p_jax.models.attention`'s kernels,
``fn(q, k, v, *, causal, mask) -> out`` on ``[batch, length, heads, head_dim]`` tensors, with
the scale 1/sqrt(head_dim) and the softmax in float32. Whether the fast kernel takes a call is
decided from shapes, dtypes and whether there is a mask alone, so at trace time; the rules are
the pure functions :func:`cudnn_refusal` and :func:`pallas_tpu_refusal`, which say why a call
goes to XLA. Importing this module is cheap on any machine: the Pallas modules are imported
when the TPU kernel is traced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ip2p_jax.models.attention import xla_attention


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_head_dim(x: jax.Array, head_dim: int) -> jax.Array:
    """``x`` ``[..., d]`` with zeros appended to its last axis up to ``head_dim``.

    Zero columns in q and k add nothing to q k^T, so the logits are unchanged (as long as the
    scale comes from the original head dim); zero columns in v give zero output columns, which
    the caller slices off."""
    extra = head_dim - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _padded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None,
    head_dim: int,
    implementation: str,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with q/k/v zero-padded to ``head_dim`` and the scale of
    the original head dim. A mask is broadcast to full ``[q_len, kv_len]`` in its last two axes:
    jax's cuDNN path turns it into a bias that must have both lengths (``check_layout``); its
    batch and head axes may stay 1."""
    dim, q_len, kv_len = q.shape[-1], q.shape[1], k.shape[1]
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    out = jax.nn.dot_product_attention(
        pad_head_dim(q, head_dim),
        pad_head_dim(k, head_dim),
        pad_head_dim(v, head_dim),
        mask=mask,
        is_causal=causal,
        scale=1.0 / math.sqrt(dim),
        implementation=implementation,
    )
    return out[..., :dim]


# --- cuDNN (GPU) ----------------------------------------------------------------------------
# The rules below restate jax 0.10.2's own checks (jax/_src/cudnn/fused_attention_stablehlo.py:
# check_layout, check_is_flash_attention), which raise at trace time instead of falling back.

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# cuDNN's head-dim limit before Hopper (compute capability < 9.0); Hopper and later take 256.
CUDNN_MAX_HEAD_DIM_PRE_HOPPER = 128
CUDNN_MAX_HEAD_DIM_HOPPER = 256


@functools.cache
def cudnn_max_head_dim() -> int:
    """The largest head dim cuDNN flash attention takes on the default device: 256 on a CUDA
    GPU of compute capability >= 9.0 (Hopper, Blackwell), else 128 (jax's rule)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not isinstance(capability, str):
        return CUDNN_MAX_HEAD_DIM_PRE_HOPPER
    try:  # ROCm names its GPUs "gfx90a" and so on; jax's check counts only CUDA ones
        major, minor = (int(part) for part in capability.split(".")[:2])
    except ValueError:
        return CUDNN_MAX_HEAD_DIM_PRE_HOPPER
    hopper = (major, minor) >= (9, 0)
    return CUDNN_MAX_HEAD_DIM_HOPPER if hopper else CUDNN_MAX_HEAD_DIM_PRE_HOPPER


def cudnn_head_dim(head_dim: int, max_head_dim: int) -> int | None:
    """The head dim cuDNN runs a ``head_dim`` call at, or None if it cannot.

    cuDNN takes head dims that are multiples of 8 up to ``max_head_dim``. One that is not a
    multiple of 8 is zero-padded to the next one (exact: see :func:`pad_head_dim`). SD's 40, 80
    and 160 and SDXL's 64 are multiples of 8 and run as they are: padding 40 to 64 or 80 to 128
    would move 60% more of q/k/v through extra copies for tiles cuDNN already chooses itself.
    A head dim over the limit (160 before Hopper, the VAE's 512) cannot be helped by padding,
    which only makes it larger."""
    padded = _round_up(head_dim, 8)
    return padded if padded <= max_head_dim else None


def cudnn_refusal(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None,
    max_head_dim: int | None = None,
) -> str | None:
    """Why cuDNN flash attention would refuse this call (shapes and dtypes only), or None.

    ``max_head_dim`` defaults to :func:`cudnn_max_head_dim` (the default device's)."""
    del causal  # cuDNN's causal mask takes every shape
    if q.dtype not in CUDNN_DTYPES:
        return f"dtype {q.dtype}: cuDNN flash attention takes bfloat16 or float16"
    head_dim = q.shape[-1]
    if v.shape[-1] != head_dim:
        # jax routes a value head dim unlike q's to cuDNN's MLA path (Hopper, cuDNN >= 9.10).
        return f"value head dim {v.shape[-1]} differs from the query's {head_dim}"
    limit = cudnn_max_head_dim() if max_head_dim is None else max_head_dim
    if cudnn_head_dim(head_dim, limit) is None:
        return f"head dim {head_dim}: cuDNN takes at most {limit}"
    if mask is not None and (q.shape[1] % 2 or k.shape[1] % 2):
        # A mask reaches cuDNN as a bias, and its backward pass (jax checks it when the call is
        # differentiated, which cannot be known here) needs even sequence lengths.
        return f"mask with lengths {q.shape[1]}, {k.shape[1]}: cuDNN's bias needs even lengths"
    return None


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, mask: jax.Array | None
) -> jax.Array:
    """cuDNN flash attention where cuDNN takes the call (see :func:`cudnn_refusal`), with the
    head dim zero-padded to a multiple of 8 if needed; XLA's attention otherwise. Needs a CUDA
    GPU with cuDNN for the calls cuDNN takes (jax raises "cuDNN is not detected" elsewhere)."""
    if cudnn_refusal(q, k, v, causal=causal, mask=mask) is not None:
        return xla_attention(q, k, v, causal=causal, mask=mask)
    head_dim = cudnn_head_dim(q.shape[-1], cudnn_max_head_dim())
    return _padded_attention(
        q, k, v, causal=causal, mask=mask, head_dim=head_dim, implementation="cudnn"
    )


# --- Pallas splash attention (TPU) ----------------------------------------------------------

# Splash's kv blocks are whole multiples of the TPU's 128 lanes (its kernel raises otherwise),
# and its q blocks are kept to the same multiples.
PALLAS_LANES = 128
PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # Mosaic has no float16
# Sequences shorter than this take XLA's attention: the [T, S] logits of a short sequence are
# small enough for XLA, and the kernel pays for padding and layout copies. 4096 is
# maxdiffusion's default flash_min_seq_length for SD on TPU (not measured here: no TPU); in SD
# 1.5 at 512 px it sends the first UNet level's self-attention and the VAE's to the kernel.
PALLAS_MIN_LENGTH = 4096


def pallas_tpu_refusal(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None,
    min_length: int = PALLAS_MIN_LENGTH,
) -> str | None:
    """Why :func:`pallas_tpu_attention` gives this call to XLA (shapes and dtypes only), or
    None if the splash kernel takes it."""
    del causal  # splash has a causal mask of its own
    if mask is not None:
        # Splash's masks are static (numpy) per head; a mask array, such as CLIP's padding
        # mask, is data that differs per batch element.
        return "a mask array: splash takes only static masks"
    if q.dtype not in PALLAS_DTYPES:
        return f"dtype {q.dtype}: Mosaic TPU kernels take float32 or bfloat16"
    q_len, kv_len = q.shape[1], k.shape[1]
    if q_len % PALLAS_LANES or kv_len % PALLAS_LANES:
        return f"lengths {q_len}, {kv_len}: not multiples of splash's {PALLAS_LANES}-wide blocks"
    if min(q_len, kv_len) < min_length:
        return f"lengths {q_len}, {kv_len}: shorter than {min_length}"
    if k.shape[2] != q.shape[2]:
        return f"{k.shape[2]} key heads for {q.shape[2]} query heads"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query's {q.shape[-1]}"
    return None


def splash_block_sizes(q_len: int, kv_len: int, head_dim: int) -> tuple[int, int]:
    """(block_q, block_kv) for lengths that are multiples of 128: the largest power-of-two
    multiple of 128 that divides each, up to 512, or 256 for head dims over 256 so that the
    q/k/v blocks, their double buffers and the float32 accumulator stay well inside the 16 MiB
    of VMEM a kernel gets by default on v4/v5e (the VAE's head dim 512 in float32: ~6 MiB)."""
    cap = 512 if head_dim <= 256 else 256
    return math.gcd(q_len, cap), math.gcd(kv_len, cap)


def pallas_tpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None,
    interpret: bool = False,
    min_length: int = PALLAS_MIN_LENGTH,
) -> jax.Array:
    """TPU Pallas splash attention where it takes the call (see :func:`pallas_tpu_refusal`),
    XLA's attention otherwise. ``interpret=True`` runs the kernel in Pallas's TPU interpreter,
    on any backend (CPU tests)."""
    if pallas_tpu_refusal(q, k, v, causal=causal, mask=mask, min_length=min_length) is not None:
        return xla_attention(q, k, v, causal=causal, mask=mask)
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    # Head dims up to a multiple of the 128 lanes, as maxdiffusion does: SD's 40 and 80 become
    # 128, 160 becomes 256, the VAE's 512 stays. The MXU works in 128-wide tiles anyway.
    padded = _round_up(dim, PALLAS_LANES)
    block_q, block_kv = splash_block_sizes(q_len, kv_len, padded)
    # Splash has no logits scale: q takes it (from the original head dim), rounded once to
    # q's dtype; the logits and the softmax are float32 inside the kernel.
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(dim))).astype(q.dtype)
    # [B, T, H, D] -> [B * H, T, D_padded]: splash takes [heads, T, D], and every (example,
    # head) pair is an independent head with the same mask. Folding the batch into the heads
    # instead of vmapping the kernel gives the same grid, and the TPU interpreter cannot run
    # a vmapped kernel (jax 0.10.2: its grid gains an axis its dimension semantics lack).
    q, k, v = (
        pad_head_dim(jnp.swapaxes(t, 1, 2), padded).reshape(batch * heads, t.shape[1], padded)
        for t in (q, k, v)
    )
    # Causal here is jax's top-left-aligned tril (query i sees keys 0..i), as splash's
    # CausalMask with offset 0.
    head_mask = (splash_mask.CausalMask if causal else splash_mask.FullMask)((q_len, kv_len))
    sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        # Backward blocks too: without them differentiating the kernel (training) raises.
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([head_mask] * (batch * heads)),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        # The TPU interpreter (not Pallas's generic one) keeps TPU semantics: scratch memory
        # starts as NaN, out-of-bounds reads raise.
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    out = kernel(q, k, v).reshape(batch, heads, q_len, padded)
    return jnp.swapaxes(out[..., :dim], 1, 2)
