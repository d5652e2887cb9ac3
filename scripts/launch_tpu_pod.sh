#!/usr/bin/env bash
# Train the paper's recipe on a TPU pod slice. Every host runs the same command; with
# --distributed, jax.distributed.initialize() finds the other hosts from the TPU metadata,
# each host reads its own shard of the dataset, and the ('data', 'fsdp') mesh spans all chips.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b SHARED=/mnt/shared bash scripts/launch_tpu_pod.sh
#
# SHARED must be a filesystem every host sees (NFS, a gcsfuse mount): the dataset, the
# starting model and the workdir (orbax writes one checkpoint from all hosts) live there.
# The command is idempotent: after a preemption, run it again; --resume continues from the
# last checkpoint (a SIGTERM on any host makes every host save the same step and exit 0).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${SHARED:?set SHARED}"
CHECKOUT=${CHECKOUT:-ip2p-jax}   # where the repository is cloned on every host
FSDP=${FSDP:-4}                  # chips per FSDP group; 32 chips -> 8 data-parallel groups

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd $CHECKOUT
  make setup
  .venv/bin/pip install --quiet 'jax[tpu]'
  .venv/bin/ip2p train --config configs/sd15.py --workdir $SHARED/runs/sd15 \
    --distributed --resume \
    --config.model.init_from=$SHARED/models/stable-diffusion-v1-5 \
    --config.data.path=$SHARED/data/ip2p \
    --config.grad_accum=1 --config.fsdp=$FSDP
"
