"""YOLOv5 pre-processing: letterbox (grey 114 padding), BGR->RGB, /255, NCHW float32.

``letterbox`` is the one-image reference; ``Letterboxer`` does the same into buffers it allocates once,
for the video hot path.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from se_deploy.errors import SeDeployError
from se_deploy.inference.opencv_logging import libjpeg_quiet

PAD_VALUE = 114
IMGSZ_RANGE = (32, 4096)  # input sides in px: one stride at least; past 4096 no YOLOv5 deployment runs
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class LetterboxInfo:
    """How one image was fitted into the network input: scale and padding (left/top, float)."""

    orig_hw: tuple[int, int]
    ratio: float
    pad: tuple[float, float]  # (pad_w, pad_h) added on each side, before rounding


def letterbox_geometry(orig_hw, new_hw, auto=False, stride=32, scaleup=True):
    """Resized size (w, h), border (top, bottom, left, right) and LetterboxInfo for one image shape."""
    h, w = orig_hw
    ratio = min(new_hw[0] / h, new_hw[1] / w)
    if not scaleup:
        ratio = min(ratio, 1.0)
    resized_w, resized_h = int(round(w * ratio)), int(round(h * ratio))
    pad_w, pad_h = new_hw[1] - resized_w, new_hw[0] - resized_h
    if auto:  # smallest padding that keeps both sides a multiple of the stride
        pad_w, pad_h = pad_w % stride, pad_h % stride
    pad_w, pad_h = pad_w / 2, pad_h / 2
    border = (int(round(pad_h - 0.1)), int(round(pad_h + 0.1)), int(round(pad_w - 0.1)), int(round(pad_w + 0.1)))
    return (resized_w, resized_h), border, LetterboxInfo((h, w), ratio, (pad_w, pad_h))


def letterbox(img, new_shape=(640, 640), auto=False, stride=32, scaleup=True, color=PAD_VALUE):
    """Resize keeping aspect ratio and pad to ``new_shape`` (h, w); returns (img, ratio, (pad_w, pad_h))."""
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    size, (top, bottom, left, right), info = letterbox_geometry(img.shape[:2], new_shape, auto, stride, scaleup)
    if (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(color, color, color))
    return img, info.ratio, info.pad


def to_input(img_bgr: np.ndarray) -> np.ndarray:
    """One letterboxed BGR image -> (3, H, W) float32 RGB in [0, 1]."""
    return np.ascontiguousarray(img_bgr[..., ::-1].transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


class Letterboxer:
    """Letterbox frames into a (batch, 3, H, W) float32 buffer: the caller's, or one kept across calls."""

    def __init__(self, imgsz: tuple[int, int], max_batch: int = 1):
        self.imgsz = tuple(imgsz)
        self.max_batch = max_batch
        self.batch: np.ndarray | None = None  # made on the first call without ``out``
        self._canvas = np.full((*self.imgsz, 3), PAD_VALUE, np.uint8)
        self._planes = [np.empty(self.imgsz, np.uint8) for _ in range(3)]  # the canvas split into B, G, R
        self._geometry_key = None
        self._geometry = None

    def _fit(self, frame: np.ndarray):
        key = frame.shape[:2]
        if key != self._geometry_key:  # new frame size: recompute geometry, reset borders
            self._geometry_key = key
            self._geometry = letterbox_geometry(key, self.imgsz)
            self._canvas[:] = PAD_VALUE
        (w, h), (top, _, left, _), info = self._geometry
        inner = self._canvas[top : top + h, left : left + w]
        if (frame.shape[1], frame.shape[0]) == (w, h):
            inner[:] = frame
        else:  # resized straight into the canvas, no intermediate copy
            cv2.resize(frame, (w, h), dst=inner, interpolation=cv2.INTER_LINEAR)
        return info

    def prepare(self, frames: list[np.ndarray],
                out: np.ndarray | None = None) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """Letterbox BGR frames into ``out`` (N, 3, H, W) float32, else the kept buffer; returns it and the infos."""
        if out is None:
            if self.batch is None or len(frames) > len(self.batch):
                self.batch = np.empty((max(len(frames), self.max_batch), 3, *self.imgsz), np.float32)
            out = self.batch[: len(frames)]
        infos = []
        for i, frame in enumerate(frames):
            infos.append(self._fit(frame))
            # contiguous planes divide about 1.5x faster than a strided RGB/CHW view of the canvas
            blue, green, red = self._planes = cv2.split(self._canvas, self._planes)
            for channel, plane in enumerate((red, green, blue)):
                np.divide(plane, np.float32(255), out=out[i, channel], dtype=np.float32)
        return out, infos


def image_paths(source: str | Path) -> list[Path]:
    """Images in a folder, matched by a glob, or a single image path; sorted."""
    source = str(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise SeDeployError(f"{source}: no such file or folder")
    if not files:
        raise SeDeployError(f"{source}: no images found")
    return files


def read_image(path: Path) -> np.ndarray:
    """Read an image as BGR uint8; a file OpenCV cannot decode is a SeDeployError (libjpeg's own
    warnings about a damaged file that still decodes stay off stderr)."""
    with libjpeg_quiet():
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SeDeployError(f"{path}: cannot be read as an image")
    return img
