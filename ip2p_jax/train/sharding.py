"""The partition rules of the trained params, and the batch's placement on the mesh.

On the ('data', 'fsdp') mesh (runtime/mesh.py) the batch is split over both axes; each
trained tensor is split over 'fsdp' along the axis its rule names (FSDP: every device holds
1/fsdp of the weights and optimizer state, gathered per layer by XLA). fsdp=1 is plain data
parallelism.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ip2p_jax.runtime.mesh import DATA_AXES

# (regex on the param path "down_blocks_0/resnets_0/conv1/kernel", spec of the trailing axes).
# First match wins; specs align to a tensor's last axes. A tensor whose axis does not divide
# by the fsdp size stays replicated.
PARTITION_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Conv kernels [kh, kw, in, out] and dense kernels [in, out]: output features over fsdp,
    # so each device computes a slice of every layer's outputs.
    (r"kernel$", ("fsdp",)),
    # Biases, norm scales, embeddings of the time MLP's input: small, replicated.
    (r".*", ()),
)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec the first matching rule gives a tensor of this path and shape."""
    for pattern, tail in PARTITION_RULES:
        if re.search(pattern, path):
            if len(tail) > len(shape):
                return PartitionSpec()
            spec = (None,) * (len(shape) - len(tail)) + tuple(tail)
            for axis, name in zip(shape, spec, strict=True):
                if name is not None and axis % mesh.shape[name]:
                    return PartitionSpec()  # not divisible: keep it whole
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """A NamedSharding for every leaf of a param tree, by PARTITION_RULES."""
    flat = flatten_dict(params, sep="/")
    return unflatten_dict(
        {
            path: NamedSharding(mesh, param_spec(path, tuple(leaf.shape), mesh))
            for path, leaf in flat.items()
        },
        sep="/",
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's numpy batch -> global arrays split over the mesh's batch axes."""
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, array)
        for name, array in local.items()
        if array.dtype.kind in "uif"  # strings (instructions, keys) stay on the host
    }
