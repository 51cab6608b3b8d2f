#!/usr/bin/env bash
# Every measurement only a GPU can make, in one go (under 8 minutes on one GPU): writes
# bench/results/gpu_check.json and, with --markdown FILE, the section for BENCHMARKS.md.
#   scripts/gpu_check.sh --markdown /tmp/gpu_check.md        on a machine with a CUDA GPU (after `make setup`)
#   scripts/gpu_check.sh --dry-run --out /tmp/gpu_check.json  anywhere: CPU sizes, the format only
#   scripts/gpu_check.sh --steps overhead,memory              a subset (overhead, memory, smoke_bf16, smoke_nf4, smoke_vlm_nf4, eval)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
