"""Training step speed and memory: our jitted train step (ip2p_jax.train.step) against the
PyTorch reference step (ip2p_jax.testing.parity.TorchTrainStep, diffusers'
train_instruct_pix2pix.py) on the same diffusers folder, config and batch,
fp32 on the CPU, in one run.

    PYTHONPATH=. .venv/bin/python scripts/bench_train.py                      # both cases
    PYTHONPATH=. .venv/bin/python scripts/bench_train.py --cases shapes_tiny  # quicker
    PYTHONPATH=. .venv/bin/python scripts/bench_train.py --rounds 5 --steps 10
    PYTHONPATH=. .venv/bin/python scripts/bench_train.py --torch-threads 0 1  # 2 torch rows

Cases:
- shapes_tiny: configs/shapes_tiny.py as it trains (64 px, batch 32, its optimizer and EMA);
  its UNet, VAE and text encoder dicts built with random weights by the torch classes and
  saved as a diffusers folder (rebuilt each run, a second or two).
- sd15: the real SD-1.5 InstructPix2Pix architecture (random weights, /tmp/ip2p-sd15, built
  once, ~4.3 GB) at 256 px, batch 1, TrainConfig's defaults (AdamW 1e-4, weight decay 1e-2,
  clipping 1.0, EMA 0.9999). A side is skipped, with a message, when the memory available
  now is below what it was measured to need (MEMORY_MODEL; --force runs it anyway, and the
  job marks itself as the kernel's first choice if memory runs out).

One step on either side is the same work: frozen VAE encodes of both images (a posterior
sample, scaled, and the mode), the CLIP text encode, conditioning dropout, noise, the UNet's
forward and backward, the epsilon MSE, global-norm clipping, AdamW, the EMA update.

Each side runs in a fresh process, so its peak RSS is its own, and loads the folder's
weights (ours: load_models + make_trainer + init_state, which leaves no host copy of the
weights behind). The first step is timed apart (for ours it
includes tracing and compiling: "compile s" = first step - steady step); then `--rounds`
rounds of `--steps` steps each, and the median round's mean step time is reported (this
machine is shared and noisy: every round is printed, with the load average).

Threads: XLA:CPU uses all cores; torch keeps its default (all cores) unless --torch-threads
says otherwise. On a 2-core machine shared with other jobs torch's OpenMP threads can spin
against them: its default-thread rounds then swing several-fold, while one thread stays
steady, so `--torch-threads 0 1` shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SD15_FOLDER = Path("/tmp/ip2p-sd15")
PROMPTS = ("make the red circle blue", "move the square to the left", "add a green triangle")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    resolution: int
    steps: int  # timed steps per round, by default
    description: str


CASES = {
    "shapes_tiny": Case("shapes_tiny", 64, 10, "configs/shapes_tiny.py, 64 px, batch 32"),
    "sd15": Case("sd15", 256, 2, "SD-1.5 architecture, 256 px, batch 1"),
}


def case_config(name: str):
    """The TrainConfig the case trains with (its model fields are replaced by the folder)."""
    from ip2p_jax.train.config import DataConfig, TrainConfig, load_config

    if name == "shapes_tiny":
        return load_config(ROOT / "configs" / "shapes_tiny.py")
    return TrainConfig(data=DataConfig(resolution=256), batch_size=1)


def build_folder(name: str, root: Path) -> Path:
    """The case's diffusers folder, which both sides load."""
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    if name == "sd15":
        if not (SD15_FOLDER / "model_index.json").is_file():
            print(f"building a random SD-1.5 IP2P folder at {SD15_FOLDER} ...", flush=True)
            build_pipeline_folder(SD15_FOLDER, "sd15")
        return SD15_FOLDER
    model = case_config(name).model
    overrides = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    # The "tiny" preset's dicts are replaced key for key; its UNet keeps in_channels=8.
    return build_pipeline_folder(root / name, "tiny", overrides=overrides)


def make_batch(batch_size: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed host batch as our loader yields it: uint8 images and token ids."""
    from ip2p_jax.models.tokenizer import CLIPTokenizer

    rng = np.random.default_rng(seed)
    shape = (batch_size, resolution, resolution, 3)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return {
        "input_image": rng.integers(0, 256, shape, np.uint8),
        "edited_image": rng.integers(0, 256, shape, np.uint8),
        "input_ids": CLIPTokenizer.bundled()(prompts),
    }


def _time_rounds(step, rounds: int, steps: int) -> list[float]:
    """Mean seconds per step of each round; `step()` must block on its own result."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return times


def job_ours(config, folder: Path, batch: dict, rounds: int, steps: int) -> dict:
    import jax

    from ip2p_jax.runtime.mesh import make_mesh
    from ip2p_jax.train.config import ModelConfig
    from ip2p_jax.train.models import load_models
    from ip2p_jax.train.sharding import global_batch
    from ip2p_jax.train.step import host_metrics, make_trainer

    start = time.perf_counter()
    models = load_models(ModelConfig(init_from=str(folder)), config.seed)
    mesh = make_mesh(config.fsdp)
    trainer = make_trainer(config, models, mesh)
    state = trainer.init_state()  # takes the loaded weights over: no host copy stays
    device_batch = global_batch(batch, mesh)
    jax.block_until_ready((state, device_batch))
    load_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = trainer.step(holder["state"], device_batch)
        holder["metrics"] = metrics

    start = time.perf_counter()
    step()
    jax.block_until_ready(holder["metrics"])
    first_s = time.perf_counter() - start

    def blocking_step():
        step()
        jax.block_until_ready(holder["metrics"])

    times = _time_rounds(blocking_step, rounds, steps)
    return {
        "load_s": load_s,
        "first_s": first_s,
        "round_s": times,
        "metrics": host_metrics(holder["metrics"]),
        "threads": len(os.sched_getaffinity(0)),
        "backend": f"jax {jax.__version__} {jax.default_backend()} x{jax.device_count()}",
    }


def job_torch(config, folder: Path, batch: dict, rounds: int, steps: int, threads: int = 0) -> dict:
    import torch

    from ip2p_jax.testing.parity import TorchTrainStep

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    reference = TorchTrainStep.from_config(folder, config)
    load_s = time.perf_counter() - start
    holder = {}

    def step():  # returns python floats: synchronous, as the script's loss.item()
        holder["metrics"] = reference(batch)

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    times = _time_rounds(step, rounds, steps)
    return {
        "load_s": load_s,
        "first_s": first_s,
        "round_s": times,
        "metrics": holder["metrics"],
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "backend": f"torch {torch.__version__}",
    }


def run_job(spec: dict) -> None:
    """In the child process: one side of one case; prints a JSON line."""
    import resource

    try:  # if anything is OOM-killed, let it be this benchmark, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    config = case_config(spec["case"])
    batch = make_batch(config.batch_size, config.data.resolution)
    args = (config, Path(spec["folder"]), batch, spec["rounds"], spec["steps"])
    if spec["who"] == "ours":
        result = job_ours(*args)
    else:
        result = job_torch(*args, threads=spec.get("torch_threads", 0))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["loadavg"] = os.getloadavg()
    print(json.dumps(result), flush=True)


def measure(spec: dict) -> dict:
    """One job in a fresh process -> its result, or {"error": why}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    process = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if process.returncode == -9:
        return {"error": "killed by SIGKILL: out of memory (see dmesg)"}
    if process.returncode:
        tail = process.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {process.returncode}: " + " | ".join(tail)}
    return json.loads(process.stdout.strip().splitlines()[-1])


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def unet_gb(folder: Path) -> float:
    return (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 2**30


# Peak RSS per side as (multiple of the UNet's fp32 size, GB more), from sd15 (UNet 3.2 GiB)
# on this 24 GB machine. torch: weights, grads, AdamW's two moments, EMA (5x) + encoders,
# activations, libraries: 17.8 GB. Ours: the state (4x), the gradients and one leaf of
# optimizer temporaries (update_leafwise), encoders, libraries: 20.7 GB measured (21.9 GB
# before init_state stopped keeping the frozen encoders' host copies); the guard keeps the
# older, larger figure as its margin.
MEMORY_MODEL = {"torch": (5.0, 1.8), "ours": (6.9, 0.0)}


def guarded(case: str, folder: Path, who: str, force: bool) -> dict | None:
    """For sd15: a skip result when this side will not fit in the memory available now."""
    if case != "sd15" or force:
        return None
    scale, extra = MEMORY_MODEL[who]
    needed, available = scale * unet_gb(folder) + extra, available_gb()
    if available >= needed:
        return None
    return {
        "error": f"skipped: needs ~{needed:.1f} GB, {available:.1f} GB available "
        "(--force to try anyway; if it runs out, the kernel kills this job, not a neighbour)"
    }


def _describe(who: str, result: dict) -> str:
    if "error" in result:
        return f"  {who}: {result['error']}"
    rounds = ", ".join(f"{t:.3f}" for t in result["round_s"])
    load = "/".join(f"{v:.1f}" for v in result["loadavg"])
    return (
        f"  {who}: load {result['load_s']:.1f} s, first step {result['first_s']:.2f} s, "
        f"rounds s/step [{rounds}], {result['backend']}, {result['threads']} threads, "
        f"loadavg at the end {load}, metrics "
        + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result["metrics"].items()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    parser.add_argument("--steps", type=int, default=0, help="steps per round (0: per case)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch intra-op thread counts to run, one torch job each (0: torch's default)",
    )
    parser.add_argument(
        "--force", action="store_true", help="run sd15 even where memory looks too small"
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        run_job(json.loads(args.job))
        return

    print(f"{os.cpu_count()} CPUs, loadavg {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for name in args.cases:
            case = CASES[name]
            folder = build_folder(name, Path(tmp))
            steps = args.steps or case.steps
            spec = {"case": name, "folder": str(folder), "rounds": args.rounds, "steps": steps}
            print(f"{name}: {args.rounds} rounds x {steps} steps per job ...", flush=True)
            ours = guarded(name, folder, "ours", args.force) or measure({**spec, "who": "ours"})
            print(_describe("ours", ours), flush=True)
            for threads in args.torch_threads:
                theirs = guarded(name, folder, "torch", args.force) or measure(
                    {**spec, "who": "torch", "torch_threads": threads}
                )
                print(_describe(f"torch ({threads or 'default'} threads)", theirs), flush=True)
                rows.append((case, threads, ours, theirs))
    print_table(rows)


def _rss(result: dict) -> str:
    return f"{result['peak_rss_gb']:.2f}GB"


def _cell(result: dict, value, fmt: str) -> str:
    return "-" if "error" in result else format(value(result), fmt)


def print_table(rows) -> None:
    for _, _, *results in rows:
        for result in results:
            if "round_s" in result:
                result["step_s"] = statistics.median(result["round_s"])
    header = (
        f"{'case':<38} {'torch threads':>13} {'ours s/step':>11} {'torch s/step':>12} "
        f"{'ours/torch':>10} {'ours steps/s':>12} {'torch steps/s':>13} "
        f"{'ours compile s':>14} {'RSS ours':>8} {'RSS torch':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    for case, threads, ours, theirs in rows:
        ratio = "-"
        if "error" not in ours and "error" not in theirs:
            ratio = f"{ours['step_s'] / theirs['step_s']:.2f}"
        torch_threads = "-" if "error" in theirs else f"{theirs['threads']}"
        if not threads and torch_threads != "-":
            torch_threads += " (default)"
        print(
            f"{case.description:<38} {torch_threads:>13} "
            f"{_cell(ours, lambda r: r['step_s'], '.3f'):>11} "
            f"{_cell(theirs, lambda r: r['step_s'], '.3f'):>12} {ratio:>10} "
            f"{_cell(ours, lambda r: 1 / r['step_s'], '.2f'):>12} "
            f"{_cell(theirs, lambda r: 1 / r['step_s'], '.2f'):>13} "
            f"{_cell(ours, lambda r: r['first_s'] - r['step_s'], '.1f'):>14} "
            f"{_cell(ours, _rss, ''):>8} {_cell(theirs, _rss, ''):>9}"
        )
    xla = next((ours for _, _, ours, _ in rows if "error" not in ours), None)
    if xla:
        print(f"ours: XLA:CPU on {xla['threads']} cores (its default: all of them)")
    interop = next((t for _, _, _, t in rows if "error" not in t), None)
    if interop:
        print(f"torch: {interop['interop_threads']} inter-op threads")
    print(
        "s/step: median over the rounds of each round's mean step time; ours/torch < 1: "
        "ours is faster; compile s: our first step less a steady one"
    )


if __name__ == "__main__":
    main()
