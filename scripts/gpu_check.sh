#!/usr/bin/env bash
# GPU checks CI cannot run (under 5 minutes): PyTorch CUDA FP16 vs FP32, ONNX Runtime CUDA EP, and the
# TensorRT path (quantize, build, manifest guard, dynamic batch) when `tensorrt` imports. Prints what it
# verified and what it skipped; exit 1 if a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
exec timeout 300 "$python" scripts/gpu_check.py "$@"
