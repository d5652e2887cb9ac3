#!/usr/bin/env bash
# Train the paper's recipe on one host with several GPUs: one process drives all of them
# (the mesh's 'data' axis spans the GPUs; no --distributed needed).
#
#   SD15=/path/to/stable-diffusion-v1-5 DATA=data/ip2p bash scripts/launch_multi_gpu.sh
#
# 8 x 80 GB: 1024 = 32 per GPU x 8 GPUs x grad_accum 4 (configs/sd15.py). With fewer or
# smaller GPUs raise grad_accum (1024 / (GPUs x per-GPU batch)) or add --config.fsdp=2.
# Several hosts under SLURM: `srun ip2p train ... --distributed` (JAX reads SLURM's env).
set -euo pipefail
: "${SD15:?set SD15 to a Stable Diffusion 1.5 folder or hub id}" "${DATA:?set DATA}"
WORKDIR=${WORKDIR:-runs/sd15}
GRAD_ACCUM=${GRAD_ACCUM:-4}

make setup
.venv/bin/pip install --quiet 'jax[cuda12]'
# XLA may take all GPU memory up front; leave room for the data workers' pinned buffers.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
.venv/bin/ip2p train --config configs/sd15.py --workdir "$WORKDIR" --resume \
  --config.model.init_from="$SD15" --config.data.path="$DATA" \
  --config.grad_accum="$GRAD_ACCUM"
