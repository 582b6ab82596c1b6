"""The runner interface every backend implements (PyTorch, ONNX Runtime, TensorRT).

A runner loads nothing until activated; after ``activate()`` its metadata (input shape, names,
stride, precision) is known and ``infer`` maps an NCHW float32 batch to the raw
(N, anchors, 5+nc) YOLOv5 output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from se_deploy.errors import SeDeployError


class Runner(ABC):
    """Base class: activation lifecycle, metadata, input validation and static-batch chunking."""

    backend = "unknown"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.is_active = False
        # Filled in by _activate():
        self.input_name = "images"
        self.input_shape: tuple = (None, 3, None, None)  # None marks a dynamic axis
        self.names: dict[int, str] = {}
        self.stride = 32
        self.precision = "fp32"
        self.device = "cpu"

    # lifecycle -----------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        """Release backend resources (default: nothing to release)."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    # metadata ------------------------------------------------------------------------------
    @property
    def imgsz(self) -> tuple[int, int] | None:
        """Fixed (h, w) of the input, or None when any multiple of the stride is accepted."""
        h, w = self.input_shape[2:]
        return (h, w) if h and w else None

    @property
    def static_batch(self) -> int | None:
        """The batch size baked into the model, or None for a dynamic batch."""
        return self.input_shape[0]

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def description(self) -> str:
        return f"{self.backend} {self.precision} on {self.device} ({self.path.name})"

    # inference -----------------------------------------------------------------------------
    def check_input(self, batch: np.ndarray) -> None:
        """Refuse inputs the model cannot take, with one line saying what differs."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise SeDeployError(f"{self.path.name}: expects (N, 3, H, W) input, got shape {tuple(batch.shape)}")
        if self.imgsz and tuple(batch.shape[2:]) != self.imgsz:
            raise SeDeployError(
                f"{self.path.name}: built for {self.imgsz[0]}x{self.imgsz[1]} input, got "
                f"{batch.shape[2]}x{batch.shape[3]} (use --imgsz {self.imgsz[1]} or re-export)"
            )
        if not self.imgsz and (batch.shape[2] % self.stride or batch.shape[3] % self.stride):
            raise SeDeployError(f"{self.path.name}: input sides must be multiples of {self.stride}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Raw predictions (N, anchors, 5+nc) float32 for an (N, 3, H, W) float32 batch."""
        if not self.is_active:
            raise SeDeployError(f"{self.path.name}: runner used before activate()")
        self.check_input(batch)
        size = self.static_batch
        if size is None or len(batch) == size:
            return self._infer(batch)
        outputs = []
        for start in range(0, len(batch), size):  # static batch: run in chunks, zero-pad the last one
            chunk = batch[start : start + size]
            if len(chunk) < size:
                chunk = np.concatenate((chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)))
            outputs.append(self._infer(chunk)[: len(batch) - start])
        return np.concatenate(outputs)
