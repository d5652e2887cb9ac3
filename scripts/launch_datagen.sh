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
# The instruction LLM is one of:
#   LLM=/path/to/causal-lm                a local transformers model on GPU 0;
#   LLM_URL=http://host:8000/v1 LLM_MODEL=served-name [CONCURRENCY=8]
#                                         an OpenAI-compatible server (vLLM), CONCURRENCY
#                                         batch requests in flight;
#   BACKEND=template                      the rule-based template backend: a smoke test of
#                                         the pipeline, not training data.
# EXAMPLES=examples.jsonl puts your own {input, edit, output} examples in the LLM's few-shot
# prompt; NO_FEW_SHOT=1 sends the bare prompt (an LLM fine-tuned on the format, see
# `ip2p datagen finetune-set`). VAE=/path/to/sd-vae-ft-mse decodes as the original did.
# RAY=1 renders on Ray workers (one per GPU of this host; RAY=auto joins a running cluster)
# instead of one process per GPU.
set -euo pipefail
: "${CAPTIONS:?set CAPTIONS}" "${SD15:?set SD15 to a text-to-image SD folder}" "${CLIP:?set CLIP}"
OUT=${OUT:-datagen_out}
SAMPLES=${SAMPLES:-100}

# Choose the instruction backend before anything runs; never fall back to the template one.
chosen=0
[[ -n "${LLM:-}" ]] && chosen=$((chosen + 1))
[[ -n "${LLM_URL:-}${LLM_MODEL:-}" ]] && chosen=$((chosen + 1))
[[ -n "${BACKEND:-}" ]] && chosen=$((chosen + 1))
if ((chosen != 1)); then
  echo "launch_datagen.sh: set exactly one of: LLM=/path/to/causal-lm (a local model)," \
    "LLM_URL and LLM_MODEL (an OpenAI-compatible server such as vLLM), or BACKEND=template" \
    "(a rule-based smoke test, not training data)" >&2
  exit 2
fi
if [[ -n "${BACKEND:-}" ]]; then
  if [[ "$BACKEND" != template ]]; then
    echo "launch_datagen.sh: BACKEND can only be template; for an LLM set LLM, or LLM_URL" \
      "and LLM_MODEL" >&2
    exit 2
  fi
  if [[ -n "${EXAMPLES:-}${NO_FEW_SHOT:-}" ]]; then
    echo "launch_datagen.sh: EXAMPLES and NO_FEW_SHOT are for an LLM, not BACKEND=template" >&2
    exit 2
  fi
  backend=(--backend template)
elif [[ -n "${LLM:-}" ]]; then
  backend=(--backend transformers --model "$LLM" --device cuda --dtype bfloat16)
else
  : "${LLM_URL:?set LLM_URL (e.g. http://localhost:8000/v1) with LLM_MODEL}"
  : "${LLM_MODEL:?set LLM_MODEL (the name the server serves) with LLM_URL}"
  backend=(--backend openai --base-url "$LLM_URL" --model "$LLM_MODEL"
    --concurrency "${CONCURRENCY:-8}")
fi
[[ -n "${EXAMPLES:-}" ]] && backend+=(--examples "$EXAMPLES")
[[ -n "${NO_FEW_SHOT:-}" ]] && backend+=(--no-few-shot)

GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
.venv/bin/ip2p datagen instructions --captions "$CAPTIONS" --out "$OUT/prompts.jsonl" \
  "${backend[@]}"

pairs=(--prompts "$OUT/prompts.jsonl" --model "$SD15" --clip "$CLIP" --out "$OUT/pairs"
  --samples "$SAMPLES" --device cuda --dtype float16 --pairs-per-call 4)
[[ -n "${VAE:-}" ]] && pairs+=(--vae "$VAE")
if [[ -n "${RAY:-}" ]]; then
  # One Ray worker per GPU of this host (RAY=1) or of a running cluster (RAY=auto), with
  # progress; the dataset is written at the end when every prompt is done.
  [[ "$RAY" == 1 ]] && address=() || address=("$RAY")
  exec .venv/bin/ip2p datagen pairs "${pairs[@]}" --ray "${address[@]}" --dataset "$OUT/data"
fi
pids=()
for ((i = 0; i < GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i .venv/bin/ip2p datagen pairs "${pairs[@]}" \
    --shard "$i" --num-shards "$GPUS" --no-progress > "$OUT/shard-$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "shard $i failed: see $OUT/shard-$i.log" >&2; failed=1; }
done
if ((failed)); then
  echo "rerun this command: finished prompts are skipped, failed ones tried again" >&2
  exit 1
fi
.venv/bin/ip2p datagen import original "$OUT/pairs" --out "$OUT/data"
