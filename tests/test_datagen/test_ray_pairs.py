"""`ip2p datagen pairs --ray` on a local Ray cluster of 2 CPU workers, killed two ways in one
job: a worker SIGKILLed mid-job (the driver hands its prompt to another worker), then the
driver SIGKILLed (a rerun finishes the job). The pair folder and the dataset built from it
hold every prompt's pairs once, byte for byte those of an uninterrupted run in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from datagen.clip_filter import FilterConfig
from datagen.pair_job import JobSpec, build_runner, run_locally
from datagen.pairs import PairConfig
from datagen.ray_pairs import worker_layout
from datagen.writer import PairFolder

PROMPTS = [
    {"input": f"a {colour} {thing}", "edit": f"make it {other}", "output": f"a {other} {thing}"}
    for colour, other in (("red", "blue"), ("green", "pink"), ("black", "white"))
    for thing in ("car", "house", "boat", "tree")
]
STEPS = 6  # long enough per prompt that a kill lands mid-job
PERMISSIVE = FilterConfig(min_caption_sim=-1, min_direction_sim=-1, min_image_sim=-1, keep=1)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sd_folder, clip_folder):
    """The uninterrupted job, run in this process with one thread (as each Ray worker of one
    CPU runs), and its dataset."""
    import torch

    from ip2p_jax.data import build

    root = tmp_path_factory.mktemp("reference")
    spec = _spec(sd_folder, clip_folder, root / "pairs")
    PairFolder(spec.out, spec.recipe())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_locally(build_runner(spec), PROMPTS, range(len(PROMPTS)), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.prompts == len(PROMPTS) and not summary.failures
    from ip2p_jax.data.importers import write_seeds_json

    write_seeds_json(spec.out)
    build.import_original(spec.out, root / "data")
    return root


def _spec(sd_folder, clip_folder, out):
    config = PairConfig(steps=STEPS, resolution=32)
    return JobSpec(str(sd_folder), str(clip_folder), str(out), config, PERMISSIVE, samples=2)


def _command(prompts_file, sd_folder, clip_folder, out, *extra):
    args = ["datagen", "pairs", "--prompts", prompts_file, "--model", sd_folder]
    args += ["--clip", clip_folder, "--out", out, "--samples", "2", "--keep", "1"]
    args += ["--steps", STEPS, "--resolution", "32", "--clip-threshold", "-1"]
    args += ["--clip-dir-threshold", "-1", "--clip-img-threshold", "-1", "--no-progress"]
    args += ["--ray", "--workers", "2", *extra]
    return [sys.executable, "-m", "ip2p_jax", *map(str, args)]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    return dict(env, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")


def _done(out):
    return sorted(p.name for p in out.glob("0*") if p.is_dir()) if out.is_dir() else []


def _wait_for(condition, job, what, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None:
            pytest.fail(f"the job ended (rc {job.returncode}) before {what}: {job.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _workers(job):
    """The job's Ray worker processes (descendants of the driver, titled ray::PairWorker)."""
    found = []
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if "PairWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _running(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_same_as_reference(out, data, reference):
    from ip2p_jax.data.edit_pairs import EditPairSource, split_sizes

    expected = reference / "pairs"
    assert _done(out) == _done(expected) == [f"{i:07d}" for i in range(len(PROMPTS))]
    for name in _done(expected):
        files = sorted(p.name for p in (expected / name).iterdir())
        assert sorted(p.name for p in (out / name).iterdir()) == files, name
        for file in files:
            assert (out / name / file).read_bytes() == (expected / name / file).read_bytes()
    assert not [p for p in out.rglob(".*") if p.is_dir()], "a staging folder was left"
    sizes = split_sizes(data)
    assert sizes == split_sizes(reference / "data")
    keys = {}
    for split, size in sizes.items():
        ours, theirs = EditPairSource(data, split), EditPairSource(reference / "data", split)
        for i in range(size):
            assert ours[i] == theirs[i]
            keys.setdefault(ours[i]["key"], []).append(split)
    assert all(len(splits) == 1 for splits in keys.values()), "a key in two splits"
    assert len(keys) == len(PROMPTS)  # one kept pair each


def test_a_killed_worker_and_a_killed_driver_lose_and_repeat_nothing(
    tmp_path, prompts_file, sd_folder, clip_folder, reference
):
    """One job, killed twice: a worker mid-job (its prompt goes to another worker, and the
    lost worker is replaced), then the driver (its workers die with it); a rerun finishes."""
    out, log = tmp_path / "pairs", tmp_path / "driver.log"
    command = _command(prompts_file, sd_folder, clip_folder, out)
    with open(log, "w") as sink:
        job = subprocess.Popen(command, env=_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(_done(out)) >= 1, job, "the first prompt was done")
        victims = _workers(job)
        assert len(victims) == 2, victims
        victims[0].send_signal(signal.SIGKILL)
        lost = ("worker lost on prompt", "worker lost after it wrote")
        _wait_for(lambda: any(m in log.read_text() for m in lost), job, "the loss was seen")
        _wait_for(lambda: len(_done(out)) >= 4, job, "four prompts were done")
        cluster = psutil.Process(job.pid).children(recursive=True)
        workers = _workers(job)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        job.kill()
    # The workers (the only writers) die with their driver. Ray's node agents may linger a
    # while; they are stopped here so that they take no CPU from the next tests.
    deadline = time.monotonic() + 30
    while (writing := [p for p in workers if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in cluster:
        if _running(process):
            process.kill()
    assert workers and not writing, writing
    done = len(_done(out))
    assert done < len(PROMPTS), "the job ended before the driver was killed"

    finish = command + ["--dataset", str(tmp_path / "data")]
    rerun = subprocess.run(finish, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"already done: {done}" in rerun.stdout
    _assert_same_as_reference(out, tmp_path / "data", reference)


def test_worker_layout():
    assert worker_layout({"CPU": 16, "GPU": 8}, 2, None) == (8, {"num_gpus": 1, "num_cpus": 1})
    assert worker_layout({"CPU": 16}, 2, None) == (2, {"num_gpus": 0, "num_cpus": 8})
    assert worker_layout({"CPU": 2}, 1, 2) == (2, {"num_gpus": 0, "num_cpus": 1})
