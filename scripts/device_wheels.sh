#!/usr/bin/env bash
# Fetches into .whl/ (git-ignored) the wheels the lent GPU machine lacks and ip2p_jax or the
# device check needs, for its Python 3.12 on manylinux x86-64; run here, with network:
#
#   bash scripts/device_wheels.sh && bash scripts/device_check.sh --cpu
#
# That machine (the device tool's KINDS.md) has torch, jax + the CUDA 13 plugin, flax, optax,
# orbax, transformers, huggingface-hub, safetensors, pillow, regex, absl, etils, cloudpickle,
# protobuf, psutil, prometheus-client and pytest, and none of these:
#   diffusers            the PyTorch references (parity tests, benchmark, the model folder)
#   ftfy, wcwidth        ip2p_jax.models.tokenizer (OpenAI's text cleanup)
#   grain, array-record, portpicker
#                        ip2p_jax.data.loader, imported by ip2p_jax.train.step
#   tensorflow-datasets, tensorflow-metadata, googleapis-common-protos, dm-tree,
#   immutabledict, promise, termcolor, toml, wrapt, simplejson, tensorboardx
#                        the dataset and the training run of scripts/device_train_shapes.sh
#                        (what `ip2p datagen shapes` and `ip2p train` import beyond the list
#                        above); promise has no wheel on PyPI, so its pure-Python one is built
# Each is pinned to the version installed in .venv (one version each: two stop the install
# there). scripts/device_check.sh installs them with
#   pip install --no-index --no-deps --target /tmp/ip2p-site .whl/*.whl
# Carry .whl with the device call (the tool's `carry`); the working tree's limit is 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${IP2P_PYTHON:-.venv/bin/python}
DEST=.whl
PACKAGES=(
    diffusers ftfy wcwidth grain array-record portpicker
    tensorflow-datasets tensorflow-metadata googleapis-common-protos dm-tree immutabledict
    termcolor toml wrapt simplejson tensorboardx
)
SDIST_ONLY=(promise)  # pure Python, sources only on PyPI: built into a wheel here
LIMIT_MB=60

pinned() {
    local version
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1")
    echo "$1==$version"
}
specs=()
for name in "${PACKAGES[@]}"; do
    specs+=("$(pinned "$name")")
done
sdists=()
for name in "${SDIST_ONLY[@]}"; do
    sdists+=("$(pinned "$name")")
done

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DEST" "${specs[@]}"
"$PY" -m pip wheel --quiet --no-deps -w "$DEST" "${sdists[@]}"

echo "wheels in $DEST (for CPython 3.12, manylinux x86-64):"
total=0
for wheel in "$DEST"/*.whl; do
    bytes=$(stat -c %s "$wheel")
    total=$((total + bytes))
    awk -v b="$bytes" -v n="$(basename "$wheel")" 'BEGIN { printf "  %8.2f MB  %s\n", b / 1e6, n }'
done
awk -v b="$total" -v l="$LIMIT_MB" 'BEGIN { printf "  %8.2f MB  in all (limit %d MB)\n", b / 1e6, l }'
count=$(find "$DEST" -type f -name '*.whl' | wc -l)
expected=$((${#PACKAGES[@]} + ${#SDIST_ONLY[@]}))
if ((count != expected)); then
    echo "expected $expected wheels, got $count" >&2
    exit 1
fi
if ((total > LIMIT_MB * 1000000)); then
    echo "the wheels pass ${LIMIT_MB} MB" >&2
    exit 1
fi
