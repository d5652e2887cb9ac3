"""How ip2p-jax compiles: XLA:CPU's choice of convolution and matmul library, and JAX's
persistent compilation cache (on by default for editing and training: a second run of the
same shapes loads its executables instead of compiling them again)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ip2p_jax" / "xla"

# XLA:CPU hands dots and convolutions to YNNPACK by default. YNNPACK seems to split a
# convolution over the cores by blocks of 64 output channels, and SD's 320 channels (5 blocks)
# leave two cores unevenly loaded: 160-165 GFLOP/s at the 32x32 level, where XLA's own (Eigen)
# convolution reaches 195-215 and torch's oneDNN 220-230. An empty fusion-type list turns
# YNNPACK off for the programs compiled with these options only (scripts/bench_conv.py).
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, str] | None:
    """XLA options for the default backend: :data:`CPU_COMPILER_OPTIONS` on the CPU, else None."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


class _Jitted:
    """``jax.jit(fn, compiler_options=compiler_options(), ...)``, built on first use: asking for
    the backend at import time would start it before the user could configure JAX."""

    def __init__(self, fn: Callable, jit_kwargs: dict[str, Any]):
        self.fn, self.jit_kwargs = fn, jit_kwargs
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def jitted(self) -> Any:
        return jax.jit(self.fn, compiler_options=compiler_options(), **self.jit_kwargs)

    @functools.cached_property
    def nested(self) -> Any:
        # Inside another jit (or eval_shape) the outer program's options apply, and JAX
        # refuses compiler_options on a nested jit.
        return jax.jit(self.fn, **self.jit_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (self.nested if traced else self.jitted)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted.lower(*args, **kwargs)


def jit(fn: Callable | None = None, **jit_kwargs: Any) -> Any:
    """``jax.jit`` with :func:`compiler_options`: how every model program of ip2p-jax compiles.
    Use it for your own programs around our models too (on the CPU the convolution layers are
    laid out for XLA's own convolution, see ``models.layers.PATCHES_MAX_ROWS``). Works as a
    decorator, with or without keyword arguments."""
    if fn is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jitted(fn, jit_kwargs)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turns on JAX's persistent compilation cache (default ~/.cache/ip2p_jax/xla), unless
    the user set one already. ``IP2P_JAX_CACHE=off`` disables it."""
    if os.environ.get("IP2P_JAX_CACHE") == "off" or jax.config.jax_compilation_cache_dir:
        return
    cache = Path(path or os.environ.get("IP2P_JAX_CACHE") or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
