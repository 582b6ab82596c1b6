"""Runners by model file: .pt (PyTorch), .onnx (ONNX Runtime), .engine/.plan (TensorRT)."""

from __future__ import annotations

from pathlib import Path

from se_deploy.errors import SeDeployError
from se_deploy.runners.base import Runner

MODEL_SUFFIXES = (".pt", ".onnx", ".engine", ".plan")


def load_runner(path: str | Path, device: str | None = None, **options) -> Runner:
    """A (not yet activated) runner for ``path``, chosen by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise SeDeployError(f"{path}: unknown model type '{suffix}' (expected {', '.join(MODEL_SUFFIXES)})")
    if not path.is_file():
        raise SeDeployError(f"{path}: model not found")
    if suffix == ".pt":
        from se_deploy.runners.torch_runner import TorchRunner

        return TorchRunner(path, device=device, **options)
    if suffix == ".onnx":
        from se_deploy.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, device=device, **options)
    from se_deploy.runners.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(path, device=device, **options)


__all__ = ["MODEL_SUFFIXES", "Runner", "load_runner"]
