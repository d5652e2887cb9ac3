"""glibc malloc settings that keep the resident memory of a big model near one copy.

Loading weights and tracing/compiling the UNet free many large blocks. With glibc's default
(dynamic) thresholds those stay in the heap: about 1.3 GB on SD-1.5 that the OS never gets
back, so the peak RSS is 6 GB for 4.5 GB of live data. While loading and compiling, blocks
of 1 MB and up are therefore memory-mapped (freed at once). For sampling, where the same
activations are allocated every step, large thresholds keep them in the heap, which is
15-20 % faster than mapping them anew. Linux/glibc only; ``IP2P_JAX_MALLOC=default`` (or any
other platform) leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    if os.environ.get("IP2P_JAX_MALLOC") == "default":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_large_blocks() -> None:
    """Loading and compiling: blocks of 1 MB and up go back to the OS when freed."""
    if (libc := _libc()) is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def keep_blocks_for_reuse() -> None:
    """Sampling: return what is free now, then keep freed blocks (up to 64 MB) for reuse."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
