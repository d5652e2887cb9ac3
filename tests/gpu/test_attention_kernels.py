"""Each attention kernel of ``models.attention.KERNELS`` against XLA's (``dot_product``) on
the device, on bf16 q/k/v of SD-1.5's shapes (conftest's ``Sizes.attention``, one test per
shape: ``attention_case``), forward and gradients.

Error: ||out - ref|| / ||ref|| against XLA's attention in float32 at full precision on the same
(bf16-exact) inputs. A kernel passes when its error is at most max(bound, 2 x the error of
XLA's own attention on the bf16 inputs): bf16 operands land between 1e-3 and 1e-2 (bound 1e-2
forward, 2e-2 for the gradients of a random projection of the output).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models.attention import KERNELS, attention

pytestmark = pytest.mark.gpu

FORWARD_BOUND = 1e-2
GRADIENT_BOUND = 2e-2
# Kernels that run on one backend only (jax.default_backend()'s names).
BACKEND_OF = {"cudnn": "gpu", "pallas_tpu": "tpu"}


def _relative(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@functools.partial(jax.jit, static_argnames=("kernel", "causal"))
def _forward_and_grads(q, k, v, w, *, kernel: str, causal: bool):
    """The attention output and d<out, w>/d(q, k, v), in float32 (jit's cache holds one program
    per kernel, shape and matmul precision: the references compile once per case)."""

    def projected(q, k, v):
        out = attention(q, k, v, kernel=kernel, causal=causal)
        return jnp.sum(out.astype(jnp.float32) * w), out

    grads, out = jax.grad(projected, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return [x.astype(jnp.float32) for x in (out, *grads)]


@pytest.mark.parametrize("kernel", sorted(set(KERNELS) - {"dot_product"}))
def test_kernel_matches_xla(kernel, attention_case, sizes, record):
    backend = BACKEND_OF.get(kernel)
    if backend and backend != jax.default_backend():
        pytest.skip(f"the {kernel} kernel runs on {backend} only")
    (batch, length, heads, dim), kv_length, causal = sizes.attention[attention_case]
    keys = jax.random.split(jax.random.key(list(sizes.attention).index(attention_case)), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim), jnp.bfloat16)
    k, v = (
        jax.random.normal(key, (batch, kv_length, heads, dim), jnp.bfloat16) for key in keys[1:3]
    )
    w = jax.random.normal(keys[3], (batch, length, heads, dim), jnp.float32)
    with jax.default_matmul_precision("highest"):
        upcast = (x.astype(jnp.float32) for x in (q, k, v))
        reference = _forward_and_grads(*upcast, w, kernel="dot_product", causal=causal)
    xla = _forward_and_grads(q, k, v, w, kernel="dot_product", causal=causal)
    got = _forward_and_grads(q, k, v, w, kernel=kernel, causal=causal)
    names = ("out", "dq", "dk", "dv")
    errors = {name: _relative(g, r) for name, g, r in zip(names, got, reference, strict=True)}
    xla_errors = {name: _relative(x, r) for name, x, r in zip(names, xla, reference, strict=True)}
    record(
        **{f"{name} rel err": e for name, e in errors.items()},
        **{f"xla bf16 {name} rel err": e for name, e in xla_errors.items()},
    )
    for name in names:
        bound = FORWARD_BOUND if name == "out" else GRADIENT_BOUND
        allowed = max(bound, 2 * xla_errors[name])
        assert errors[name] <= allowed, (name, errors[name], allowed, errors, xla_errors)
