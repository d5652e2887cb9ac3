"""JAX's persistent compilation cache, on by default for editing and training: a second
run of the same shapes loads its executables instead of compiling them again."""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ip2p_jax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turns on JAX's persistent compilation cache (default ~/.cache/ip2p_jax/xla), unless
    the user set one already. ``IP2P_JAX_CACHE=off`` disables it."""
    if os.environ.get("IP2P_JAX_CACHE") == "off" or jax.config.jax_compilation_cache_dir:
        return
    cache = Path(path or os.environ.get("IP2P_JAX_CACHE") or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
