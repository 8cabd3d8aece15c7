#!/usr/bin/env bash
# The GPU check on a machine without a network: install the wheels it is handed, then run
# benchmarks/gpu_check.py within its 8-minute budget (the JSON goes to benchmarks/results/).
#
# Usage: benchmarks/gpu_check.sh [WHEELS_DIR] [gpu_check.py arguments, e.g. --dry-run]
#
# WHEELS_DIR (default .whl) holds wheels of what the machine lacks among the library's imports
# (diffusers, accelerate, safetensors, filelock, tabulate, ...; torch is usually there). They are
# installed with --no-index into a folder of their own, never into the system's Python; the
# library itself is read from this checkout (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
[ $# -gt 0 ] && shift
SITE="${TMPDIR:-/tmp}/baddiff-gpu-check-site"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no wheels in $WHEELS; using what this Python has"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, diffusers, accelerate, baddiff_core.benchmark" || {
  echo "gpu_check.sh: torch, diffusers, accelerate and the library's other imports must load; hand their wheels in $WHEELS" >&2
  exit 2
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec timeout 480 python3 benchmarks/gpu_check.py "$@"
