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


def pytest_sessionstart(session):
    """The suite checks se-deploy against upstream YOLOv5's outputs: without them it must not pass."""
    if not CHECKPOINT.is_file():
        raise pytest.UsageError(f"fixtures not found at {FIXTURES}: put shared/ beside the repo or set SE_DEPLOY_FIXTURES")


@pytest.fixture(scope="session")
def fixtures() -> Path:
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
