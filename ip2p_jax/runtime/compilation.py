"""How ip2p-jax compiles: with the XLA options of the backend profile (runtime.profile; on
the CPU, XLA's own convolutions instead of YNNPACK's), and with JAX's persistent compilation
cache (on by default for editing and training: a second run of the same shapes loads its
executables instead of compiling them again)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from ip2p_jax.runtime.profile import BackendProfile, current_profile

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ip2p_jax" / "xla"


class _Jitted:
    """``jax.jit(fn, compiler_options=<the profile's XLA options>, ...)``, built on first use:
    asking for the backend at import time would start it before the user could configure JAX."""

    def __init__(self, fn: Callable, profile: BackendProfile | None, jit_kwargs: dict[str, Any]):
        self.fn, self.profile, self.jit_kwargs = fn, profile, jit_kwargs
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def jitted(self) -> Any:
        options = (self.profile or current_profile()).xla_options()
        return jax.jit(self.fn, compiler_options=options, **self.jit_kwargs)

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


def jit(
    fn: Callable | None = None, *, profile: BackendProfile | None = None, **jit_kwargs: Any
) -> Any:
    """``jax.jit`` with the XLA options of ``profile`` (default: the running backend's, see
    runtime.profile): how every model program of ip2p-jax compiles. Use it for your own
    programs around our models too (on the CPU the convolution layers are laid out for XLA's
    own convolution, see ``BackendProfile.conv_patches_max_rows``). Works as a decorator,
    with or without keyword arguments."""
    if fn is None:
        return functools.partial(jit, profile=profile, **jit_kwargs)
    return _Jitted(fn, profile, jit_kwargs)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turns on JAX's persistent compilation cache (default ~/.cache/ip2p_jax/xla), unless
    the user set one already. ``IP2P_JAX_CACHE=off`` disables it."""
    if os.environ.get("IP2P_JAX_CACHE") == "off" or jax.config.jax_compilation_cache_dir:
        return
    cache = Path(path or os.environ.get("IP2P_JAX_CACHE") or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
