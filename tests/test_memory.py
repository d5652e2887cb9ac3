"""The malloc settings: applied on glibc, skipped when the user opts out."""

from __future__ import annotations

import sys

import pytest

from ip2p_jax.runtime import memory


def test_opting_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("IP2P_JAX_MALLOC", "default")
    assert memory._libc() is None
    memory.release_large_blocks()  # no-ops, no errors
    memory.keep_blocks_for_reuse()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_glibc_is_found_and_accepts_the_settings(monkeypatch):
    monkeypatch.delenv("IP2P_JAX_MALLOC", raising=False)
    libc = memory._libc()
    assert libc is not None
    assert libc.mallopt(-3, 1 << 20) == 1  # mallopt returns 1 on success
    memory.keep_blocks_for_reuse()


def test_weights_are_placed_with_a_bounded_window_of_host_copies_in_flight(monkeypatch):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ip2p_jax.weights.model_folder import LoadedComponent

    window, leaf_bytes = 3 * 4096, 4096
    monkeypatch.setattr(memory, "PLACE_WINDOW", window)
    in_flight, most = [0], [0]
    put, wait = jax.device_put, jax.block_until_ready

    def counting_put(array, sharding):
        in_flight[0] += array.nbytes
        most[0] = max(most[0], in_flight[0])
        return put(array, sharding)

    def counting_wait(tree):
        in_flight[0] = 0
        return wait(tree)

    monkeypatch.setattr(jax, "device_put", counting_put)
    monkeypatch.setattr(jax, "block_until_ready", counting_wait)
    params = {f"layer{i}": {"kernel": np.full(leaf_bytes // 4, i, np.float32)} for i in range(10)}
    component = LoadedComponent(config=None, raw_config={}, module=None, params=params)
    mesh = jax.make_mesh((1,), ("data",))
    memory.move_to_devices(component, NamedSharding(mesh, P()))
    assert most[0] <= window  # the host copies waited for every 3 leaves, never all 10
    assert in_flight[0] == 0  # and the last ones before returning
    for i in range(10):
        placed = component.params[f"layer{i}"]["kernel"]
        assert isinstance(placed, jax.Array) and float(placed[0]) == i
