"""Runners by model: .pt (PyTorch), .onnx (ONNX Runtime), .engine/.plan (TensorRT) files, or a model a Triton
server serves (grpc://HOST:PORT/NAME, http://HOST:PORT/NAME)."""

from __future__ import annotations

from pathlib import Path

from se_deploy.errors import SeDeployError
from se_deploy.runners.base import Runner
from se_deploy.runners.triton_runner import is_model_url

MODEL_SUFFIXES = (".pt", ".onnx", ".engine", ".plan")


def load_runner(path: str | Path, device: str | None = None, *, cfg: str | Path | None = None,
                trust: bool = False) -> Runner:
    """A (not yet activated) runner for a model file, chosen by its suffix, or for the Triton model a URL
    names; ``cfg``/``trust`` are for .pt checkpoints."""
    url = is_model_url(path)
    if (cfg is not None or trust) and (url or Path(path).suffix.lower() != ".pt"):
        raise SeDeployError(f"{path}: --cfg and --trust-checkpoint apply to .pt checkpoints only")
    if url:
        from se_deploy.runners.triton_runner import TritonRunner

        return TritonRunner(path, device=device)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise SeDeployError(f"{path}: unknown model type '{suffix}' (expected {', '.join(MODEL_SUFFIXES)})")
    if not path.is_file():
        raise SeDeployError(f"{path}: is a directory, not a model file" if path.is_dir() else f"{path}: model not found")
    if suffix == ".pt":
        from se_deploy.runners.torch_runner import TorchRunner

        return TorchRunner(path, device=device, cfg=cfg, trust=trust)
    if suffix == ".onnx":
        from se_deploy.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, device=device)
    from se_deploy.runners.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(path, device=device)


__all__ = ["MODEL_SUFFIXES", "Runner", "is_model_url", "load_runner"]
