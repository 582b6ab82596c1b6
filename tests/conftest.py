"""Shared test fixtures: paths into ../shared/fixtures and the loaded fixture checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = Path(os.environ.get("SE_DEPLOY_FIXTURES", REPO.parent / "shared" / "fixtures"))
CHECKPOINT = FIXTURES / "checkpoints" / "se-yolov5n-shapes.pt"
REFS = FIXTURES / "refs"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not CHECKPOINT.is_file():
        pytest.skip(f"fixtures not found at {FIXTURES} (set SE_DEPLOY_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_model(fixtures):
    from se_deploy.checkpoint import load_checkpoint

    return load_checkpoint(CHECKPOINT)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run ``python cli.py ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=900,
    )
