# What the lent GPU machine's one-command scripts share (scripts/device_check.sh,
# scripts/device_train_shapes.sh); sourced, from the repository root, after `set -uo pipefail`.
#
#   device_start SCRIPT ARGS        with $OUT set: runs SCRIPT again, everything it prints
#                                   also going to $OUT/<its name>.log, and exits with its
#                                   status; then PY: $IP2P_PYTHON, else .venv's, else python3
#   device_install_wheels           the wheels in .whl/ (scripts/device_wheels.sh) into
#                                   /tmp/ip2p-site, put on PYTHONPATH (none there: nothing)
#   run NAME SECONDS COMMAND...     COMMAND under a time limit, a failure recorded in FAILED
#   left / limit N                  seconds left of TOTAL (set by the script) / N, at most that

FAILED=()

device_start() {
    local script=$1
    shift
    if [[ -n "${OUT:-}" && -z "${DEVICE_LOGGING:-}" ]]; then
        mkdir -p "$OUT"
        DEVICE_LOGGING=1 bash "$script" "$@" 2>&1 | tee "$OUT/$(basename "$script" .sh).log"
        exit "${PIPESTATUS[0]}"
    fi
    if [[ -n "${IP2P_PYTHON:-}" ]]; then
        PY=$IP2P_PYTHON
    elif [[ -x .venv/bin/python ]]; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
    export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
    export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
}

run() {
    local name=$1 seconds=$2 began=$SECONDS status
    shift 2
    echo "=== $name (at most ${seconds} s)"
    timeout --kill-after=10 "$seconds" "$@"
    status=$?
    if ((status == 124 || status == 137)); then
        echo "=== $name: stopped at its time limit (${seconds} s)"
        FAILED+=("$name")
    elif ((status != 0)); then
        echo "=== $name: FAILED (exit $status) after $((SECONDS - began)) s"
        FAILED+=("$name")
    else
        echo "=== $name: ok in $((SECONDS - began)) s"
    fi
}

device_install_wheels() {
    compgen -G ".whl/*.whl" >/dev/null || return 0
    local site=/tmp/ip2p-site
    run wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
}

left() { local rest=$((TOTAL - SECONDS)); echo $((rest > 1 ? rest : 1)); }
limit() { local rest; rest=$(left); echo $(($1 < rest ? $1 : rest)); }
