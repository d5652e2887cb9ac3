"""glibc malloc settings that keep the resident memory of a big model near one copy.

Loading weights and tracing/compiling the UNet free many large blocks. With glibc's default
(dynamic) thresholds those stay in the heap: about 1.3 GB on SD-1.5 that the OS never gets
back, so the peak RSS is 6 GB for 4.5 GB of live data. While loading and compiling, blocks
of 1 MB and up are therefore memory-mapped (freed at once). For sampling, where the same
activations are allocated every step, large thresholds keep them in the heap, which is
15-20 % faster than mapping them anew. Linux/glibc only; ``IP2P_JAX_MALLOC=default`` (or any
other platform) leaves malloc alone. The pipelines tune it where the backend profile says
(``BackendProfile.tune_malloc``: on the CPU, where the model's memory is the host's).

Weights go from the host onto the devices with :func:`move_to_devices`, which frees each host
array once its copy is done, so the two copies never coexist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import TYPE_CHECKING

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

if TYPE_CHECKING:
    from ip2p_jax.weights.model_folder import LoadedComponent

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


# Bytes of host arrays in flight to the devices before move_to_devices waits for them.
PLACE_WINDOW = 256 << 20


def move_to_devices(component: LoadedComponent, shardings: jax.sharding.Sharding | dict) -> None:
    """Moves a component's params onto the devices leaf by leaf, in place. The component lets
    go of its host tree first, so each host array is freed once its copy is done (when
    nothing else holds it) and the peak stays near one copy of the weights, not two.

    ``shardings`` is one sharding for every leaf or a tree of them shaped like the params.
    device_put is asynchronous and holds its host array until the copy is done: the copies
    are waited for every ``PLACE_WINDOW`` bytes. Unwaited, SD-1.5's weights peaked at two
    copies (7.8 GB) a few seconds after loading; waiting for each leaf made loading 30 %
    slower.
    """
    flat = flatten_dict(component.params)
    component.params = None
    per_leaf = None if isinstance(shardings, jax.sharding.Sharding) else flatten_dict(shardings)
    placed, pending, pending_bytes = {}, [], 0
    while flat:
        path, array = flat.popitem()
        sharding = shardings if per_leaf is None else per_leaf[path]
        placed[path] = jax.device_put(array, sharding)
        pending.append(placed[path])
        pending_bytes += array.nbytes
        del array
        if pending_bytes >= PLACE_WINDOW or not flat:
            jax.block_until_ready(pending)
            pending, pending_bytes = [], 0
    component.params = unflatten_dict(placed)
