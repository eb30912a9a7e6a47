#!/usr/bin/env bash
# GPU inference + training throughput in one go (bench/gpu.py: DenseNet121 224 px and the demo
# detector; fp32, AMP, AMP + channels_last; batch 1/8/32), printed as a table with the device
# name and written to var/bench/results/gpu-*.json.
#   bench/gpu.sh               on a CUDA machine
#   bench/gpu.sh --dry-run     anywhere: every code path on CPU at tiny sizes (no figures)
#   bench/gpu.sh --batches 1 8 --iters 50
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=$(command -v python3)
dry_run=0
for arg in "$@"; do
  [[ "$arg" == "--dry-run" ]] && dry_run=1
done
if (( ! dry_run )); then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False). Run it on a" \
         "machine with an NVIDIA GPU and a CUDA build of torch; 'bench/gpu.sh --dry-run'" \
         "checks the script on CPU." >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu.py "$@"
