"""Runners by model: .pt (PyTorch), .onnx (ONNX Runtime), .engine/.plan (TensorRT) files, or a model a Triton
server serves (grpc://HOST:PORT/NAME, http://HOST:PORT/NAME)."""

from __future__ import annotations

from pathlib import Path

from se_deploy.errors import SeDeployError
from se_deploy.runners.base import Runner
from se_deploy.runners.triton_runner import is_model_url

MODEL_SUFFIXES = (".pt", ".onnx", ".engine", ".plan")


def load_runner(path: str | Path, device: str | None = None, **options) -> Runner:
    """A (not yet activated) runner for ``path``, chosen by its suffix, or for the Triton model a URL names."""
    if is_model_url(path):
        from se_deploy.runners.triton_runner import TritonRunner

        return TritonRunner(path, device=device, **options)
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


__all__ = ["MODEL_SUFFIXES", "Runner", "is_model_url", "load_runner"]
