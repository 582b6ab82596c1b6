"""Frame sources: a video file, an image, a folder or glob of images, a camera index, an RTSP/HTTP stream.

``open_source(spec)`` checks the source and returns a ``Source``; iterating ``source.frames()`` yields
``Frame``s in order. Frames that cannot be decoded are skipped and counted (``source.skipped``); a
camera or stream that drops is reopened a few times before the source ends (``source.stop_reason``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from se_deploy.errors import SeDeployError
from se_deploy.inference.preprocess import IMAGE_SUFFIXES, image_paths

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
MAX_FILE_GAP = 30  # consecutive undecodable frames after which a video file is taken to have ended
# A stalled network stream counts as dropped after this long without a frame (FFmpeg backend).
STREAM_TIMEOUTS_MS = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]

# FFmpeg reports every damaged packet on stderr; sources count skipped frames instead.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


@dataclass
class Frame:
    """One decoded BGR frame; ``index`` is its 0-based position in the source (skipped frames leave gaps)."""

    index: int
    image: np.ndarray
    name: str


BufferFn = Callable[[], "np.ndarray | None"]  # hands out a reusable frame buffer, None to stop


class Source:
    """Base class: what every source reports besides its frames."""

    kind = "unknown"

    def __init__(self, name: str):
        self.name = name
        self.fps: float | None = None
        self.size: tuple[int, int] | None = None  # (w, h) when all frames share one size
        self.total: int | None = None  # frame count when known in advance
        self.skipped = 0
        self.stop_reason = "end"
        self.decode_seconds = 0.0  # time spent decoding, for the stage timings

    @property
    def output_stem(self) -> str:
        """A file-name stem for outputs made from this source."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.name).stem) or self.kind

    def frames(self, next_buffer: BufferFn | None = None) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the capture device or file."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageSource(Source):
    """Still images, read one by one; an unreadable image is skipped and counted."""

    kind = "images"

    def __init__(self, spec: str):
        super().__init__(spec)
        self.paths = image_paths(spec)
        self.total = len(self.paths)

    def frames(self, next_buffer: BufferFn | None = None) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            start = time.perf_counter()
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            self.decode_seconds += time.perf_counter() - start
            if image is None:
                self.skipped += 1
                continue
            yield Frame(index, image, str(path))


class CaptureSource(Source):
    """Frames from an OpenCV VideoCapture, decoded into buffers handed out by the caller."""

    def __init__(self, name: str, target, retries: int = 0, retry_delay: float = 1.0):
        super().__init__(name)
        self._target = target
        self.retries = retries
        self.retry_delay = retry_delay
        self.cap = self._open()
        if self.cap is None:
            raise SeDeployError(f"{name}: {self._open_failure}")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else None
        w, h = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.size = (w, h) if w > 0 and h > 0 else None

    _open_failure = "cannot be opened"

    def _open(self):
        if self.kind == "stream":
            cap = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, STREAM_TIMEOUTS_MS)
        else:
            cap = cv2.VideoCapture(self._target)
        if cap is None or not cap.isOpened():
            return None
        return cap

    def _read(self, buffer) -> np.ndarray | None:
        start = time.perf_counter()
        ok, image = self.cap.read(buffer) if buffer is not None else self.cap.read()
        self.decode_seconds += time.perf_counter() - start
        if not ok or image is None or image.ndim != 3:
            return None
        if self.size is None:
            self.size = (image.shape[1], image.shape[0])
        return image

    def _fits(self, image: np.ndarray) -> bool:
        return (image.shape[1], image.shape[0]) == self.size

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class VideoFileSource(CaptureSource):
    """A video file. Undecodable frames are skipped and counted; a long run of them ends the file."""

    kind = "video"
    _open_failure = "cannot be opened as a video (not a video file, damaged, or empty)"

    def __init__(self, path: str):
        if not Path(path).is_file():
            raise SeDeployError(f"{path}: no such file")
        super().__init__(path, path)
        count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.total = count if count > 0 else None  # some containers do not say
        self._position = 0  # frames read so far, decodable or not
        self._trailing = 0  # undecodable frames since the last good one
        self._first = self._next_good(None)  # proves that something decodes; yielded first
        if self._first is None:
            self.close()
            raise SeDeployError(f"{path}: the video has no frames that decode")

    def _next_good(self, buffer) -> Frame | None:
        """The next frame that decodes (into ``buffer`` when given), or None at the end of the file."""
        failures = 0
        while self.cap is not None and failures < MAX_FILE_GAP:
            image = self._read(buffer)
            self._position += 1
            if image is not None and self._fits(image):
                self.skipped += failures  # they were frames, since one decoded after them
                return Frame(self._position - 1, image, self.name)
            failures += 1  # the buffer is kept for the next try
        self._trailing = failures
        return None

    def frames(self, next_buffer: BufferFn | None = None) -> Iterator[Frame]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while True:
            buffer = next_buffer() if next_buffer is not None else None
            if next_buffer is not None and buffer is None:
                self.stop_reason = "stopped"
                return
            frame = self._next_good(buffer)
            if frame is None:
                break
            yield frame
        # Failures at the very end were frames only if the container announced that many.
        decoded_or_skipped = self._position - self._trailing
        self.skipped += max(0, min(self._trailing, (self.total or 0) - decoded_or_skipped))


class LiveSource(CaptureSource):
    """A camera index or a network stream; when it drops, it is reopened up to ``retries`` times."""

    def __init__(self, name: str, target, kind: str, retries: int = 3, retry_delay: float = 1.0):
        self.kind = kind
        super().__init__(name, target, retries, retry_delay)

    @property
    def _open_failure(self) -> str:
        return "cannot open the camera" if self.kind == "camera" else "cannot open the stream"

    @property
    def output_stem(self) -> str:
        if self.kind == "camera":
            return f"camera{self._target}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.split("://", 1)[-1]).strip("_") or "stream"

    def _reconnect(self) -> bool:
        """Reopen after a drop, waiting a little longer each try; False when every try failed."""
        self.close()
        for attempt in range(1, self.retries + 1):
            time.sleep(self.retry_delay * attempt)
            self.cap = self._open()
            if self.cap is not None:
                return True
        self.stop_reason = f"{self.kind} lost (no frames after {self.retries} reconnects)"
        return False

    def frames(self, next_buffer: BufferFn | None = None) -> Iterator[Frame]:
        index, buffer = 0, None
        while self.cap is not None:
            if buffer is None and next_buffer is not None:
                buffer = next_buffer()
                if buffer is None:
                    self.stop_reason = "stopped"
                    return
            image = self._read(buffer)
            if image is None:
                if not self._reconnect():
                    return
                continue
            index += 1
            if not self._fits(image):  # a damaged frame, or a size change after a reconnect
                self.skipped += 1
                continue
            buffer = None
            yield Frame(index - 1, image, self.name)


def open_source(spec: str | int, retries: int = 3, retry_delay: float = 1.0) -> Source:
    """The source ``spec`` names: camera index, stream URL, image folder/glob/file, or video file."""
    spec = str(spec)
    if spec.isdigit():
        return LiveSource(f"camera {spec}", int(spec), "camera", retries, retry_delay)
    if spec.lower().startswith(STREAM_SCHEMES):
        return LiveSource(spec, spec, "stream", retries, retry_delay)
    path = Path(spec)
    if path.is_dir() or any(ch in spec for ch in "*?[") or path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(spec)
    return VideoFileSource(spec)
