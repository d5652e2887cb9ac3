"""Shared fixtures: random-weight model folders in the real diffusers layout, built once."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Keep XLA quiet; set before jax is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Under xdist, one compute thread per worker: two workers with two threads each on CI's two
# cores spin-wait for each other (OpenMP in torch, Eigen in XLA); on a datagen/parity subset
# this took the wall time from 131 s to 89 s. The tests' tolerances hold either way (the
# suite passes serially with the default threads too). Set before torch or jax is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_cpu_multi_thread_eigen=false".strip()

# One XLA compilation cache for every process of a test run (the xdist workers and the
# subprocesses of the CLI and multi-process tests): a program one of them compiled, the others
# load instead of compiling again. The first process (xdist's controller) makes it and the
# others inherit it; a cache the user set is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _run_cache = tempfile.mkdtemp(prefix="ip2p-jax-test-xla-")
    atexit.register(shutil.rmtree, _run_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _run_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Under xdist (`make test` runs `pytest -n 2 --dist loadgroup`) each group below runs on one
# worker, longest first: these hold most of the suite's time (CI's --durations). The rest go
# a module to a worker, so module fixtures and the programs they compile are built once.
HEAVY_GROUPS = (
    "sd15",
    "train runs",
    "tests/train/test_config_and_models.py",
    "tests/train/test_grow.py",
    "tests/test_device_check.py",
    "tests/test_device_train_shapes.py",
    "tests/test_datagen/test_ray_pairs.py",
    "tests/parity/test_sdxl.py",
    "tests/train/test_sdxl_train.py",
    "tests/parity/test_component_parity.py",
    "tests/test_cli.py",
    "tests/train/test_vae.py",
    "tests/test_shipped_model.py",
)


# Modules that share session fixtures too costly to build twice (tests/train/conftest.py's
# trained runs) run on one worker.
SHARED_GROUPS = {
    "tests/train/test_train.py": "train runs",
    "tests/train/test_latent_cache.py": "train runs",
    "tests/train/test_snapshot.py": "train runs",
    "tests/train/test_multihost.py": "train runs",
}


def _group(item: pytest.Item) -> str:
    if item.get_closest_marker("full_size"):
        return "sd15"  # one worker builds the 4.3 GB SD-1.5 folder and runs its tests
    module = item.nodeid.split("::")[0]
    return SHARED_GROUPS.get(module, module)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups off the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {name: k for k, name in enumerate(HEAVY_GROUPS)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: file order kept


def _build(factory: pytest.TempPathFactory, preset: str):
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    return build_pipeline_folder(factory.mktemp(preset) / "model", preset)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """SD-1.x-style IP2P pipeline in miniature (in_channels 8)."""
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory):
    """SD-2.x-style: linear projections, per-block heads, cross_attention_dim 48, gelu."""
    return _build(tmp_path_factory, "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """SDXL-style IP2P pipeline in miniature, saved by StableDiffusionXLInstructPix2PixPipeline:
    the text_time UNet, two text encoders of different widths, tokenizer_2."""
    from ip2p_jax.testing.reference_models import build_sdxl_folder

    return build_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory):
    """The real SD-1.5 architecture with random weights, UNet in_channels 8 (about 4.3 GB)."""
    return _build(tmp_path_factory, "sd15")


def run_device_script(script: str, out: Path, *args: str) -> str:
    """`bash scripts/<script> ARGS` (the lent GPU's commands, e.g. with --cpu) with $OUT set
    and this interpreter as its Python; asserts it passed and returns what it printed."""
    process = subprocess.run(
        ["bash", f"scripts/{script}", *args],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OUT": str(out), "IP2P_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    return output
