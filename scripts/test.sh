#!/usr/bin/env bash
# Static checks and the test suite (expects scripts/setup.sh to have run).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
