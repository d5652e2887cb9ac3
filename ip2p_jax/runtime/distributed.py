"""Running as one of several JAX processes (TPU pod hosts, GPU nodes, or localhost processes
on the CPU): starting the process group, host copies of arrays that span other hosts,
agreeing on a preemption, and who writes files.

Every function here is safe in a single process, where it reduces to the obvious thing.
Functions marked *collective* must be called by every process, in the same order.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the process group before any other JAX call. Without arguments JAX detects the
    cluster (TPU pods, SLURM, Open MPI, Kubernetes); a bare GPU cluster passes all three,
    as torchrun's --master-addr, --nnodes and --node-rank. CPU collectives go over gloo, so
    localhost processes on the CPU can run the same programs."""
    explicit = (coordinator, num_processes, process_id)
    if any(value is not None for value in explicit) and None in explicit:
        raise ValueError(
            "give all of --coordinator HOST:PORT, --num-processes and --process-id, "
            "or none of them (JAX then detects the cluster)"
        )
    # Only the CPU client reads this; accelerators keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def is_primary() -> bool:
    """Process 0: the one that writes logs, images and exported models."""
    return jax.process_index() == 0


def host_copy(tree: Any) -> Any:
    """Numpy copies of a tree of arrays on this host, whichever hosts hold them. *Collective*
    when a leaf is split over devices of other processes: those are gathered together (one
    program); replicated and local leaves are copied from a local device."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array)
        and not leaf.is_fully_addressable
        and not leaf.is_fully_replicated
    ]
    # Replicated leaves that span other hosts: this process's own copy is the whole value.
    # Split ones are filled in by the gather below.
    copies: list[Any] = [
        None
        if i in spread
        else leaf.addressable_data(0)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        else leaf
        for i, leaf in enumerate(leaves)
    ]
    copies = jax.device_get(copies)
    if spread:
        gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
        for i, value in zip(spread, gathered, strict=True):
            copies[i] = np.asarray(value)
    return treedef.unflatten(copies)


def addressable(tree: Any) -> Any:
    """`tree` itself when this process holds every leaf whole (one process: always), else
    :func:`host_copy` of it. *Collective* in the second case."""
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return tree
    return host_copy(tree)


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order. *Collective*."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(size)]).decode())
        for row, size in zip(rows, np.ravel(sizes), strict=True)
    ]


def barrier(name: str) -> None:
    """Waits until every process got here. *Collective*; nothing in a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class StopRequest:
    """A SIGTERM, turned into a step at which every process stops together.

    One process: a flag the signal sets. Several: JAX's preemption service (started by
    `jax.distributed.initialize`) catches the signal on any process and has all of them
    agree on the step to stop at, so they save the same checkpoint and exit together.
    `due(step)` must be called at every step, by every process."""

    def __init__(self):
        self.distributed = jax.process_count() > 1
        self.requested = False
        self._previous = None
        if not self.distributed:  # the preemption service owns SIGTERM otherwise
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def due(self, step: int) -> bool:
        """True at the step where this run stops for a SIGTERM (the same on every process)."""
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
