#!/usr/bin/env bash
# The project's CUDA checks on a lent GPU machine, in at most 8 minutes: figures and pass/fail
# in benchmarks/results/gpu_check.json (or $OUT/gpu_check.json when the device tool sets $OUT).
# Run from the repository root: bash benchmarks/gpu_check.sh (extra arguments go to
# benchmarks/gpu_check.py). The script's sections share a 440 s budget, each with its own cap,
# and the JSON is rewritten after every item, so the time limit below keeps what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}/gpu_check.json"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout --kill-after=10 470 python3 benchmarks/gpu_check.py --out "$out" "$@"
status=$?
echo "gpu_check.py exit status $status (124: stopped by the time limit); results: $out"
exit $status
