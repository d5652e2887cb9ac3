#!/usr/bin/env bash
# Generate InstructPix2Pix training data on one host with several GPUs, from captions to a
# training-ready dataset: one `ip2p datagen pairs` process per GPU (--shard i --num-shards n),
# then one import. Rerun the same command after a crash or preemption: finished prompts are
# skipped. On several hosts, give each host its own shard range (the same PAIRS folder on a
# shared filesystem) and run the last step once, after every shard is done.
#
#   CAPTIONS=captions.txt SD15=/path/to/stable-diffusion-v1-5 CLIP=/path/to/clip-vit-large-patch14 \
#   LLM=/path/to/causal-lm bash scripts/launch_datagen.sh
#
# Without LLM the offline template backend writes the instructions (a smoke test, not data).
set -euo pipefail
: "${CAPTIONS:?set CAPTIONS}" "${SD15:?set SD15 to a text-to-image SD folder}" "${CLIP:?set CLIP}"
OUT=${OUT:-datagen_out}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
SAMPLES=${SAMPLES:-100}

if [[ -n "${LLM:-}" ]]; then
  .venv/bin/ip2p datagen instructions --captions "$CAPTIONS" --out "$OUT/prompts.jsonl" \
    --backend transformers --model "$LLM" --device cuda --dtype bfloat16
else
  .venv/bin/ip2p datagen instructions --captions "$CAPTIONS" --out "$OUT/prompts.jsonl"
fi

for ((i = 0; i < GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i .venv/bin/ip2p datagen pairs --prompts "$OUT/prompts.jsonl" \
    --model "$SD15" --clip "$CLIP" --out "$OUT/pairs" --samples "$SAMPLES" \
    --shard "$i" --num-shards "$GPUS" --device cuda --dtype float16 --pairs-per-call 4 \
    --no-progress > "$OUT/shard-$i.log" 2>&1 &
done
wait
.venv/bin/ip2p datagen import original "$OUT/pairs" --out "$OUT/data"
