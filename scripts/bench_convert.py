"""Peak memory and time of converting the full SD-1.5 UNet (in_channels 8, fp32, random
weights) into our checkpoint, side by side with diffusers loading the same weights.

    .venv/bin/python scripts/bench_convert.py                 # builds /tmp/ip2p-sd15 if absent
    .venv/bin/python scripts/bench_convert.py --folder DIR    # any diffusers folder

Each measurement runs in a fresh process and reports that process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_PROBE = r"""
import json, resource, sys, time
folder, job, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
if job == "ours":
    from ip2p_jax.weights.model_folder import convert_to_flax
    convert_to_flax(folder, out, components=("unet",))
elif job == "diffusers":
    from diffusers import UNet2DConditionModel
    UNet2DConditionModel.from_pretrained(folder + "/unet")
elif job == "imports-ours":
    import ip2p_jax.weights.model_folder  # noqa: F401  what the process holds before any weights
elif job == "imports-diffusers":
    import diffusers  # noqa: F401
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def measure(folder: Path, job: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE, str(folder), job, str(Path(tmp) / "ckpt")],
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def unet_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        for key in f.keys():
            total += _numel(f.get_slice(key)) * 4
    return total


def _numel(tensor_slice) -> int:
    n = 1
    for side in tensor_slice.get_shape():
        n *= side
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ip2p-sd15"))
    args = parser.parse_args()
    if not (args.folder / "model_index.json").is_file():
        from ip2p_jax.testing.reference_models import build_pipeline_folder

        print(f"building a random SD-1.5 IP2P folder at {args.folder} ...", flush=True)
        build_pipeline_folder(args.folder, "sd15")
    size_gb = unet_bytes(args.folder) / 2**30
    rows = {
        job: measure(args.folder, job)
        for job in ("imports-ours", "ours", "imports-diffusers", "diffusers")
    }
    print(f"SD-1.5 UNet fp32 size: {size_gb:.2f} GiB")
    print(f"{'job':<34} {'seconds':>8} {'peak RSS GiB':>13} {'x fp32 size':>12}")
    names = {
        "imports-ours": "ip2p_jax imports only",
        "ours": "ip2p convert (unet)",
        "imports-diffusers": "diffusers imports only",
        "diffusers": "diffusers from_pretrained (unet)",
    }
    for job, row in rows.items():
        print(
            f"{names[job]:<34} {row['seconds']:>8.1f} {row['peak_rss_gb']:>13.2f} "
            f"{row['peak_rss_gb'] / size_gb:>12.2f}"
        )


if __name__ == "__main__":
    main()
