#!/usr/bin/env bash
# Create .venv and install se-deploy with everything its tests and the demo need (CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first, pinned, so nothing below pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export,quantize,dev]"
