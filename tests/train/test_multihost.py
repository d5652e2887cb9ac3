"""`ip2p train` as a pod runs it: 2 JAX processes x 2 CPU devices on localhost (gloo
collectives). A run with FSDP groups inside each process (fsdp=2, data parallel across them)
takes a few steps with checkpoints and gets a SIGTERM to one process mid-run. It is resumed
with `--resume` on 2 processes with groups across both (fsdp=4), validating, and its last
checkpoint is exported on one device by `ip2p export-run`: both models must equal a
one-process run's. (A resume on another process count reads the same batches on:
tests/data/test_loader.py; pure data parallelism, fsdp=1, reduces across hosts as fsdp=2
does.)"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ip2p_jax.train.reporting import read_metrics
from ip2p_jax.train.state_checkpoints import Checkpoints
from tests.train.conftest import micro_config, write_config_file
from tests.train.processes import finish as _finish
from tests.train.processes import train_pair as _train_pair

STEPS = 6
RUN = {"steps": STEPS, "checkpoint_every": 3}
VALIDATION = {"validate_every": 3, "validation_steps": 2, "validation_images": 2}
# Two processes reduce in another order than one: float32 sums agree to about 1e-6.
PARAM_ATOL = 1e-5


def _config_file(folder: Path, data: Path, fsdp: int, validate: bool = False) -> Path:
    run = {**RUN, **VALIDATION} if validate else RUN
    return write_config_file(
        folder / "config.py",
        "from tests.train.conftest import micro_config",
        f"micro_config({str(data)!r}, fsdp={fsdp}, **{run!r})",
    )


def _stop_mid_run(processes: list[subprocess.Popen], workdir: Path) -> int:
    """SIGTERM to the second process once the run has logged a step; returns the step both
    stopped at (the one they saved)."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    outputs = _finish(processes)
    saved = Checkpoints(workdir).latest_step()
    assert saved is not None and 1 <= saved < STEPS, outputs
    assert all(f"stopped at step {saved}" in out for out in outputs)
    assert "SIGTERM: saved step" in outputs[0] and "SIGTERM" not in outputs[-1]
    return saved


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
def one_process_model(six_step_run) -> dict[str, np.ndarray]:
    """The UNet a one-process, one-device run of the same config exports: the shared
    six-step run's (``micro_config(shapes32)`` is ``RUN``; validation images change nothing
    in training)."""
    assert micro_config("data", **RUN) == micro_config("data")
    return _unet(six_step_run[0] / "model")


@pytest.fixture(scope="module")
def stopped_run(shapes32, tmp_path_factory) -> tuple[Path, int]:
    """A run on 2 processes with fsdp=2 (a group per process: data parallel across the
    hosts, each weight split over one host's devices), stopped by a SIGTERM to one process
    mid-run: its workdir and the step it saved."""
    folder = tmp_path_factory.mktemp("stopped")
    workdir = folder / "run"
    saved = _stop_mid_run(_train_pair(_config_file(folder, shapes32, fsdp=2), workdir), workdir)
    return workdir, saved


def test_fsdp_across_hosts_resumes_validates_and_exports_on_one_device(
    shapes32, stopped_run, one_process_model, tmp_path
):
    """The stopped run resumed on 2 processes with fsdp=4: each FSDP group now spans both
    processes, so every weight is split over hosts (orbax restores onto the new layout)."""
    workdir, saved = stopped_run
    config = _config_file(tmp_path, shapes32, fsdp=4, validate=True)
    finished = _finish(_train_pair(config, workdir, "--resume"))
    assert all(f"finished at step {STEPS}" in out for out in finished)

    # One set of files (process 0's), each step's metrics once, validation where it was on.
    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "model",
        "tensorboard",
        "validation",
    ]
    assert [row["step"] for row in read_metrics(workdir)] == list(range(1, STEPS + 1))
    assert len(list((workdir / "tensorboard").iterdir())) == 2  # process 0's two starts
    validation = sorted(p.name for p in (workdir / "validation").iterdir())
    assert validation == [f"step_{step:07d}.png" for step in (3, 6) if step > saved]

    # Any machine reads the run: its last checkpoint exported on one device (this process's).
    from ip2p_jax.train.snapshot import export_run

    exported = export_run(workdir, tmp_path / "exported")
    for model in (workdir / "model", exported):
        _assert_same_unet(model, one_process_model)
