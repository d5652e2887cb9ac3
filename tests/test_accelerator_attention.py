"""The accelerator attention kernels (ip2p_jax/models/accelerator_attention.py) on a CPU.

Pallas splash attention runs here in Pallas's TPU interpreter and is compared with XLA's
attention; its TPU lowering (a ``tpu_custom_call``) is checked without a TPU. cuDNN cannot run
on a CPU: here its acceptance rule is checked on SD's shapes, the head-dim padding math is
checked with XLA's implementation, and the calls cuDNN refuses are checked to be XLA's. The
cuDNN call itself is checked on a GPU only, by a separate GPU test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models import accelerator_attention as acc
from ip2p_jax.models.attention import xla_attention

# SD's attention shapes: (q_len, kv_len, heads, head_dim).
SD15_SELF = [(4096, 4096, 8, 40), (1024, 1024, 8, 80), (256, 256, 8, 160), (64, 64, 8, 160)]
SD15_CROSS = [(4096, 77, 8, 40), (1024, 77, 8, 80), (256, 77, 8, 160)]
SDXL = [(4096, 4096, 10, 64), (1024, 1024, 20, 64), (4096, 77, 10, 64)]
VAE = (4096, 4096, 1, 512)
CLIP = (77, 77, 12, 64)


def _spec(q_len, kv_len, heads, dim, dtype=jnp.bfloat16, batch=2):
    q = jax.ShapeDtypeStruct((batch, q_len, heads, dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, kv_len, heads, dim), dtype)
    return q, kv, kv


def _qkv(batch, q_len, heads, dim, kv_len=None, dtype=jnp.float32, q_gain=1.0, seed=0):
    rng = np.random.default_rng(seed)
    kv_len = q_len if kv_len is None else kv_len
    q = rng.normal(size=(batch, q_len, heads, dim)) * q_gain
    k = rng.normal(size=(batch, kv_len, heads, dim))
    v = rng.normal(size=(batch, kv_len, heads, dim))
    return tuple(jnp.asarray(t, jnp.float32).astype(dtype) for t in (q, k, v))


def _max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@functools.partial(jax.jit, static_argnames="causal")
def _xla(q, k, v, mask=None, *, causal=False):
    """XLA's attention, jitted as the kernels under test are (so fallbacks match exactly)."""
    return xla_attention(q, k, v, causal=causal, mask=mask)


def _padding_mask(batch, kv_len, valid):
    """CLIP-style [B, 1, 1, S] padding mask: the first ``valid[b]`` keys of example b."""
    return (jnp.arange(kv_len)[None, :] < jnp.asarray(valid)[:, None])[:, None, None, :]


# --- cuDNN: the acceptance rule on SD's shapes ----------------------------------------------


@pytest.mark.parametrize("shape", SD15_SELF[:2] + SD15_CROSS[:2] + SDXL)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("max_head_dim", [128, 256])
def test_cudnn_takes_sd_head_dims_up_to_128(shape, dtype, max_head_dim):
    q, k, v = _spec(*shape, dtype=dtype)
    assert acc.cudnn_refusal(q, k, v, causal=False, mask=None, max_head_dim=max_head_dim) is None


@pytest.mark.parametrize("shape", [SD15_SELF[2], SD15_SELF[3], SD15_CROSS[2]])
def test_cudnn_head_dim_160_needs_hopper(shape):
    q, k, v = _spec(*shape)
    assert acc.cudnn_refusal(q, k, v, causal=False, mask=None, max_head_dim=256) is None
    reason = acc.cudnn_refusal(q, k, v, causal=False, mask=None, max_head_dim=128)
    assert reason == "head dim 160: cuDNN takes at most 128"


def test_cudnn_refusals():
    # The VAE's single head of 512: over every GPU's limit.
    q, k, v = _spec(*VAE, batch=1)
    assert acc.cudnn_refusal(q, k, v, causal=False, mask=None, max_head_dim=256) == (
        "head dim 512: cuDNN takes at most 256"
    )
    # float32: cuDNN's flash attention is bf16/fp16 only.
    q, k, v = _spec(*SD15_SELF[0], dtype=jnp.float32)
    reason = acc.cudnn_refusal(q, k, v, causal=False, mask=None, max_head_dim=256)
    assert reason == "dtype float32: cuDNN flash attention takes bfloat16 or float16"
    # CLIP: causal with a padding mask over 77 tokens; the mask's bias needs even lengths.
    q, k, v = _spec(*CLIP)
    mask = jax.ShapeDtypeStruct((2, 1, 1, 77), jnp.bool_)
    reason = acc.cudnn_refusal(q, k, v, causal=True, mask=mask, max_head_dim=256)
    assert reason == "mask with lengths 77, 77: cuDNN's bias needs even lengths"
    # The same without the mask (causal alone), or with even lengths, goes to cuDNN.
    assert acc.cudnn_refusal(q, k, v, causal=True, mask=None, max_head_dim=256) is None
    q, k, v = _spec(78, 78, 12, 64)
    mask = jax.ShapeDtypeStruct((2, 1, 1, 78), jnp.bool_)
    assert acc.cudnn_refusal(q, k, v, causal=True, mask=mask, max_head_dim=256) is None


def test_cudnn_head_dim_rounds_up_to_multiples_of_8_within_the_limit():
    assert [acc.cudnn_head_dim(d, 128) for d in (40, 64, 80, 128)] == [40, 64, 80, 128]
    assert [acc.cudnn_head_dim(d, 128) for d in (36, 41, 127)] == [40, 48, 128]
    assert [acc.cudnn_head_dim(d, 128) for d in (129, 160, 512)] == [None, None, None]
    assert [acc.cudnn_head_dim(d, 256) for d in (160, 250, 256, 257)] == [160, 256, 256, None]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the limit of a CPU or TPU")
def test_cudnn_limit_off_gpu_is_pre_hopper():
    assert acc.cudnn_max_head_dim() == 128


# --- cuDNN: the padding math and the XLA fallback, with XLA's implementation ------------------


@pytest.mark.parametrize("dim, padded", [(36, 40), (40, 64), (80, 128)])
def test_head_dim_padding_leaves_attention_unchanged(dim, padded):
    q, k, v = _qkv(2, 24, 3, dim, kv_len=20, q_gain=3.0)
    mask = _padding_mask(2, 20, [20, 13])
    for causal, m in [(False, None), (True, None), (False, mask)]:
        plain = xla_attention(q, k, v, causal=causal, mask=m)
        ours = acc._padded_attention(
            q, k, v, causal=causal, mask=m, head_dim=padded, implementation="xla"
        )
        assert ours.shape == plain.shape
        assert _max_err(ours, plain) < 2e-6


def test_padding_mask_broadcast_to_both_lengths_keeps_batch_axis(monkeypatch):
    # jax's cuDNN path needs a bias with both lengths; the batch and head axes may stay 1.
    q, k, v = _qkv(2, 8, 2, 16, kv_len=6)
    seen = []

    def spy(q, k, v, *, mask, **kwargs):
        seen.append(mask.shape)
        return jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    mask = _padding_mask(2, 6, [6, 2])
    acc._padded_attention(q, k, v, causal=False, mask=mask, head_dim=16, implementation="cudnn")
    acc._padded_attention(q, k, v, causal=False, mask=mask[0, 0], head_dim=16, implementation="x")
    assert seen == [(2, 1, 8, 6), (1, 1, 8, 6)]


def test_cudnn_attention_refused_calls_are_xla():
    q, k, v = _qkv(2, 32, 2, 16)  # float32: refused everywhere
    ours = jax.jit(lambda q, k, v: acc.cudnn_attention(q, k, v, causal=True, mask=None))(q, k, v)
    assert _max_err(ours, _xla(q, k, v, causal=True)) == 0.0


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs there (GPU test)")
def test_cudnn_attention_routes_accepted_calls_to_cudnn():
    q, k, v = _qkv(1, 32, 2, 16, dtype=jnp.bfloat16)
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        jax.jit(lambda q, k, v: acc.cudnn_attention(q, k, v, causal=False, mask=None)).trace(
            q, k, v
        )


# --- Pallas splash attention (TPU), in the TPU interpreter -----------------------------------


def _pallas(q, k, v, *, causal=False, mask=None, min_length=128):
    fn = lambda q, k, v, mask: acc.pallas_tpu_attention(
        q, k, v, causal=causal, mask=mask, interpret=True, min_length=min_length
    )
    return jax.jit(fn)(q, k, v, mask)


@pytest.mark.parametrize(
    "batch, q_len, kv_len, heads, dim, causal",
    [
        (2, 256, 256, 2, 40, False),  # SD's 40 padded to 128; one 256x256 block
        (1, 256, 256, 2, 40, True),
        (1, 256, 640, 1, 80, False),  # 5 kv blocks of 128: the online softmax across blocks
        (1, 384, 384, 1, 160, True),  # 160 padded to 256; 3x3 blocks, causal across blocks
    ],
)
def test_pallas_float32_equals_xla(batch, q_len, kv_len, heads, dim, causal):
    q, k, v = _qkv(batch, q_len, heads, dim, kv_len=kv_len, q_gain=3.0)
    reason = acc.pallas_tpu_refusal(q, k, v, causal=causal, mask=None, min_length=128)
    assert reason is None
    ours = _pallas(q, k, v, causal=causal)
    reference = xla_attention(q, k, v, causal=causal, mask=None)
    assert ours.shape == reference.shape and ours.dtype == jnp.float32
    assert _max_err(ours, reference) < 1e-5


def test_pallas_bfloat16_is_as_close_to_float32_as_xla():
    q, k, v = _qkv(2, 256, 2, 40, dtype=jnp.bfloat16, q_gain=3.0)
    exact = xla_attention(*(t.astype(jnp.float32) for t in (q, k, v)), causal=False, mask=None)
    ours = _pallas(q, k, v)
    xla = _xla(q, k, v)
    assert ours.dtype == jnp.bfloat16
    # Errors relative to the output's largest value (3.3 here, where a bf16 ulp is 2^-6): the
    # output's rounding alone is up to 2^-9; q is rounded once more after taking its scale,
    # which XLA applies to the float32 logits instead (measured: 0.0057 against XLA's 0.0042).
    scale = float(jnp.max(jnp.abs(exact)))
    assert _max_err(ours, exact) / scale < 8e-3
    assert _max_err(ours, exact) < 2 * _max_err(xla, exact)


def test_pallas_gradients_equal_xla():
    q, k, v = _qkv(1, 256, 1, 40)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    pallas = lambda q, k, v: acc.pallas_tpu_attention(
        q, k, v, causal=True, mask=None, interpret=True, min_length=128
    )
    xla = lambda q, k, v: xla_attention(q, k, v, causal=True, mask=None)
    ours = jax.jit(jax.grad(loss(pallas), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(ours, reference, strict=True):
        assert _max_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "q_len, kv_len, causal, masked, reason",
    [
        (256, 77, False, False, "lengths 256, 77: not multiples of splash's"),  # cross-attention
        (77, 77, True, True, "a mask array: splash takes only static masks"),  # CLIP
        (128, 128, True, True, "a mask array: splash takes only static masks"),
        (256, 256, False, False, "lengths 256, 256: shorter than 384"),
    ],
)
def test_pallas_fallbacks_are_xla(q_len, kv_len, causal, masked, reason):
    q, k, v = _qkv(2, q_len, 2, 16, kv_len=kv_len)
    mask = _padding_mask(2, kv_len, [kv_len, 5]) if masked else None
    refusal = acc.pallas_tpu_refusal(q, k, v, causal=causal, mask=mask, min_length=384)
    assert refusal is not None and refusal.startswith(reason)
    ours = _pallas(q, k, v, causal=causal, mask=mask, min_length=384)
    assert _max_err(ours, _xla(q, k, v, mask, causal=causal)) == 0.0


def test_pallas_float16_falls_back_to_xla():
    q, k, v = _qkv(1, 256, 2, 16, dtype=jnp.float16)
    refusal = acc.pallas_tpu_refusal(q, k, v, causal=False, mask=None, min_length=128)
    assert refusal == "dtype float16: Mosaic TPU kernels take float32 or bfloat16"
    # Eagerly: under jit, XLA's float16 attention does not lower on a CPU (jax 0.10.2 asks
    # dot_general for F16_F16_F32, which the CPU lacks; eagerly jax retries without it).
    ours = acc.pallas_tpu_attention(
        q, k, v, causal=False, mask=None, interpret=True, min_length=128
    )
    assert ours.dtype == jnp.float16
    assert _max_err(ours, xla_attention(q, k, v, causal=False, mask=None)) == 0.0


def test_pallas_rule_on_sd_shapes_with_the_default_threshold():
    taken = [SD15_SELF[0], SDXL[0], VAE]
    refused = SD15_SELF[1:] + SD15_CROSS + SDXL[1:]
    for shape in taken:
        assert acc.pallas_tpu_refusal(*_spec(*shape), causal=False, mask=None) is None
    for shape in refused:
        assert acc.pallas_tpu_refusal(*_spec(*shape), causal=False, mask=None) is not None


def test_splash_block_sizes():
    assert acc.splash_block_sizes(4096, 4096, 128) == (512, 512)
    assert acc.splash_block_sizes(4096, 4096, 512) == (256, 256)  # the VAE's big head dim
    assert acc.splash_block_sizes(1280, 384, 256) == (256, 128)


def _tpu_hlo(q, k, v, **kwargs):
    fn = lambda q, k, v: acc.pallas_tpu_attention(q, k, v, causal=False, mask=None, **kwargs)
    return jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()


def test_pallas_lowers_to_a_tpu_kernel_for_long_self_attention_only():
    # SD 1.5's first-level self-attention (8 heads of 40) and the VAE's (1 head of 512).
    assert _tpu_hlo(*_spec(*SD15_SELF[0])).count("tpu_custom_call") == 1
    assert _tpu_hlo(*_spec(*VAE, dtype=jnp.float32, batch=1)).count("tpu_custom_call") == 1
    # Cross-attention to 77 text tokens, and 1024-token self-attention, stay XLA's.
    assert "tpu_custom_call" not in _tpu_hlo(*_spec(*SD15_CROSS[0]))
    assert "tpu_custom_call" not in _tpu_hlo(*_spec(*SD15_SELF[1]))
