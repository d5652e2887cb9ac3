"""The blockwise attention kernel against plain softmax attention, the kernel registry and
each backend's kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ip2p_jax.models import attention as attn
from ip2p_jax.models.execution import Execution
from ip2p_jax.runtime.profile import profile_for


def _qkv(batch, length, heads, dim, keys=None, seed=0):
    rng = np.random.default_rng(seed)
    keys = length if keys is None else keys
    q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, keys, heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, keys, heads, dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize(
    "shape, block_logits",
    [
        ((2, 96, 3, 8, None), 96 * 96),  # one head per step, all queries at once
        ((2, 100, 3, 8, None), 1000),  # 10 queries per block, exact split
        ((1, 37, 2, 16, None), 128),  # 3 queries per block: the last block is padded
        ((2, 50, 2, 8, 11), 100),  # cross-attention: keys of another length
    ],
)
def test_blockwise_equals_torch_sdpa(shape, block_logits):
    *dims, keys = shape
    q, k, v = _qkv(*dims, keys=keys)
    ours = jax.jit(
        lambda q, k, v: attn._blockwise_attention(
            q, k, v, causal=False, mask=None, block_logits=block_logits
        )
    )(q, k, v)
    to_torch = lambda t: torch.from_numpy(np.asarray(t).transpose(0, 2, 1, 3).copy())
    reference = torch.nn.functional.scaled_dot_product_attention(*map(to_torch, (q, k, v)))
    np.testing.assert_allclose(
        np.asarray(ours), reference.numpy().transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5
    )


def test_blockwise_gradients_equal_plain_attention():
    q, k, v = _qkv(2, 40, 2, 8, seed=1)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    blockwise = lambda q, k, v: attn._blockwise_attention(
        q, k, v, causal=False, mask=None, block_logits=300
    )
    plain = lambda q, k, v: attn.xla_attention(q, k, v, causal=False, mask=None)
    ours = jax.grad(loss(blockwise), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_small_and_masked_attention_take_the_plain_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "_softmax_rows", lambda *a: calls.append(1) or a[0])
    q, k, v = _qkv(1, 8, 1, 4)
    attn._blockwise_attention(q, k, v, causal=True, mask=None, block_logits=4)
    attn._blockwise_attention(q, k, v, causal=False, mask=None)  # 64 logits: one step
    assert calls == []


def test_unknown_kernel_is_refused_with_the_choices():
    q, k, v = _qkv(1, 4, 1, 4)
    with pytest.raises(ValueError, match="'flash9'.*blockwise"):
        attn.attention(q, k, v, kernel="flash9")
    with pytest.raises(ValueError, match="'flash9'.*blockwise"):
        Execution(attention="flash9")


@pytest.mark.parametrize(
    "backend, kernel", [("cpu", "blockwise"), ("gpu", "cudnn"), ("tpu", "pallas_tpu")]
)
def test_each_backend_profile_names_its_kernel(backend, kernel):
    # Static configuration: the module field, not a global read while tracing.
    assert profile_for(backend).execution().attention == kernel
    assert profile_for(backend, attention_kernel="dot_product").execution().attention == (
        "dot_product"
    )
