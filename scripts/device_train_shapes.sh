#!/usr/bin/env bash
# The shapes model trained on the lent GPU, one command (also `make device-train-shapes`):
#
#   bash scripts/device_train_shapes.sh          # on the GPU machine, .whl/ carried (<= 570 s)
#   bash scripts/device_train_shapes.sh --cpu    # the same parts at tiny size on this CPU
#
# 1. installs the wheels in .whl/ (scripts/device_wheels.sh) as scripts/device_check.sh does;
# 2. generates PAIRS shapes-world pairs with one rendering process per core;
# 3. trains configs/shapes_gpu.py on them (latents encoded once on the GPU) for at most
#    TRAIN_SECONDS: at that limit the run gets a SIGTERM, saves the step it is at and stops,
#    so a run cut short still ships (the config also checkpoints about every minute);
# 4. exports the EMA weights (a cut-off run's from its last checkpoint) as a float16 diffusers
#    folder, $OUT/shapes_model;
# 5. scores it with `ip2p eval shapes` on EVAL_NUM validation and EVAL_NUM held-out edits, at
#    the shipped model's sampling settings (20 Euler-ancestral steps, s_T 3, s_I 1.5), and
#    prints both tables.
# With $OUT: the log (device_train_shapes.log), the two scores (eval_validation.json,
# eval_heldout.json), the run's metrics.jsonl and config.json, and the model are written there.
# Extra arguments go to `ip2p train` (e.g. --config.optim.learning_rate=3e-4).
#
# Time (GPU): TOTAL_SECONDS (default 570) in all, inside the device tool's 600 s; training
# gets TRAIN_SECONDS (default 420, compile and latent encoding included) or what is left after
# EVAL_RESERVE (100) seconds kept for the export and the scores.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=gpu
TRAIN_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --cpu) MODE=cpu ;;
        --config.*) TRAIN_ARGS+=("$arg") ;;
        *) echo "usage: $0 [--cpu] [--config.a.b=value ...]" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/device_lib.sh
source scripts/device_lib.sh
device_start scripts/device_train_shapes.sh "$@"

if [[ $MODE == cpu ]]; then
    TOTAL=${TOTAL_SECONDS:-600}
    TRAIN_SECONDS=${TRAIN_SECONDS:-300}
    EVAL_RESERVE=${EVAL_RESERVE:-120}
    PAIRS=${PAIRS:-300}  # over one rendering chunk (256), so two processes render
    EVAL_NUM=${EVAL_NUM:-4}
    EVAL_ARGS=(--steps 2 --batch-size 4)
    WORKERS=2
    export JAX_PLATFORMS=cpu
    # Tiny models: XLA:CPU's LLVM optimisations cost more compile time than they save.
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
    # The recipe's every part at a size this CPU runs in seconds: a 3-step run that saves
    # at step 2 and 3, batch 8, one-layer blocks, a one-layer text encoder, no loader workers
    # (and float32: the backend's compute dtype here, as bfloat16 is on the GPU).
    TRAIN_ARGS=(
        --config.steps=3 --config.checkpoint_every=2 --config.batch_size=8
        --config.optim.warmup_steps=1 --config.optim.decay_steps=1 --config.data.workers=0
        --config.model.unet.block_out_channels=[32,32,32] --config.model.unet.layers_per_block=1
        --config.model.unet.attention_head_dim=2 --config.model.text_encoder.num_hidden_layers=1
        "${TRAIN_ARGS[@]}"
    )
else
    TOTAL=${TOTAL_SECONDS:-570}
    TRAIN_SECONDS=${TRAIN_SECONDS:-420}
    EVAL_RESERVE=${EVAL_RESERVE:-100}
    PAIRS=${PAIRS:-120000}
    EVAL_NUM=${EVAL_NUM:-200}
    EVAL_ARGS=(--steps 20 --batch-size 100)
    WORKERS=$(nproc)
    device_install_wheels
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
    fi
fi
WORK=$(mktemp -d -t shapes_gpu_XXXXXX)
trap 'rm -rf "$WORK"' EXIT
RESULTS=${OUT:-$WORK/out}
mkdir -p "$RESULTS"
RUN=$WORK/run
IP2P=("$PY" -m ip2p_jax)

run data "$(limit 150)" "${IP2P[@]}" datagen shapes --num "$PAIRS" --num-validation 0 \
    --num-heldout 0 --out "$WORK/data" --workers "$WORKERS"

# Training: SIGTERM at the limit to python alone (--foreground: its loader workers must keep
# feeding the step it saves at), SIGKILL a minute later if it has not stopped.
train_limit=$(limit "$TRAIN_SECONDS")
train_limit=$((train_limit > EVAL_RESERVE + 1 ? train_limit - EVAL_RESERVE : 1))
echo "=== train (at most ${train_limit} s)"
began=$SECONDS
timeout --foreground --kill-after=60 "$train_limit" "${IP2P[@]}" train \
    --config configs/shapes_gpu.py --workdir "$RUN" --config.data.path="$WORK/data" \
    "${TRAIN_ARGS[@]}"
status=$?
# The last logged step (0 when the run logged none, or left no metrics.jsonl).
steps=$("$PY" -c "
import sys
from ip2p_jax.train.reporting import read_metrics
rows = read_metrics(sys.argv[1])
print(rows[-1]['step'] if rows else 0)" "$RUN" 2>/dev/null || echo 0)
if ((status == 0)); then
    echo "=== train: ok in $((SECONDS - began)) s (step $steps)"
elif ((status == 124)); then
    echo "=== train: cut off at ${train_limit} s after step $steps; the last checkpoint ships"
else
    echo "=== train: FAILED (exit $status) after $((SECONDS - began)) s (step $steps)"
    FAILED+=(train)
fi
for file in metrics.jsonl config.json; do
    [[ -f $RUN/$file ]] && cp "$RUN/$file" "$RESULTS/"
done

# The EMA weights: the finished run's own export, or a cut-off run's last saved step.
CHECKPOINT=$RUN/model
if [[ ! -d $CHECKPOINT ]]; then
    CHECKPOINT=$WORK/checkpoint
    run export "$(limit 60)" "${IP2P[@]}" export-run "$RUN" "$CHECKPOINT"
fi
run export-float16 "$(limit 60)" "${IP2P[@]}" export "$CHECKPOINT" \
    "$RESULTS/shapes_model" --dtype float16 --overwrite
[[ -d $RESULTS/shapes_model ]] && echo "model folder: $(du -sh "$RESULTS/shapes_model" | cut -f1)"

for split in validation heldout; do
    run "eval-$split" "$(limit 120)" "${IP2P[@]}" eval shapes --model "$RESULTS/shapes_model" \
        --split "$split" --num "$EVAL_NUM" --text-scale 3 --image-scale 1.5 \
        --sampler euler_ancestral "${EVAL_ARGS[@]}" --json "$RESULTS/eval_$split.json"
done

if ((${#FAILED[@]})); then
    echo "shapes training ($MODE): FAILED: ${FAILED[*]} (${SECONDS} s)"
    exit 1
fi
echo "shapes training ($MODE): trained $steps steps, scored, all parts passed (${SECONDS} s)"
