"""3x3 convolutions at Stable Diffusion's shapes: XLA's native convolution through YNNPACK
(XLA:CPU's default) and through XLA's own Eigen kernels (profile.CPU_COMPILER_OPTIONS),
the patch matmul (im2col) under the same options, and torch's Conv2d, side by side on this
CPU. It is the evidence behind the CPU's backend profile in ip2p_jax/runtime/profile.py:
CPU_COMPILER_OPTIONS and ``CPU_PATCHES_MAX_ROWS`` (``conv_patches_max_rows``).

    .venv/bin/python scripts/bench_conv.py

Each figure is the best of 5 timed calls after a warm-up (compile excluded).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ip2p_jax.runtime.profile import CPU_COMPILER_OPTIONS

# (batch, height, width, in, out): UNet levels at 256 px with the 3 guidance rows, and VAE levels.
SHAPES = [
    (3, 32, 32, 320, 320),
    (3, 32, 32, 640, 320),
    (3, 16, 16, 640, 640),
    (3, 8, 8, 1280, 1280),
    (3, 4, 4, 2560, 1280),
    (12, 32, 32, 320, 320),
    (12, 8, 8, 1280, 1280),
    (12, 4, 4, 1280, 1280),
    (1, 256, 256, 128, 128),
    (1, 128, 128, 256, 256),
]


def native(x, k):
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)


def patches(x, k):
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
    return jnp.concatenate(taps, -1) @ k.reshape(-1, k.shape[-1])


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    columns = ("ynnpack conv", "xla conv", "patch matmul", "torch")
    print(f"{'shape (B,H,W,Cin,Cout)':<26} " + " ".join(f"{c:>16}" for c in columns))
    for batch, height, width, cin, cout in SHAPES:
        x = rng.normal(size=(batch, height, width, cin)).astype(np.float32)
        k = (rng.normal(size=(3, 3, cin, cout)) * 0.05).astype(np.float32)
        xj, kj = jnp.asarray(x), jnp.asarray(k)
        conv_ynnpack = jax.jit(native)
        conv_native = jax.jit(native, compiler_options=CPU_COMPILER_OPTIONS)
        conv_patches = jax.jit(patches, compiler_options=CPU_COMPILER_OPTIONS)
        np.testing.assert_allclose(conv_patches(xj, kj), conv_native(xj, kj), atol=1e-3)
        np.testing.assert_allclose(conv_ynnpack(xj, kj), conv_native(xj, kj), atol=1e-3)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        layer = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        layer.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
        flops = 2 * batch * height * width * 9 * cin * cout
        cells = []
        jax_convs = ((conv_ynnpack, (xj, kj)), (conv_native, (xj, kj)), (conv_patches, (xj, kj)))
        for fn, args in (*jax_convs, (layer, (xt,))):
            seconds = best_of(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
            cells.append(f"{seconds * 1e3:6.1f} ms {flops / seconds / 1e9:4.0f} GF")
        print(
            f"{str((batch, height, width, cin, cout)):<26} " + " ".join(f"{c:>16}" for c in cells)
        )


if __name__ == "__main__":
    main()
