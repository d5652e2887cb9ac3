"""`ip2p train` as 2 JAX processes of 2 CPU devices each on localhost (gloo collectives),
as a pod runs it: for the multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.train.conftest import ROOT


def env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


def ip2p(*args: str, devices: int, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ip2p_jax", *args],
        cwd=ROOT,
        env=env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_pair(config: Path, workdir: Path, *extra: str) -> list[subprocess.Popen]:
    """`ip2p train` as 2 processes of 2 devices each."""
    port = str(free_port())
    return [
        ip2p(
            "train",
            *("--config", str(config), "--workdir", str(workdir)),
            *("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"),
            *("--process-id", str(pid), *extra),
            devices=2,
        )
        for pid in (0, 1)
    ]


def finish(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-4000:]
        outputs.append(out)
    return outputs
