"""Attention at Stable Diffusion's shapes: our kernels and torch's scaled_dot_product_attention
side by side on this CPU. It is the evidence behind ``BLOCK_LOGITS`` and the blockwise
kernel's loop over heads in ip2p_jax/models/attention.py.

    .venv/bin/python scripts/bench_attention.py

Each figure is the best of 5 timed calls after a warm-up (compile excluded), in ms.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from bench_conv import best_of  # scripts/ is on sys.path when run as a script

from ip2p_jax.models.attention import KERNELS

# (batch, queries, heads, head_dim, keys): the UNet's self- and cross-attention with the three
# guidance rows at 256 px (32x32 latents) and 512 px (64x64), and the VAE's mid-block attention.
SHAPES = [
    (3, 1024, 8, 40, 1024),
    (3, 1024, 8, 40, 77),
    (3, 256, 8, 80, 256),
    (3, 4096, 8, 40, 4096),
    (3, 4096, 8, 40, 77),
    (1, 1024, 1, 512, 1024),
    (1, 4096, 1, 512, 4096),
]


def _run_jax(fn, *args) -> None:
    jax.block_until_ready(fn(*args))


def main() -> None:
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    names = ("dot_product", "blockwise")
    print(f"{'shape (B,Tq,N,H,Tk)':<26}" + "".join(f"{n:>14}" for n in (*names, "torch sdpa")))
    for batch, length, heads, dim, keys in SHAPES:
        q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
        k, v = (rng.normal(size=(batch, keys, heads, dim)).astype(np.float32) for _ in range(2))
        qj, kj, vj = map(jax.numpy.asarray, (q, k, v))
        cells = []
        for name in names:
            fn = jax.jit(functools.partial(KERNELS[name], causal=False, mask=None))
            cells.append(1e3 * best_of(functools.partial(_run_jax, fn, qj, kj, vj)))
        heads_major = [torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v)]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        cells.append(1e3 * best_of(functools.partial(sdpa, *heads_major)))
        shape = str((batch, length, heads, dim, keys))
        print(f"{shape:<26}" + "".join(f"{c:>11.1f} ms" for c in cells), flush=True)


if __name__ == "__main__":
    main()
