#!/usr/bin/env bash
# The lent GPU's whole check, one command (also `make device-check`):
#
#   bash scripts/device_check.sh          # on the GPU machine, with .whl/ carried (<= 570 s)
#   bash scripts/device_check.sh --cpu    # the same parts at tiny size on this CPU
#
# 1. installs the wheels in .whl/ (scripts/device_wheels.sh fetched them) into /tmp/ip2p-site
#    without an index or dependencies, prints the versions and nvidia-smi;
# 2. builds the random-weight model folder once (SD-1.5; --cpu: the tiny preset);
# 3. runs the GPU tests, `pytest -m gpu tests/gpu` (--cpu: IP2P_DEVICE_CHECK=cpu, tiny);
# 4. runs scripts/bench_device.py on the same folder with the time that is left.
# Each part has a time limit and runs even when an earlier one failed; the exit status is
# non-zero when any part failed. With $OUT set (the device tool's folder) the log, the
# benchmark's JSON and the tests' measured figures are written there: device_check.log,
# device_check.json, gpu_tests.json, gpu_tests.xml.
#
# Time (GPU): DEVICE_CHECK_SECONDS (default 570) in all, so the command ends inside the device
# tool's 600 s; the folder may take FOLDER_SECONDS (180), the tests TESTS_SECONDS (200), the
# benchmark what is left. DEVICE_CHECK_PARTS="tests" or "bench" runs one of the two (default
# both), e.g. the benchmark again with the time the first call left it short of.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=gpu
for arg in "$@"; do
    case "$arg" in
        --cpu) MODE=cpu ;;
        *) echo "usage: $0 [--cpu]" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/device_lib.sh
source scripts/device_lib.sh
# With $OUT: everything printed also goes to $OUT/device_check.log.
device_start scripts/device_check.sh "$@"

if [[ $MODE == cpu ]]; then
    TOTAL=${DEVICE_CHECK_SECONDS:-600}
    FOLDER_SECONDS=${FOLDER_SECONDS:-120}
    TESTS_SECONDS=${TESTS_SECONDS:-300}
    export JAX_PLATFORMS=cpu IP2P_DEVICE_CHECK=cpu
    # Tiny models: XLA:CPU's LLVM optimisations cost more compile time than they save, and
    # torch's OpenMP threads spin against anything else running (one thread each is steady).
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    WORK=$(mktemp -d -t device_check_XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    FOLDER=$WORK/model
else
    TOTAL=${DEVICE_CHECK_SECONDS:-570}
    FOLDER_SECONDS=${FOLDER_SECONDS:-180}
    TESTS_SECONDS=${TESTS_SECONDS:-200}
    FOLDER=${IP2P_DEVICE_FOLDER:-/tmp/ip2p-sd15}
fi
PARTS=${DEVICE_CHECK_PARTS:-tests bench}
BENCH_FLAGS=()
[[ $MODE == cpu ]] && BENCH_FLAGS+=(--cpu)

if [[ $MODE == gpu ]]; then
    device_install_wheels
fi

echo "=== versions ($MODE mode, $PY)"
"$PY" - <<'EOF'
import importlib.metadata as metadata
import os
import platform

print("python", platform.python_version(), platform.machine())
for name in (
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
    "orbax-checkpoint", "torch", "diffusers", "transformers", "huggingface-hub",
    "safetensors", "grain", "array-record", "ftfy", "numpy", "pytest",
):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} -")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import jax

    print("jax backend:", jax.default_backend(), jax.devices())
    import torch

    print("torch sees CUDA:", torch.cuda.is_available())
except Exception as error:  # the parts below fail with their own messages
    print("backend check failed:", repr(error))
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
fi

run folder "$(limit "$FOLDER_SECONDS")" "$PY" scripts/bench_device.py "${BENCH_FLAGS[@]}" \
    --build-only --folder "$FOLDER"

TEST_FILES=()
if [[ -n "${OUT:-}" ]]; then
    export IP2P_DEVICE_CHECK_RESULTS=$OUT/gpu_tests.json
    TEST_FILES=(--junitxml "$OUT/gpu_tests.xml")
fi
export IP2P_DEVICE_FOLDER=$FOLDER
if [[ " $PARTS " == *" tests "* ]]; then
    run tests "$(limit "$TESTS_SECONDS")" "$PY" -m pytest -m gpu \
        tests/gpu -q -p no:cacheprovider -rfEsp --durations=10 "${TEST_FILES[@]}"
fi

# The benchmark ends itself before its limit (--budget), printing what it measured.
if [[ " $PARTS " == *" bench "* ]]; then
    BENCH_SECONDS=$(left)
    run bench "$BENCH_SECONDS" "$PY" scripts/bench_device.py "${BENCH_FLAGS[@]}" \
        --folder "$FOLDER" --budget $((BENCH_SECONDS > 30 ? BENCH_SECONDS - 20 : 10))
fi

if ((${#FAILED[@]})); then
    echo "device check ($MODE): FAILED: ${FAILED[*]} (${SECONDS} s)"
    exit 1
fi
echo "device check ($MODE): all parts passed (${SECONDS} s)"
