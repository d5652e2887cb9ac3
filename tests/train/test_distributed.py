"""The train step gives the same losses and params on 1 device and on 8 simulated devices
(data parallel and FSDP). Several JAX processes: tests/train/test_multihost.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train import run_steps

SCRIPT = Path(run_steps.__file__)
# Summation order changes with the layout: float32 reductions agree to about 1e-6 relative.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


def _run(out: Path, *args: str, devices: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, str(SCRIPT), str(out), *args]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, **popen)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.npz"
    _finish(_run(out))
    return dict(np.load(out))


def _assert_same(result: dict, reference: dict) -> None:
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=LOSS_RTOL)
    names = [k for k in reference if k not in ("losses", "devices")]
    assert sorted(names) == sorted(k for k in result if k not in ("losses", "devices"))
    for name in names:
        np.testing.assert_allclose(result[name], reference[name], atol=PARAM_ATOL, err_msg=name)


@pytest.mark.parametrize("fsdp", [1, 2])
def test_eight_devices_equal_one(one_device, tmp_path, fsdp):
    out = tmp_path / "eight.npz"
    _finish(_run(out, "--fsdp", str(fsdp), devices=8))
    result = dict(np.load(out))
    assert int(result["devices"]) == 8 and int(one_device["devices"]) == 1
    _assert_same(result, one_device)
