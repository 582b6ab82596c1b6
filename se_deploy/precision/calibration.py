"""INT8 calibration data: the user's images through exactly the inference pre-processing.

Calibration sets each activation's INT8 range from what the model sees at inference, so the images
go through ``se_deploy.inference.preprocess.Letterboxer`` (letterbox with grey 114 padding, BGR->RGB, /255,
NCHW float32), the same code ``infer`` runs. Images are read lazily, one batch at a time, so a
calibration set of any size costs one batch of memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from se_deploy.errors import SeDeployError
from se_deploy.inference.preprocess import Letterboxer, image_paths, read_image

OnImages = Callable[[int, int], None]  # (images done, total)


def select_images(source: str | Path, size: int) -> list[Path]:
    """Up to ``size`` images from ``source`` (folder, glob or file), spread evenly over its sorted list."""
    if size < 1:
        raise SeDeployError(f"--calib-size {size}: must be at least 1")
    files = image_paths(source)
    if len(files) <= size:
        return files
    picks = np.unique(np.linspace(0, len(files) - 1, size).round().astype(int))
    return [files[i] for i in picks]


class LetterboxCalibrationReader(CalibrationDataReader):
    """ONNX Runtime / ModelOpt calibration reader: batches of letterboxed images, read on demand."""

    def __init__(self, files: list[Path], input_name: str, imgsz: tuple[int, int], batch: int = 1,
                 on_images: OnImages | None = None):
        if len(files) < batch:
            raise SeDeployError(f"the model takes batches of {batch}: give at least {batch} calibration images")
        self.files = files[: len(files) // batch * batch]  # a static batch takes only whole batches
        self.input_name = input_name
        self.batch = batch
        self.on_images = on_images
        self._letterboxer = Letterboxer(tuple(imgsz), max_batch=batch)
        self._next = 0

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, start: int) -> dict[str, np.ndarray]:
        frames = [read_image(p) for p in self.files[start : start + self.batch]]
        batch, _ = self._letterboxer.prepare(frames)
        return {self.input_name: batch.copy()}  # the letterboxer reuses its buffer

    def get_first(self) -> dict[str, np.ndarray]:
        """The first batch, without advancing (ModelOpt probes the graph with it)."""
        return self._load(0)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.files):
            return None
        inputs = self._load(self._next)
        self._next += self.batch
        if self.on_images:
            self.on_images(self._next, len(self.files))
        return inputs

    def rewind(self) -> None:
        self._next = 0
