"""Shared test fixtures: the files under tests/fixtures, the bundled checkpoint and clip, and a CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures"
REFS = FIXTURES / "refs"
CHECKPOINT = REPO / "se_deploy" / "assets" / "se-yolov5n-shapes.pt"  # the fixture checkpoint is the demo's
CLIP = REPO / "se_deploy" / "assets" / "synth_shapes_60f.mp4"


def ref_input(name: str) -> np.ndarray:
    """One of upstream's reference inputs (N, 3, 320, 320) float32, exactly as upstream fed it.

    Letterboxed images are stored as their uint8 pixels (x / 255 in float32 gives back upstream's
    tensor bit for bit); ``input_rand_seed0`` is ``torch.manual_seed(0); torch.rand(2, 3, 320, 320)``.
    """
    if name == "input_rand_seed0":
        import torch

        torch.manual_seed(0)
        return torch.rand(2, 3, 320, 320).numpy()
    with np.load(REFS / "inputs" / f"{name}.npz") as stored:
        return stored["pixels"].astype(np.float32) / np.float32(255)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_model(fixtures):
    from se_deploy.checkpoint import load_checkpoint

    return load_checkpoint(CHECKPOINT)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900):
    """Run ``python cli.py ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=timeout,
    )


@pytest.fixture(scope="session")
def dynamic_onnx(tmp_path_factory) -> Path:
    """The bundled checkpoint as a dynamic-batch ONNX at 320 px, exported once (the Triton tests serve it)."""
    from se_deploy.export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("dynamic") / "shapes.onnx"
    export_onnx(CHECKPOINT, path, imgsz=320, dynamic=True, check=False)
    return path
