"""Which model to run when none is named: the newest artifact in engines/, best backend first.

A TensorRT engine when TensorRT is usable here, else an ONNX model, else a checkpoint.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from se_deploy.artifacts import ENGINES_DIR, newest
from se_deploy.errors import SeDeployError

KINDS = (  # (label, patterns), in order of preference
    ("TensorRT engine", ["*.engine", "*.plan"]),
    ("ONNX model", ["*.onnx"]),
    ("checkpoint", ["*.pt"]),
)


def tensorrt_usable() -> bool:
    """TensorRT, cuda-python and a CUDA GPU are all there (probed only where TensorRT is installed)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from se_deploy.tensorrt.engine_manifest import current_environment

    try:
        current_environment()
    except SeDeployError:
        return False
    return True


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    reason: str  # one line: why this file


def select_model(directory: str | Path = ENGINES_DIR, trt_usable: bool | None = None) -> ModelChoice:
    """The newest engine (if TensorRT is usable), else the newest ONNX, else the newest checkpoint."""
    directory = Path(directory)
    passed_over = []
    for label, patterns in KINDS:
        found = newest(directory, patterns)
        if found is None:
            continue
        if label == "TensorRT engine" and not (tensorrt_usable() if trt_usable is None else trt_usable):
            passed_over.append(f"{found.name} skipped: TensorRT is not usable here")
            continue
        note = f" ({'; '.join(passed_over)})" if passed_over else ""
        return ModelChoice(found, f"newest {label} in {directory}/{note}")
    raise SeDeployError(
        f"no --model given and {directory}/ holds no usable .engine, .onnx or .pt "
        "(run `se-deploy export WEIGHTS.pt` first, or pass --model)"
    )


def resolve_model(model: str | Path | None, say=None, directory: str | Path = ENGINES_DIR) -> str | Path:
    """The model a command was given, or else the newest usable artifact in ``directory`` (``say`` tells which)."""
    if model is not None:
        return model
    choice = select_model(directory)
    if say is not None:
        say(f"model: {choice.path} ({choice.reason})")
    return choice.path


def newest_of_each_kind(directory: str | Path = ENGINES_DIR, trt_usable: bool | None = None) -> list[Path]:
    """The newest artifact of every kind that can run here (for benchmarking each backend)."""
    directory = Path(directory)
    found = [newest(directory, patterns) for label, patterns in KINDS]
    if found[0] is not None and not (tensorrt_usable() if trt_usable is None else trt_usable):
        found[0] = None
    if not any(found):
        raise SeDeployError(f"no --model given and {directory}/ holds no usable .engine, .onnx or .pt "
                            "(run `se-deploy export WEIGHTS.pt` first, or pass --model)")
    return [path for path in found if path]
