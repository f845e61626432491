#!/usr/bin/env bash
# The prepared device check (issue 18): on one GPU, offline, inside 8 minutes: what it
# needs checked (nothing downloaded), the environment, the throughput bench for resnet50
# at 224 px in bfloat16 and float32 (MFU), a short pretrain + transfer on generated data,
# results.json + results.md in --out (default benchmarks/results/device_check/).
#
#   benchmarks/device_check.sh                      # the GPU run
#   benchmarks/device_check.sh --dry-run --out DIR  # CPU, tiny sizes: what CI runs
#
# The interpreter: $PYTHON, else this checkout's .venv/bin/python, else python3. The
# stages, their time limits and the results are benchmarks/device_check.py's.
set -u
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then
        python="$repo/.venv/bin/python"
    else
        python="$(command -v python3 || command -v python || true)"
    fi
fi
if [ -z "$python" ] || ! "$python" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
    echo "device_check: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
    exit 3
fi
# The whole check in its own limit too (the driver keeps inside its budget; this is the
# backstop if the driver itself hangs): 8 minutes.
limit="${DEVICE_CHECK_LIMIT_S:-480}"
if command -v timeout >/dev/null; then
    exec timeout --kill-after=10 "$limit" "$python" "$repo/benchmarks/device_check.py" \
        --python "$python" "$@"
fi
exec "$python" "$repo/benchmarks/device_check.py" --python "$python" "$@"
