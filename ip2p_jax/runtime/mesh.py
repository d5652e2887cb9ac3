"""The device meshes: one ('data', 'fsdp') mesh for every device count.

Training splits the batch over both axes and each trained tensor over 'fsdp' (train/sharding.py
holds the partition rules); inference splits the batch over 'data' with params replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXES = ("data", "fsdp")  # the batch dimension is split over both


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices (of every process), fsdp devices per group."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, DATA_AXES)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over the given (default: all) devices."""
    devices = list(devices or jax.devices())
    return Mesh(np.array(devices), ("data",))
