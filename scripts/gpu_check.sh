#!/usr/bin/env bash
# One call on a lent GPU machine: set up, run the CUDA tests (compile and run) and print the
# device. Usage (from the repository root): bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
make .venv/.installed >/dev/null
.venv/bin/python -c "import tvm; print('tvm cuda device present:', tvm.cuda(0).exist)"
.venv/bin/python -m pytest -q tests/test_cuda_compile.py tests/test_cuda_run.py
