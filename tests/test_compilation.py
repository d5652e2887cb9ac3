"""How our programs compile on the CPU (compilation.jit, with the backend profile's XLA
options) and the two lowerings of Conv2d."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from ip2p_jax.models import layers
from ip2p_jax.runtime import compilation
from ip2p_jax.runtime.profile import (
    CPU_COMPILER_OPTIONS,
    CPU_PATCHES_MAX_ROWS,
    current_profile,
    profile_for,
)


def _conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_cpu_programs_compile_without_ynnpack():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 32)).astype(np.float32)
    k = rng.normal(size=(3, 3, 32, 48)).astype(np.float32)
    ours = compilation.jit(_conv)
    text = ours.lower(x, k).compile().as_text()
    assert "__ynn_fusion" in jax.jit(_conv).lower(x, k).compile().as_text()  # XLA's default
    assert "__ynn_fusion" not in text
    assert current_profile().xla_options() == CPU_COMPILER_OPTIONS
    np.testing.assert_allclose(ours(x, k), jax.jit(_conv)(x, k), rtol=1e-5, atol=1e-4)
    # A profile handed to jit is the one it compiles with: no options, XLA's default again.
    plain = compilation.jit(_conv, profile=profile_for("cpu", compiler_options={}))
    assert "__ynn_fusion" in plain.lower(x, k).compile().as_text()


def test_jit_is_built_on_first_use_and_keeps_jit_arguments():
    calls = []

    @compilation.jit(static_argnums=0)
    def scaled(factor, x):
        calls.append(factor)
        return x * factor

    assert "jitted" not in vars(scaled)  # nothing asked the backend yet
    assert scaled.__name__ == "scaled"
    np.testing.assert_allclose(scaled(3, np.ones(2, np.float32)), [3.0, 3.0])
    scaled(3, np.zeros(2, np.float32))
    assert calls == [3]  # the static argument is static: one trace
    # inside another program (jit, eval_shape) it traces without options of its own
    np.testing.assert_allclose(jax.jit(lambda x: scaled(2, x))(np.ones(2, np.float32)), [2, 2])
    assert jax.eval_shape(lambda x: scaled(2, x), np.ones(3, np.float32)).shape == (3,)


@pytest.mark.parametrize(
    ("batch", "side", "kernel", "stride", "patch_matmul"),
    [
        (1, 4, 3, 1, True),  # 16 output rows
        (3, 4, 3, 2, True),  # strided, 12 rows
        (2, 16, 3, 1, False),  # 512 rows: the native convolution
        (2, 16, 3, 2, False),  # strided, 128 rows
    ],
)
def test_conv2d_matches_torch_on_both_lowerings(batch, side, kernel, stride, patch_matmul):
    """The CPU profile's lowering (a patch matmul up to CPU_PATCHES_MAX_ROWS output rows) and
    the native one (0, the accelerators') give torch's numbers, from the same params."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, side, side, 24)).astype(np.float32)
    module = layers.Conv2d(40, kernel, stride, kernel // 2, patches_max_rows=CPU_PATCHES_MAX_ROWS)
    native = layers.Conv2d(40, kernel, stride, kernel // 2)  # patches_max_rows=0
    params = module.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    assert jax.tree.map(np.shape, native.init(jax.random.key(0), x)["params"]) == jax.tree.map(
        np.shape, params
    )
    rows = batch * (-(-side // stride)) ** 2
    assert (rows <= CPU_PATCHES_MAX_ROWS) == patch_matmul  # both lowerings are covered

    def convolves(m: layers.Conv2d) -> bool:
        return "conv_general_dilated" in str(jax.make_jaxpr(m.apply)({"params": params}, x))

    assert convolves(module) != patch_matmul and convolves(native)
    ours = compilation.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(
        ours, compilation.jit(native.apply)({"params": params}, x), rtol=1e-5, atol=1e-5
    )
    reference = torch.nn.Conv2d(24, 40, kernel, stride, kernel // 2)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(np.asarray(params["kernel"]).transpose(3, 2, 0, 1)))
        reference.bias.copy_(torch.from_numpy(np.asarray(params["bias"])))
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(ours, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
