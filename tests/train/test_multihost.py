"""`ip2p train` as a pod runs it: 2 JAX processes x 2 CPU devices on localhost (gloo
collectives), with FSDP groups across both processes (fsdp=4), inside each (fsdp=2), and pure
data parallelism. A few steps with validation and checkpoints; a SIGTERM to one process
mid-run; `--resume`; then `ip2p export-run` on one device. The exported model must equal a
one-process run's, and the workdir must hold one set of files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ip2p_jax.train.reporting import read_metrics
from ip2p_jax.train.state_checkpoints import Checkpoints
from tests.train.conftest import ROOT, micro_config, write_config_file

STEPS = 8
RUN = {"steps": STEPS, "checkpoint_every": 3, "validate_every": 4}
VALIDATION = {"validation_steps": 2, "validation_images": 2}
# Two processes reduce in another order than one: float32 sums agree to about 1e-6.
PARAM_ATOL = 1e-5


def _config_file(folder: Path, data: Path, fsdp: int) -> Path:
    return write_config_file(
        folder / "config.py",
        "from tests.train.conftest import micro_config",
        f"micro_config({str(data)!r}, fsdp={fsdp}, **{RUN!r}, **{VALIDATION!r})",
    )


def _env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


def _ip2p(*args: str, devices: int, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ip2p_jax", *args],
        cwd=ROOT,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_pair(config: Path, workdir: Path, *extra: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    return [
        _ip2p(
            "train",
            *("--config", str(config), "--workdir", str(workdir)),
            *("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"),
            *("--process-id", str(pid), *extra),
            devices=2,
        )
        for pid in (0, 1)
    ]


def _finish(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-4000:]
        outputs.append(out)
    return outputs


def _unet(folder: Path) -> dict[str, np.ndarray]:
    from ip2p_jax.weights.model_folder import load_component

    params = load_component(folder, "unet").params
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def _assert_same_unet(model: Path, reference: dict[str, np.ndarray]) -> None:
    unet = _unet(model)
    assert sorted(unet) == sorted(reference)
    for name, expected in reference.items():
        np.testing.assert_allclose(
            unet[name], expected, atol=PARAM_ATOL, err_msg=f"{model}: {name}"
        )


@pytest.fixture(scope="module")
def one_process_model(shapes32, tmp_path_factory) -> dict[str, np.ndarray]:
    """The UNet a one-process, one-device run of the same config exports."""
    from ip2p_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("one_process")
    train(micro_config(shapes32, **RUN, **VALIDATION), workdir)
    return _unet(workdir / "model")


@pytest.mark.parametrize("fsdp", [4, 2, 1], ids=["fsdp4_across_hosts", "fsdp2", "data_parallel"])
def test_two_hosts_stop_resume_and_export_like_one(shapes32, one_process_model, tmp_path, fsdp):
    config = _config_file(tmp_path, shapes32, fsdp)
    workdir = tmp_path / "run"

    # SIGTERM to the second process once the run is under way: both save the same step.
    first = _train_pair(config, workdir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert all(p.poll() is None for p in first), [p.communicate() for p in first]
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.2)
    first[1].send_signal(signal.SIGTERM)
    stopped = _finish(first)
    saved = Checkpoints(workdir).latest_step()
    assert saved is not None and 1 <= saved < STEPS, stopped
    assert all(f"stopped at step {saved}" in out for out in stopped)
    assert "SIGTERM: saved step" in stopped[0] and "SIGTERM" not in stopped[1]

    finished = _finish(_train_pair(config, workdir, "--resume"))
    assert all(f"finished at step {STEPS}" in out for out in finished)

    # One set of files, each step's metrics once, the validation grids of steps 4 and 8.
    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "model",
        "tensorboard",
        "validation",
    ]
    assert [row["step"] for row in read_metrics(workdir)] == list(range(1, STEPS + 1))
    assert len(list((workdir / "tensorboard").iterdir())) == 2  # the two starts of process 0
    validation = sorted(p.name for p in (workdir / "validation").iterdir())
    assert validation == [f"step_{s:07d}.png" for s in (4, 8)]

    # Any machine reads the run: the last checkpoint exported on one device.
    exported = tmp_path / "exported"
    export = _ip2p("export-run", str(workdir), str(exported), devices=1)
    _finish([export])
    for model in (workdir / "model", exported):
        _assert_same_unet(model, one_process_model)


def test_a_run_resumes_on_another_process_and_device_count(shapes32, one_process_model, tmp_path):
    """3 steps on 2 processes x 1 device (fsdp=2 across them), the rest on 1 process with 1
    device: orbax restores onto the mesh at hand, and the data goes on from the same example,
    so the model is the one-process run's."""
    config = _config_file(tmp_path, shapes32, fsdp=2)
    workdir = tmp_path / "run"
    port = str(_free_port())
    first = [
        _ip2p(
            "train",
            *("--config", str(config), "--workdir", str(workdir), "--config.steps=3"),
            *("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"),
            *("--process-id", str(pid)),
            devices=1,
        )
        for pid in (0, 1)
    ]
    _finish(first)
    resumed = _ip2p(
        "train", "--config", str(config), "--workdir", str(workdir), "--resume", devices=1
    )
    (out,) = _finish([resumed])
    assert f"finished at step {STEPS}" in out
    assert [row["step"] for row in read_metrics(workdir)] == list(range(1, STEPS + 1))
    _assert_same_unet(workdir / "model", one_process_model)
