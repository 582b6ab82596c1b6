#!/usr/bin/env bash
# Static checks (Dockerfile, Python 3.10 compatibility) and the test suite (expects scripts/setup.sh to have run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
.venv/bin/python -m pytest "$@"
