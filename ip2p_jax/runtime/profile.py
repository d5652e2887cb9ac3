"""The backend profile: every choice ip2p-jax makes because of the backend it runs on, in one
object chosen once from the backend's name and overridable field by field.

The CPU's choices exist for its speed and memory (each is measured in docs/performance.md):

- XLA options: XLA:CPU hands dots and convolutions to YNNPACK by default. YNNPACK seems to
  split a convolution over the cores by blocks of 64 output channels, and SD's 320 channels
  (5 blocks) leave two cores unevenly loaded: 160-165 GFLOP/s at the 32x32 level, where XLA's
  own (Eigen) convolution reaches 195-215 and torch's oneDNN 220-230. An empty fusion-type
  list turns YNNPACK off for the programs compiled with these options only
  (scripts/bench_conv.py).
- Convolutions as patch matmuls: under those options a convolution with at most 64 output
  rows (batch x positions) runs faster as one matmul over gathered patches (im2col): 1280->1280
  at 3 guidance rows, 4x4, runs at 88 GFLOP/s native and 123 as a matmul; from the 8x8 level
  (192 rows) up the native convolution is as fast or faster. 1x1 convolutions are plain
  matmuls there too.
- glibc malloc tuning (runtime.memory): large freed blocks go back to the OS while loading and
  compiling, and are kept for reuse while sampling.
- The leafwise optimizer update (train.optim.update_leafwise): one leaf at a time behind
  optimization barriers, so no param-sized tree of updates is ever live (3.2 GB of SD-1.5's
  step temporaries). On a GPU or TPU the barriers (685 on SD-1.5) only stop XLA fusing the
  update, so they get the plain fused optax chain, which gives the same numbers.
- The gradient-accumulation scan unrolled: XLA:CPU compiles a convolution inside a rolled
  while loop without its fast kernels (a conv's backward ran 70x slower). Elsewhere the loop
  keeps compiles small.
- Attention kernel: the CPU's blockwise loop keeps each head's logits in cache; on a GPU it
  would be hundreds of small sequential kernels, so GPUs take cuDNN's fused attention and
  TPUs Pallas' flash attention, each falling back to XLA's where it cannot take a call.
- Compute dtype: float32 on the CPU (bf16 makes XLA:CPU slower, DESIGN.md), bfloat16 on GPUs
  and TPUs, whose matrix units run it at many times their float32 rate.

Models never ask for the backend: how they run is one static field of the modules
(models.execution.Execution), built from a profile where they are loaded
(weights.model_folder). The profile is a pure function of the backend's name, so the 'gpu'
and 'tpu' profiles can be built (and tested) on a CPU machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from ip2p_jax.models.attention import KERNELS
from ip2p_jax.models.execution import COMPUTE_DTYPES, Execution

OPTIMIZER_UPDATES = ("leafwise", "fused")

# The CPU's XLA options (see the module docstring): YNNPACK off.
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
# The CPU's largest convolution output (batch x positions) run as a patch matmul.
CPU_PATCHES_MAX_ROWS = 64
# The attention kernel of each backend (models.attention.KERNELS); others take XLA's.
ATTENTION_KERNELS = {"cpu": "blockwise", "gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas_tpu"}


@dataclasses.dataclass(frozen=True)
class BackendProfile:
    """How ip2p-jax runs on one backend. Build it with :func:`profile_for` (any backend, by
    name) or :func:`current_profile` (the running one); fields are checked on construction."""

    backend: str
    # XLA compiler options of every program compiled through runtime.compilation.jit, as
    # (name, value) pairs (the profile stays hashable); see :meth:`xla_options`.
    compiler_options: tuple[tuple[str, str], ...] = ()
    # Conv2d lowering: 0 runs every convolution natively; N > 0 runs 1x1 convolutions and
    # those with at most N output rows as one matmul over gathered patches.
    conv_patches_max_rows: int = 0
    # glibc malloc tuning while loading, compiling and sampling (runtime.memory).
    tune_malloc: bool = False
    # "leafwise" (clip, AdamW and the EMA one leaf at a time behind optimization barriers)
    # or "fused" (the optax chain over the whole tree): the same numbers.
    optimizer_update: str = "fused"
    # Unroll the gradient-accumulation scan fully (True) or keep it a loop (False).
    unroll_grad_accum: bool = False
    # The attention kernel, a name in models.attention.KERNELS.
    attention_kernel: str = "dot_product"
    # The models' compute dtype unless a caller picks one (models.execution.COMPUTE_DTYPES).
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        options = self.compiler_options
        if isinstance(options, Mapping):  # accepted as a dict, kept as sorted pairs
            options = tuple(sorted(options.items()))
            object.__setattr__(self, "compiler_options", options)
        if not all(
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(part, str) for part in pair)
            for pair in options
        ):
            raise ValueError(
                f"backend profile: compiler_options={options!r} must map option names to "
                "string values"
            )
        rows = self.conv_patches_max_rows
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ValueError(
                f"backend profile: conv_patches_max_rows={rows!r} must be an int >= 0 "
                "(0: every convolution native)"
            )
        for name in ("tune_malloc", "unroll_grad_accum"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"backend profile: {name}={getattr(self, name)!r} must be True or False"
                )
        if self.optimizer_update not in OPTIMIZER_UPDATES:
            raise ValueError(
                f"backend profile: optimizer_update={self.optimizer_update!r} must be one of "
                f"{OPTIMIZER_UPDATES}"
            )
        if self.attention_kernel not in KERNELS:
            raise ValueError(
                f"backend profile: attention_kernel={self.attention_kernel!r} must be one of "
                f"{sorted(KERNELS)}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"backend profile: compute_dtype={self.compute_dtype!r} must be one of "
                f"{sorted(COMPUTE_DTYPES)}"
            )

    def execution(self, dtype: str | None = None) -> Execution:
        """How models run under this profile: its attention kernel and convolution lowering,
        computing in ``dtype`` (default: the profile's ``compute_dtype``)."""
        return Execution(
            dtype or self.compute_dtype, self.attention_kernel, self.conv_patches_max_rows
        )

    def xla_options(self) -> dict[str, str] | None:
        """The compiler options as ``jax.jit(compiler_options=...)`` takes them (None: none)."""
        return dict(self.compiler_options) or None


def overridable_fields() -> tuple[str, ...]:
    """The fields :func:`profile_for` takes as overrides (all but ``backend``)."""
    return tuple(f.name for f in dataclasses.fields(BackendProfile) if f.name != "backend")


def profile_for(backend: str, **overrides: Any) -> BackendProfile:
    """The profile of the backend named ``backend`` (``jax.default_backend()``'s names:
    "cpu", "gpu", "tpu"; any name but "cpu" gets the accelerator's choices), with
    ``overrides`` replacing fields. An override of None keeps the backend's choice, so a
    config section whose fields default to None can be passed as it is. Needs no device.

    Raises ValueError for an unknown override name or a bad value, naming the fields."""
    if unknown := sorted(set(overrides) - set(overridable_fields())):
        raise ValueError(
            f"unknown backend profile override(s) {unknown}; the fields are "
            f"{list(overridable_fields())}"
        )
    if backend == "cpu":
        profile = BackendProfile(
            backend,
            compiler_options=tuple(CPU_COMPILER_OPTIONS.items()),
            conv_patches_max_rows=CPU_PATCHES_MAX_ROWS,
            tune_malloc=True,
            optimizer_update="leafwise",
            unroll_grad_accum=True,
            attention_kernel=ATTENTION_KERNELS["cpu"],
        )
    else:
        kernel = ATTENTION_KERNELS.get(backend, "dot_product")
        profile = BackendProfile(backend, attention_kernel=kernel, compute_dtype="bfloat16")
    chosen = {name: value for name, value in overrides.items() if value is not None}
    return dataclasses.replace(profile, **chosen)


def current_profile(**overrides: Any) -> BackendProfile:
    """:func:`profile_for` the running backend (``jax.default_backend()``, which starts the
    backend: call it once JAX is configured)."""
    return profile_for(jax.default_backend(), **overrides)
