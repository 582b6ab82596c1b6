#!/usr/bin/env bash
# Create .venv and install se-deploy with what its tests and the demo need.
#
#   bash scripts/setup.sh [cpu|cuda|none]      (or SE_DEPLOY_TORCH=cpu|cuda|none)
#
# PyTorch comes first, pinned, because `pip install torch` on Linux x86_64 resolves to a CUDA build
# (a ~530 MB wheel plus ~3 GB of CUDA packages) unless told otherwise:
#   cpu  (default)  torch==2.13.0+cpu: the CPU-only build (~190 MB). Taken from pip's configured wheel
#                   store or indexes when they carry it, else from PyTorch's CPU index
#                   (https://download.pytorch.org/whl/cpu). Enough for export, quantize, check and tests.
#   cuda            torch==2.13.0 from PyPI: the CUDA build, for running .pt checkpoints on an NVIDIA GPU.
#   none            no torch: ONNX Runtime / TensorRT inference only (export, check and the tests need torch).
# A torch already in .venv is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
choice="${1:-${SE_DEPLOY_TORCH:-cpu}}"
case "$choice" in
  cpu | cuda | none) ;;
  *) echo "setup.sh: unknown torch build '$choice' (expected cpu, cuda or none)" >&2; exit 2 ;;
esac
torch_version=2.13.0
cpu_index=https://download.pytorch.org/whl/cpu

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q)
"${pip[@]}" --upgrade pip

if installed="$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  echo "setup: keeping torch $installed already in .venv"
elif [ "$choice" = cpu ]; then
  # The '+cpu' local version only exists as the CPU build, so this can never pull CUDA packages.
  if ! "${pip[@]}" "torch==${torch_version}+cpu" 2>/dev/null; then
    echo "setup: torch ${torch_version}+cpu is not in pip's configured sources; fetching it from ${cpu_index}"
    "${pip[@]}" "torch==${torch_version}+cpu" --index-url "$cpu_index"
  fi
  echo "setup: installed torch ${torch_version}+cpu (CPU-only build)"
elif [ "$choice" = cuda ]; then
  "${pip[@]}" "torch==${torch_version}"
  echo "setup: installed torch ${torch_version} from PyPI (CUDA build)"
else
  echo "setup: no torch (inference on ONNX Runtime / TensorRT only; export, check and the tests need it)"
fi

if [ "$choice" = none ]; then
  "${pip[@]}" -e ".[dev]"
else
  "${pip[@]}" -e ".[export,quantize,dev]"
fi
echo "setup: se-deploy installed in .venv (.venv/bin/se-deploy --help lists the commands)"

# Triton Inference Server for `se-deploy serve` and the tests: se-deploy[triton] (nvidia-pytriton's
# tritonserver, python backend only) in a venv of its own. Triton 2.51's python backend needs numpy < 2
# (with numpy 2 its answers come back empty), while .venv's OpenCV needs numpy 2 (docs/triton.md).
[ -x .venv-triton/bin/python ] || python3 -m venv .venv-triton
.venv-triton/bin/python -m pip install -q --upgrade pip
# The same ONNX Runtime as .venv's: a model served with --cpu then gives the very outputs of a local run.
.venv/bin/python -m pip freeze | grep -i '^onnxruntime' > .venv-triton/constraints.txt || true
.venv-triton/bin/python -m pip install -q -e ".[triton]" -c .venv-triton/constraints.txt
echo "setup: Triton server environment in .venv-triton (se-deploy serve REPO --python-env .venv-triton)"
