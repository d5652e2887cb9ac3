"""How a model runs, as opposed to what it computes: one static field of every model.

:class:`Execution` holds the compute dtype, the attention kernel and the convolution lowering.
The UNet, VAE and text encoder take it as a module field (``execution``) and hand it down to
their layers, so it is part of the module's hash: a jitted program that takes the module as a
static argument retraces when any of it changes, and no global is read at trace time.
It is built from the backend profile (runtime.profile) where models are loaded; model code
never asks which backend it runs on.

Compute dtype: matmuls and convolutions run in it; what numerics need stays float32 whatever
it is: normalisation statistics, the softmax of attention, the sinusoidal timestep features.
The params keep their own dtype (float32 master weights in training, bf16 for inference)
and are cast where they are used.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ip2p_jax.models.attention import KERNELS

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model runs; never its params, and its numbers only by float rounding.

    ``dtype``: the compute dtype (a name in :data:`COMPUTE_DTYPES`). ``attention``: the
    attention kernel (a name in models.attention.KERNELS). ``conv_patches_max_rows``: the
    lowering of each convolution (layers.Conv2d: 0 native; N > 0 runs 1x1 convolutions and
    those with at most N output rows as one matmul over gathered patches).
    """

    dtype: str = "float32"
    attention: str = "dot_product"
    conv_patches_max_rows: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {self.dtype!r} is not one of {sorted(COMPUTE_DTYPES)}")
        if self.attention not in KERNELS:
            raise ValueError(
                f"unknown attention kernel {self.attention!r}; choose one of {sorted(KERNELS)}"
            )
        rows = self.conv_patches_max_rows
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ValueError(
                f"conv_patches_max_rows={rows!r} must be an int >= 0 (0: every convolution native)"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The compute dtype as a numpy dtype."""
        return jnp.dtype(COMPUTE_DTYPES[self.dtype])

    def replace(self, **changes) -> Execution:
        """A copy with ``changes`` (fields by name); a change of None keeps the field."""
        return dataclasses.replace(
            self, **{name: value for name, value in changes.items() if value is not None}
        )
