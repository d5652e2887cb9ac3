"""The device mesh: one ('data', 'fsdp') mesh for every device count, from the topology.

Training splits the batch over both axes and each trained tensor over 'fsdp' (train/sharding.py
holds the partition rules); inference splits the batch over 'data' with params replicated.

Devices are grouped by the slower network between them: TPU slices (joined by DCN), else
processes (hosts joined by the data-center network; one GPU node each). An FSDP group that
fits in one group stays inside it, gathering weights over the fast links (ICI, NVLink), and
data parallelism goes across groups. An `fsdp` larger than a group spans whole groups.
Within a group, `mesh_utils` lays the axes along the physical links (TPU torus, GPU ids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

DATA_AXES = ("data", "fsdp")  # the batch dimension is split over both


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: every process's), `fsdp` devices per
    group; see the module docstring for how devices are placed."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(device_grid(fsdp, devices), DATA_AXES)


def device_grid(fsdp: int, devices: Sequence[jax.Device]) -> np.ndarray:
    """The [data, fsdp] array of `devices` that :func:`make_mesh` builds its mesh on."""
    devices = list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the {len(devices)} devices")
    groups = device_groups(devices)
    data = len(devices) // fsdp
    if len(groups) == 1:
        return mesh_utils.create_device_mesh((data, fsdp), devices)
    per_group = len(groups[0])
    if any(len(group) != per_group for group in groups):
        raise ValueError(f"devices per host differ: {[len(g) for g in groups]}")
    if per_group % fsdp == 0:  # FSDP inside a group, data parallel across groups
        inner, outer = (per_group // fsdp, fsdp), (len(groups), 1)
    elif fsdp % per_group == 0:  # FSDP over whole groups
        inner, outer = (1, per_group), (data, fsdp // per_group)
    else:
        raise ValueError(
            f"fsdp={fsdp} fits neither inside a group of {per_group} devices (a host or "
            f"TPU slice) nor over whole groups: choose a divisor or multiple of {per_group}"
        )
    by_process = not _has_slices(devices)
    return mesh_utils.create_hybrid_device_mesh(
        inner, outer, devices, process_is_granule=by_process
    )


def device_groups(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """The devices grouped by TPU slice when there are several slices, else by process."""
    key = (lambda d: d.slice_index) if _has_slices(devices) else (lambda d: d.process_index)
    groups: dict[int, list[jax.Device]] = {}
    for device in devices:
        groups.setdefault(key(device), []).append(device)
    return [groups[k] for k in sorted(groups)]


def _has_slices(devices: Sequence[jax.Device]) -> bool:
    return len({getattr(d, "slice_index", 0) for d in devices}) > 1


def fsdp_at_hand(fsdp: int, devices: int | None = None) -> int:
    """The FSDP size to restore a run saved with `fsdp` onto `devices` (default: all of this
    run's): `fsdp` when it divides them, else their greatest common divisor. The layout
    changes, not the numbers: checkpoints restore onto any mesh."""
    devices = jax.device_count() if devices is None else devices
    return fsdp if devices % fsdp == 0 else math.gcd(fsdp, devices)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The inference mesh over the given (default: all) devices: the batch over 'data',
    params replicated ('fsdp' of size 1)."""
    return make_mesh(1, list(devices or jax.devices()))


def local_mesh() -> Mesh:
    """The inference mesh of this process's devices: for work only one process does, such
    as the validation edits during training."""
    return data_mesh(jax.local_devices())
