"""The mesh factory: FSDP groups inside a host or TPU slice, data parallelism across them,
an FSDP group over whole hosts when it is larger; a resumed run's FSDP size on the devices
at hand. Fake devices stand in for a pod's (only their grouping attributes are read)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ip2p_jax.runtime.mesh import device_grid, fsdp_at_hand


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def _hosts(hosts: int, per_host: int, *, slices: int = 1) -> list[FakeDevice]:
    per_slice = hosts // slices
    return [
        FakeDevice(h * per_host + d, h, slice_index=h // per_slice)
        for h in range(hosts)
        for d in range(per_host)
    ]


def _processes(grid: np.ndarray) -> list[list[int]]:
    return [[device.process_index for device in row] for row in grid]


def test_fsdp_groups_stay_inside_a_host_and_data_goes_across():
    grid = device_grid(4, _hosts(2, 8))
    assert grid.shape == (4, 4)
    assert _processes(grid) == [[0] * 4, [0] * 4, [1] * 4, [1] * 4]


def test_an_fsdp_group_larger_than_a_host_spans_whole_hosts():
    grid = device_grid(4, _hosts(4, 2))
    assert grid.shape == (2, 4)
    assert _processes(grid) == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_tpu_slices_are_the_groups_when_there_are_several():
    devices = _hosts(4, 4, slices=2)  # 2 slices of 2 hosts
    grid = device_grid(8, devices)
    assert grid.shape == (2, 8)
    assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]


def test_data_parallel_only_puts_every_device_on_the_data_axis():
    devices = _hosts(2, 2)
    assert [d.id for d in device_grid(1, devices).ravel()] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("fsdp", "message"),
    [(3, "fsdp=3 must divide the 8 devices"), (8, None), (16, "must divide")],
)
def test_layouts_that_do_not_fit_are_named(fsdp, message):
    devices = _hosts(2, 4)
    if message is None:
        assert device_grid(fsdp, devices).shape == (1, 8)
        return
    with pytest.raises(ValueError, match=message):
        device_grid(fsdp, devices)


def test_a_group_that_neither_fits_a_host_nor_whole_hosts_is_refused():
    with pytest.raises(ValueError, match="fits neither inside a group of 4 devices"):
        device_grid(6, _hosts(3, 4))


def test_a_resumed_run_keeps_its_fsdp_where_it_divides_the_devices():
    assert fsdp_at_hand(4, 8) == 4
    assert fsdp_at_hand(4, 1) == 1  # trained on a pod slice, exported on a workstation
    assert fsdp_at_hand(4, 6) == 2
