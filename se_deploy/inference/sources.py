"""Frame sources: a video file, an image, a folder or glob of images, a camera index, an RTSP/HTTP stream.

``open_source(spec)`` checks the source and returns a ``Source``; iterating ``source.frames()`` yields
``Frame``s in order until the source ends or the ``stop`` event given to it is set. Frames that cannot be
decoded are skipped and counted (``source.skipped``). A camera or stream that drops is reopened a few
times, and a reopen that brings no new frame uses up one of them; a video file served over HTTP ends
at its last frame (and resumes where it dropped) rather than being replayed. ``source.stop_reason``
says why the frames ended.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from se_deploy.errors import SeDeployError
from se_deploy.inference.opencv_logging import libjpeg_quiet
from se_deploy.inference.preprocess import IMAGE_SUFFIXES, image_paths

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
MAX_FILE_GAP = 30  # consecutive unusable frames after which a video file has ended, or a stream has dropped
# A stalled network stream counts as dropped after this long without a frame (FFmpeg backend).
STREAM_TIMEOUTS_MS = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]


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

    def frames(self, next_buffer: BufferFn | None = None, stop: threading.Event | None = None) -> Iterator[Frame]:
        """The frames, decoded into buffers from ``next_buffer`` when given, until the end or ``stop`` is set."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the capture device or file."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stopping(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


class ImageSource(Source):
    """Still images, read one by one; an unreadable image is skipped and counted."""

    kind = "images"

    def __init__(self, spec: str):
        super().__init__(spec)
        self.paths = image_paths(spec)
        self.total = len(self.paths)

    def frames(self, next_buffer: BufferFn | None = None, stop: threading.Event | None = None) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            if _stopping(stop):
                self.stop_reason = "stopped"
                return
            start = time.perf_counter()
            with libjpeg_quiet():  # a damaged JPEG that still decodes is used; one that does not is counted
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            self.decode_seconds += time.perf_counter() - start
            if image is None:
                self.skipped += 1
                continue
            yield Frame(index, image, str(path))


class CaptureSource(Source):
    """Frames from an OpenCV VideoCapture, decoded into buffers handed out by the caller.

    One thread reads (the pipeline's decode thread); ``close()`` may come from another while that
    one is blocked in OpenCV, and then leaves the release to the reader, once OpenCV returns.
    """

    _open_failure = "cannot be opened"

    def __init__(self, name: str, target):
        super().__init__(name)
        self._target = target
        self._lock = threading.Lock()  # guards cap, _reading and _closed
        self._reading = False
        self._closed = False
        self.cap = self._first_open()
        if self.cap is None:
            raise SeDeployError(f"{name}: {self._open_failure}")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else None
        w, h = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.size = (w, h) if w > 0 and h > 0 else None

    def _open(self):
        """A new opened capture of the target, or None."""
        try:
            if self.kind == "stream":
                cap = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, STREAM_TIMEOUTS_MS)
            else:
                cap = cv2.VideoCapture(self._target)
        except cv2.error:
            return None
        return cap if cap.isOpened() else None

    def _first_open(self):
        return self._open()

    def _read(self, buffer) -> np.ndarray | None:
        with self._lock:
            cap, self._reading = self.cap, True
        try:
            ok, image = False, None
            if cap is not None:
                start = time.perf_counter()
                ok, image = cap.read(buffer) if buffer is not None else cap.read()
                self.decode_seconds += time.perf_counter() - start
        finally:
            with self._lock:
                self._reading = False
                closed_meanwhile = self._closed
            if closed_meanwhile:
                self._set_capture(None)
        if not ok or image is None or image.ndim != 3:
            return None
        if self.size is None:
            self.size = (image.shape[1], image.shape[0])
        return image

    def _set_capture(self, cap) -> None:
        """Make ``cap`` the capture and release the one before (after ``close()``, release both)."""
        with self._lock:
            released = [self.cap, cap if self._closed else None]
            self.cap = None if self._closed else cap
        for old in released:
            if old is not None:
                old.release()

    def _fits(self, image: np.ndarray) -> bool:
        return (image.shape[1], image.shape[0]) == self.size

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._reading:  # the reading thread releases it when OpenCV returns
                return
        self._set_capture(None)


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

    def frames(self, next_buffer: BufferFn | None = None, stop: threading.Event | None = None) -> Iterator[Frame]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while True:
            buffer = next_buffer() if next_buffer is not None else None
            if _stopping(stop) or (next_buffer is not None and buffer is None):
                self.stop_reason = "stopped"
                return
            frame = self._next_good(buffer)
            if frame is None:
                break
            yield frame
        # Failures at the very end were frames only if the container announced that many.
        decoded_or_skipped = self._position - self._trailing
        self.skipped += max(0, min(self._trailing, (self.total or 0) - decoded_or_skipped))


def _open_in_helper_thread(open_capture: Callable[[], object]):
    """``open_capture()`` run in a helper thread while this one waits, so that Ctrl-C here is not held up
    by an OpenCV open blocked in FFmpeg (up to its 10 s timeout). An abandoned capture is released when
    the helper drops it."""
    opened = []
    helper = threading.Thread(target=lambda: opened.append(open_capture()), name="se-deploy-open", daemon=True)
    helper.start()
    helper.join()  # a signal interrupts this wait; the helper finishes on its own
    return opened[0] if opened else None


class LiveSource(CaptureSource):
    """A camera index or a network stream; when it drops, it is reopened up to ``retries`` times.

    A stream that reports a frame count is a file served over the network: it ends at its last frame,
    and after a drop it resumes at the frame where it stopped instead of starting again.
    """

    def __init__(self, name: str, target, kind: str, retries: int = 3, retry_delay: float = 1.0):
        self.kind = kind
        self.retries = retries
        self.retry_delay = retry_delay
        super().__init__(name, target)
        count = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)  # live streams say 0, -1 or a huge negative number
        self.total = int(count) if 0 < count < 2**31 else None

    @property
    def _open_failure(self) -> str:
        return "cannot open the camera" if self.kind == "camera" else "cannot open the stream"

    @property
    def output_stem(self) -> str:
        if self.kind == "camera":
            return f"camera{self._target}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.split("://", 1)[-1]).strip("_") or "stream"

    def _first_open(self):
        if self.kind == "camera":  # opens at once; some platforms want cameras opened in the main thread
            return self._open()
        return _open_in_helper_thread(self._open)

    def _reopen(self, position: int):
        """A new capture; for a file served over the network, one that continues at frame ``position``."""
        cap = self._open()
        if cap is not None and self.total is not None and position > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, position)
            if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != position:  # cannot seek there: no new frame from it
                cap.release()
                return None
        return cap

    def _at_end(self, position: int) -> bool:
        """Whether a file served over the network has been read to its end (the count may be estimated
        from the duration, one frame high)."""
        return self.total is not None and position >= self.total - 1

    def frames(self, next_buffer: BufferFn | None = None, stop: threading.Event | None = None) -> Iterator[Frame]:
        stop = stop or threading.Event()
        position, buffer = 0, None  # position: frames read so far, usable or not
        reconnects = unusable = 0  # since the last usable frame
        while not stop.is_set():
            if buffer is None and next_buffer is not None:
                buffer = next_buffer()
                if buffer is None:
                    break
            image = self._read(buffer)
            if stop.is_set():
                break
            if image is not None:
                position += 1
                if self._fits(image):
                    reconnects = unusable = 0
                    buffer = None
                    yield Frame(position - 1, image, self.name)
                    continue
                self.skipped += 1  # a damaged frame, or a size change after a reconnect
                unusable += 1
                if unusable < MAX_FILE_GAP:
                    continue
            elif self._at_end(position):
                self.stop_reason = "end"
                return
            if reconnects == self.retries:
                self.stop_reason = f"{self.kind} lost: no new frame after {self.retries} reconnects"
                return
            reconnects, unusable = reconnects + 1, 0
            self._set_capture(None)
            if stop.wait(self.retry_delay * reconnects):
                break
            self._set_capture(self._reopen(position))
        self.stop_reason = "stopped"


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
