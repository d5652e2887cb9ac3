"""Edit speed and memory: ours against diffusers' StableDiffusionInstructPix2PixPipeline on the
same random-weight SD-1.5 InstructPix2Pix folder, fp32 on the CPU, in one run.

    .venv/bin/python scripts/bench_edit.py                       # 256 px, 10 steps, batch 1 and 4
    .venv/bin/python scripts/bench_edit.py --batches 1 --steps 4 # quicker

Each job runs in a fresh process (its peak RSS is its own). Both are timed on a second call
(steady state): ours' first call includes compilation (compile seconds are the difference),
diffusers' first call warms oneDNN's kernel caches (0.5-1 s).
Also printed: this CPU's fp32 matmul peak and the UNet's achieved GFLOP/s (XLA's FLOP count of
one UNet call x calls / sampling seconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_JOB = r"""
import json, resource, sys, time
import numpy as np
from PIL import Image
folder, who = sys.argv[1], sys.argv[2]
batch, steps, side = (int(v) for v in sys.argv[3:6])
image_scale = float(sys.argv[6])
rng = np.random.default_rng(0)
image = Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8))
prompts = ["make it snowy"] * batch
result = {}
if who == "diffusers":
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for seed in (0, 1):  # the first call warms oneDNN's kernel caches and the allocator
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompts, image=[image] * batch, num_inference_steps=steps,
                 image_guidance_scale=image_scale, generator=torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - start)
    result["first_seconds"], result["seconds"] = times
else:
    import jax
    from ip2p_jax.runtime import compilation
    from ip2p_jax.pipelines.edit import EditPipeline
    pipe = EditPipeline.from_pretrained(folder)
    times = []
    for seed in (0, 1):
        start = time.perf_counter()
        pipe.edit([image] * batch, prompts, steps=steps, image_scale=image_scale, seed=seed,
                  resolution=side, progress=False)
        times.append(time.perf_counter() - start)
    result["first_seconds"], result["seconds"] = times
    rows = 3 if image_scale != 1.0 else 2
    unet = pipe.unet
    x = jax.ShapeDtypeStruct((rows * batch, side // 8, side // 8, 8), np.float32)
    t = jax.ShapeDtypeStruct((rows * batch,), np.float32)
    c = jax.ShapeDtypeStruct((rows * batch, 77, 768), np.float32)
    apply = lambda p, x, t, c: unet.module.apply({"params": p}, x, t, c)
    cost = compilation.jit(apply).lower(unet.params, x, t, c).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result["unet_flops"] = float(cost["flops"])
result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(result))
"""

_MATMUL = r"""
import json, time
import jax, jax.numpy as jnp
a = jnp.ones((2048, 2048), jnp.float32)
f = jax.jit(lambda a: a @ a)
f(a).block_until_ready()
start = time.perf_counter()
for _ in range(10):
    f(a).block_until_ready()
print(json.dumps({"gflops": 10 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9}))
"""


def run(code: str, *args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ip2p-sd15"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--image-scales", type=float, nargs="+", default=[1.5, 1.0])
    args = parser.parse_args()
    if not (args.folder / "model_index.json").is_file():
        from ip2p_jax.testing.reference_models import build_pipeline_folder

        print(f"building a random SD-1.5 IP2P folder at {args.folder} ...", flush=True)
        build_pipeline_folder(args.folder, "sd15")
    peak = run(_MATMUL)["gflops"]
    print(
        f"SD-1.5 IP2P, {args.resolution} px, {args.steps} steps, fp32, CPU; "
        f"matmul peak {peak:.0f} GFLOP/s"
    )
    header = (
        f"{'s_I':>4} {'batch':>5} {'diffusers s/img':>15} {'ours s/img':>10} {'ratio':>6} "
        f"{'compile s':>9} {'RSS diffusers':>13} {'RSS ours':>8} {'UNet GFLOP/s':>12}"
    )
    print(header)
    for image_scale in args.image_scales:
        for batch in args.batches:
            common = (args.folder, batch, args.steps, args.resolution, image_scale)
            theirs = run(_JOB, common[0], "diffusers", *common[1:])
            ours = run(_JOB, common[0], "ours", *common[1:])
            achieved = ours["unet_flops"] * args.steps / ours["seconds"] / 1e9
            print(
                f"{image_scale:>4g} {batch:>5} {theirs['seconds'] / batch:>15.2f} "
                f"{ours['seconds'] / batch:>10.2f} {ours['seconds'] / theirs['seconds']:>6.2f} "
                f"{ours['first_seconds'] - ours['seconds']:>9.1f} "
                f"{theirs['peak_rss_gb']:>11.1f}GB {ours['peak_rss_gb']:>6.1f}GB "
                f"{achieved:>7.0f} ({achieved / peak:.0%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
