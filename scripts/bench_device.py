"""The lent GPU's benchmark, one run: editing and training, ours against diffusers / torch on
the same random-weight SD-1.5 InstructPix2Pix folder, each side in its own process.

    python3 scripts/bench_device.py          # on a GPU (budget: 480 s; --budget)
    python3 scripts/bench_device.py --cpu    # the same code at tiny size on the CPU (~60 s)

scripts/device_check.sh runs it after the GPU tests. Parts, in this order; a part starts only
while the budget leaves it room, and each has a time limit:

- edit, ours: ``EditPipeline.from_pretrained(folder, dtype="bfloat16")``, 512 px, 50
  Euler-ancestral steps, s_T 7.5, s_I 1.5, batch 1 then 8, through ``pipe.edit`` (PIL in
  and out).
- edit, diffusers: ``StableDiffusionInstructPix2PixPipeline`` in torch float16, same call.
- train, ours: the project's train step (train.step.make_trainer) at 256 px, batch 32,
  ``compute_dtype="bfloat16"`` (fp32 master weights), compiled ahead of time. MFU = its XLA
  FLOP count (``compiled.cost_analysis()``) / step time / the bf16 matmul peak measured first
  in the same process (an 8192^3 ``jnp.matmul`` in a loop).
- train, torch: the step of diffusers' train_instruct_pix2pix.py with mixed_precision="bf16":
  frozen VAE and text encoder in bf16, the UNet's fp32 weights under bf16 autocast
  (``testing.parity.TorchTrainStep``), backward, clipping, AdamW, EMA. Its MFU counts
  our step's FLOPs (the same work) against the same peak.
- edit, diffusers with ``torch.compile`` on the UNet (--no-torch-compile leaves it out; it is
  last, and stopped when the budget runs out, keeping the batches it finished).

Each process prints its rows as they come, so a part stopped at its limit keeps what it
measured. Edits: the first call (compilation included) and the median of the steady calls
after it; compile s = first - steady. Peak memory: JAX's ``peak_bytes_in_use`` (batches run
in ascending order in one process, so each batch's figure is its own peak), torch's
``max_memory_allocated`` reset per batch; None on the CPU. The persistent XLA compilation
cache is off, so compile times are real. A table goes to stdout, the numbers as JSON to
--json (default: $OUT/device_check.json when $OUT is set).

--cpu: the "tiny" preset, edits at 32 px, 2 steps, batch 1; training at 32 px, batch 2; float32
throughout (bf16 only slows a CPU down); no torch.compile unless --torch-compile.
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

ROOT = Path(__file__).resolve().parents[1]
SD15_FOLDER = Path("/tmp/ip2p-sd15")  # shared with bench_edit.py / bench_train.py
INSTRUCTION = "make it snowy"
RESULT = "@@bench "  # the prefix of a job's result lines on its stdout


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str
    edit_resolution: int
    edit_steps: int
    edit_batches: tuple[int, ...]
    edit_repeats: int  # steady calls after the first
    train_resolution: int
    train_batch: int
    train_steps: int  # timed steps after the first
    matmul_size: int
    ours_dtype: str = "bfloat16"
    torch_edit_dtype: str = "float16"
    torch_train_dtype: str = "bfloat16"


GPU = Sizes("sd15", 512, 50, (1, 8), 2, 256, 32, 10, 8192)
CPU = Sizes("tiny", 32, 2, (1,), 1, 32, 2, 2, 256, "float32", "float32", "float32")


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    job: str
    label: str
    min_s: int  # seconds it needs to start at all (GPU; the CPU's parts are short)
    cap_s: int  # the most it may take
    optional: bool = False  # stopped at its limit: skipped, not failed


PARTS = (
    Part("edit_ours", "edit_ours", "ours (JAX)", 90, 220),
    Part("edit_diffusers", "edit_diffusers", "diffusers", 45, 120),
    Part("train_ours", "train_ours", "ours (JAX)", 90, 200),
    Part("train_torch", "train_torch", "torch (diffusers' script)", 45, 120),
    Part("edit_diffusers_compiled", "edit_diffusers", "diffusers + torch.compile", 90, 300, True),
)


# -- the jobs (each in its own process) --------------------------------------------------------


def emit(kind: str, **fields) -> None:
    print(RESULT + json.dumps({"kind": kind, **fields}), flush=True)


def input_image(side: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8))


def jax_peak_gb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**30 if stats else None


def jax_env() -> dict:
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
    }


def torch_env(torch, device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": name}


def torch_device(torch, spec: dict):
    return torch.device("cpu" if spec["cpu"] else "cuda")


def torch_peak_gb(torch, device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def timed_calls(call, repeats: int, sync=lambda: None) -> dict:
    """The first call and `repeats` steady calls, seconds each."""
    times = []
    for seed in range(1 + repeats):
        start = time.perf_counter()
        call(seed)
        sync()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times[1:])
    return {"first_s": times[0], "steady_s": steady, "steady_calls_s": times[1:]}


def job_build(spec: dict) -> None:
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    folder = Path(spec["folder"])
    if not (folder / "model_index.json").is_file():
        start = time.perf_counter()
        build_pipeline_folder(folder, spec["sizes"]["preset"])
        emit("build", seconds=time.perf_counter() - start)


def job_edit_ours(spec: dict) -> None:
    from ip2p_jax.pipelines.edit import EditPipeline

    sizes = Sizes(**spec["sizes"])
    side, steps = sizes.edit_resolution, sizes.edit_steps
    image = input_image(side)
    start = time.perf_counter()
    pipe = EditPipeline.from_pretrained(spec["folder"], dtype=sizes.ours_dtype)
    emit("env", load_s=time.perf_counter() - start, **jax_env())
    for batch in sizes.edit_batches:

        def call(seed, batch=batch):
            images = [image] * batch
            pipe.edit(
                images,
                [INSTRUCTION] * batch,
                steps=steps,
                seed=seed,
                resolution=side,
                progress=False,
            )

        row = timed_calls(call, sizes.edit_repeats)  # PIL out: the last call has finished
        emit("edit", batch=batch, dtype=sizes.ours_dtype, peak_gb=jax_peak_gb(), **row)


def job_edit_diffusers(spec: dict) -> None:
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    sizes = Sizes(**spec["sizes"])
    device = torch_device(torch, spec)
    side, steps = sizes.edit_resolution, sizes.edit_steps
    image = input_image(side)
    start = time.perf_counter()
    dtype = getattr(torch, sizes.torch_edit_dtype)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(spec["folder"], dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if spec.get("compile"):
        pipe.unet = torch.compile(pipe.unet)
    emit("env", load_s=time.perf_counter() - start, **torch_env(torch, device))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for batch in sizes.edit_batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def call(seed, batch=batch):
            generator = torch.Generator(device).manual_seed(seed)
            with torch.no_grad():
                pipe(
                    [INSTRUCTION] * batch,
                    image=[image] * batch,
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    image_guidance_scale=1.5,
                    generator=generator,
                )

        row = timed_calls(call, sizes.edit_repeats, sync)
        emit(
            "edit",
            batch=batch,
            dtype=sizes.torch_edit_dtype,
            peak_gb=torch_peak_gb(torch, device),
            **row,
        )


def matmul_peak_tflops(size: int, dtype: str, rounds: int = 5, per_round: int = 10) -> float:
    """This device's matmul rate: a size^3 jnp.matmul on random data, median of rounds."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(k, (size, size), dtype) for k in jax.random.split(jax.random.key(0)))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            out = matmul(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / per_round)
    return 2 * size**3 / statistics.median(times) / 1e12


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def job_train_ours(spec: dict) -> None:
    import jax
    from bench_train import make_batch

    from ip2p_jax.runtime.mesh import make_mesh
    from ip2p_jax.train.config import DataConfig, ModelConfig, TrainConfig
    from ip2p_jax.train.models import load_models
    from ip2p_jax.train.sharding import global_batch
    from ip2p_jax.train.step import host_metrics, make_trainer

    sizes = Sizes(**spec["sizes"])
    peak = matmul_peak_tflops(sizes.matmul_size, sizes.ours_dtype)
    emit("peak", tflops=peak, size=sizes.matmul_size, dtype=sizes.ours_dtype, **jax_env())
    config = TrainConfig(
        model=ModelConfig(init_from=spec["folder"]),
        data=DataConfig(resolution=sizes.train_resolution),
        batch_size=sizes.train_batch,
        compute_dtype=sizes.ours_dtype,
    )
    start = time.perf_counter()
    models = load_models(config.model, config.seed)
    mesh = make_mesh(config.fsdp)
    trainer = make_trainer(config, models, mesh)
    state = trainer.init_state()
    batch = global_batch(make_batch(sizes.train_batch, sizes.train_resolution), mesh)
    jax.block_until_ready((state, batch))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = trainer.step_program().lower(state, trainer.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    flops = xla_flops(compiled)
    start = time.perf_counter()
    state, metrics = compiled(state, trainer.frozen, batch)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(sizes.train_steps):
        state, metrics = compiled(state, trainer.frozen, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / sizes.train_steps
    emit(
        "train",
        dtype=sizes.ours_dtype,
        load_s=load_s,
        compile_s=compile_s,
        first_s=first_s,
        step_s=step_s,
        flops=flops,
        peak_gb=jax_peak_gb(),
        metrics=host_metrics(metrics),
    )


def job_train_torch(spec: dict) -> None:
    import torch
    from bench_train import make_batch

    from ip2p_jax.testing.parity import TorchTrainStep

    sizes = Sizes(**spec["sizes"])
    device = torch_device(torch, spec)
    start = time.perf_counter()
    # The step of diffusers' train_instruct_pix2pix.py, with its mixed precision.
    reference = TorchTrainStep(spec["folder"], device=device.type, dtype=sizes.torch_train_dtype)
    host = make_batch(sizes.train_batch, sizes.train_resolution)
    emit("env", load_s=time.perf_counter() - start, **torch_env(torch, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    reference(host)  # returns floats: waits for the step
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(sizes.train_steps):
        metrics = reference(host)
    step_s = (time.perf_counter() - start) / sizes.train_steps
    mixed = sizes.torch_train_dtype != "float32"
    emit(
        "train",
        dtype=sizes.torch_train_dtype + (" autocast" if mixed else ""),
        first_s=first_s,
        step_s=step_s,
        peak_gb=torch_peak_gb(torch, device),
        metrics={"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]},
    )


JOBS = {
    "build": job_build,
    "edit_ours": job_edit_ours,
    "edit_diffusers": job_edit_diffusers,
    "train_ours": job_train_ours,
    "train_torch": job_train_torch,
}


# -- the parent: runs the jobs, prints the table, writes the JSON ---------------------------


def job_env(cpu: bool) -> dict:
    env = dict(os.environ)
    if cpu:  # tiny models: XLA's LLVM optimisations cost more compile time than they save
        env["JAX_PLATFORMS"] = "cpu"
        flags = env.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Compile times must be real: no persistent XLA cache (ours or the test run's).
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["IP2P_JAX_CACHE"] = "off"
    return env


def stop(process: subprocess.Popen) -> None:
    """Kills a job and whatever it started (torch.compile's workers)."""
    try:
        import psutil

        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
    except Exception:  # psutil missing, or the process already gone
        pass
    process.kill()


def run_job(spec: dict, timeout: float) -> tuple[list[dict], str | None]:
    """One job in a fresh process -> (the result rows it printed, an error or None). Its other
    output passes through (stdout once it ends). It stays in this process group, so a
    `timeout` around this script stops it too."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env=job_env(spec["cpu"]),
    )
    try:
        out, _ = process.communicate(timeout=timeout)
        error = f"exit {process.returncode}" if process.returncode else None
    except subprocess.TimeoutExpired:
        stop(process)
        out, _ = process.communicate()
        error = f"stopped at its time limit ({timeout:.0f} s)"
    rows = []
    for line in out.splitlines():
        if line.startswith(RESULT):
            rows.append(json.loads(line[len(RESULT) :]))
        elif line.strip():
            print(f"  [{spec['job']}] {line}")
    return rows, error


def summarize_edit(rows: list[dict]) -> dict:
    table = {}
    for row in rows:
        if row["kind"] != "edit":
            continue
        batch = row["batch"]
        table[str(batch)] = {
            **{k: v for k, v in row.items() if k not in ("kind", "batch")},
            "s_per_image": row["steady_s"] / batch,
            "images_per_s": batch / row["steady_s"],
            "compile_s": row["first_s"] - row["steady_s"],
        }
    return table


def run_parts(args, sizes: Sizes, folder: Path, start: float) -> dict:
    report: dict = {"edit": {}, "train": {}, "environment": {}, "errors": {}, "skipped": {}}
    deadline = start + args.budget
    wanted = [p for p in PARTS if p.name != "edit_diffusers_compiled" or args.torch_compile]
    for part in wanted:
        left = deadline - time.time()
        needed = part.min_s if not args.cpu else 5
        if left < needed:
            report["skipped"][part.name] = f"{left:.0f} s of the budget left, needs ~{needed} s"
            print(f"{part.name}: skipped ({report['skipped'][part.name]})", flush=True)
            continue
        timeout = left if args.cpu else min(part.cap_s, left)
        spec = {
            "job": part.job,
            "folder": str(folder),
            "sizes": dataclasses.asdict(sizes),
            "compile": part.name == "edit_diffusers_compiled",
            "cpu": args.cpu,
        }
        print(f"{part.name}: running (at most {timeout:.0f} s) ...", flush=True)
        began = time.time()
        rows, error = run_job(spec, timeout)
        print(f"{part.name}: {error or 'done'} in {time.time() - began:.0f} s", flush=True)
        if error and part.optional and error.startswith("stopped"):
            report["skipped"][part.name] = f"{error}, after the batches it shows"
        elif error:
            report["errors"][part.name] = error
        for row in rows:
            fields = {k: v for k, v in row.items() if k != "kind"}
            if row["kind"] in ("env", "peak"):
                report["environment"][part.name] = fields
            if row["kind"] == "peak":
                report["matmul_peak"] = fields
        who = part.name.split("_", 1)[1]
        if part.job.startswith("edit"):
            if edit := summarize_edit(rows):
                report["edit"][who] = edit
        else:
            train = next((r for r in rows if r["kind"] == "train"), None)
            if train:
                report["train"][who] = {k: v for k, v in train.items() if k != "kind"}
    add_train_rates(report, sizes)
    return report


def add_train_rates(report: dict, sizes: Sizes) -> None:
    """images/s of each side, and MFU = our step's XLA FLOPs / step time / matmul peak (the
    torch side does the same work, so it is measured against the same count)."""
    train = report["train"]
    flops = train.get("ours", {}).get("flops")
    peak = report.get("matmul_peak", {}).get("tflops")
    for row in train.values():
        row["images_per_s"] = sizes.train_batch / row["step_s"]
        row["mfu"] = flops / row["step_s"] / (peak * 1e12) if flops and peak else None
        if "compile_s" not in row:
            row["compile_s"] = row["first_s"] - row["step_s"]


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: dict) -> str:
    sizes, lines = report["sizes"], []
    lines.append(
        f"edit: {sizes['preset']} IP2P, {sizes['edit_resolution']} px, {sizes['edit_steps']} "
        "Euler-ancestral steps, s_T 7.5, s_I 1.5 (steady call; compile s = first - steady)"
    )
    header = (
        f"{'who':<27} {'dtype':<9} {'batch':>5} {'s/image':>8} {'images/s':>8} "
        f"{'compile s':>9} {'peak GiB':>8} {'vs diffusers':>12}"
    )
    lines += [header, "-" * len(header)]
    base = report["edit"].get("diffusers", {})
    for part in PARTS:
        if not part.job.startswith("edit"):
            continue
        for batch, row in report["edit"].get(part.name.split("_", 1)[1], {}).items():
            ratio = row["s_per_image"] / base[batch]["s_per_image"] if batch in base else None
            lines.append(
                f"{part.label:<27} {row['dtype']:<9} {batch:>5} {row['s_per_image']:>8.3f} "
                f"{row['images_per_s']:>8.2f} {row['compile_s']:>9.1f} "
                f"{_num(row['peak_gb'], '.2f'):>8} {_num(ratio, '.2f'):>12}"
            )
    lines.append("")
    lines.append(
        f"train: {sizes['preset']} UNet step (VAE + text encode, fwd+bwd, clip, AdamW, EMA), "
        f"{sizes['train_resolution']} px, batch {sizes['train_batch']}"
    )
    header = (
        f"{'who':<27} {'dtype':<18} {'step s':>7} {'images/s':>8} {'compile s':>9} "
        f"{'peak GiB':>8} {'TFLOP/step':>10} {'MFU':>6}"
    )
    lines += [header, "-" * len(header)]
    for part in PARTS:
        row = report["train"].get(part.name.split("_", 1)[1])
        if part.job.startswith("train") and row:
            tflop = row.get("flops") and row["flops"] / 1e12
            lines.append(
                f"{part.label:<27} {row['dtype']:<18} {row['step_s']:>7.3f} "
                f"{row['images_per_s']:>8.1f} {row['compile_s']:>9.1f} "
                f"{_num(row['peak_gb'], '.2f'):>8} {_num(tflop, '.2f'):>10} "
                f"{_num(row['mfu'], '.1%'):>6}"
            )
    if peak := report.get("matmul_peak"):
        lines.append(
            f"matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['size']}^3 "
            f"jnp.matmul on {peak['device']}); MFU = XLA's FLOPs of our compiled step / "
            "step s / peak (cuDNN attention calls count 0 FLOPs there)"
        )
    for name, why in {**report["skipped"], **report["errors"]}.items():
        lines.append(f"{name}: {why}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--folder", type=Path, help="the model folder (built when missing)")
    parser.add_argument("--budget", type=float, default=0, help="seconds (0: 480 GPU, 600 CPU)")
    parser.add_argument("--json", type=Path, help="default: $OUT/device_check.json")
    parser.add_argument("--build-only", action="store_true", help="build the folder, then stop")
    compile_flag = parser.add_mutually_exclusive_group()
    compile_flag.add_argument("--torch-compile", action="store_true", default=None)
    compile_flag.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        spec = json.loads(args.job)
        JOBS[spec["job"]](spec)
        return
    start = time.time()
    sizes = CPU if args.cpu else GPU
    args.budget = args.budget or (600 if args.cpu else 480)
    if args.torch_compile is None:
        args.torch_compile = not args.cpu
    with tempfile.TemporaryDirectory(prefix="bench_device_") as tmp:
        folder = args.folder or (Path(tmp) / "model" if args.cpu else SD15_FOLDER)
        rows, error = run_job(
            {
                "job": "build",
                "folder": str(folder),
                "sizes": dataclasses.asdict(sizes),
                "cpu": args.cpu,
            },
            args.budget,
        )
        if error:
            sys.exit(f"building {sizes.preset} at {folder} failed: {error}")
        for row in rows:
            print(f"built {sizes.preset} at {folder} in {row['seconds']:.0f} s", flush=True)
        if args.build_only:
            return
        report = run_parts(args, sizes, folder, start)
    report = {
        "mode": "cpu" if args.cpu else "gpu",
        "sizes": dataclasses.asdict(sizes),
        **report,
        "seconds": time.time() - start,
    }
    print()
    print(format_report(report), flush=True)
    path = args.json or (
        Path(os.environ["OUT"]) / "device_check.json" if "OUT" in os.environ else None
    )
    if path:
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    sys.exit(1 if report["errors"] else 0)


if __name__ == "__main__":
    main()
