"""Keep OpenCV, FFmpeg and libjpeg off stderr: sources count damaged frames and report lost streams themselves.

Importing this module (sources and the video writer do) silences OpenCV's own log (``[ WARN:0@...]``
lines) and FFmpeg's (``[mjpeg @ 0x...]``, ``[http @ 0x...]``), unless the user set
``OPENCV_LOG_LEVEL`` or ``OPENCV_FFMPEG_LOGLEVEL``. libjpeg, which ``cv2.imread`` uses, writes its
warnings (``Corrupt JPEG data: ...``) straight to file descriptor 2; ``libjpeg_quiet()`` sends them
to /dev/null around a call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import cv2

# OpenCV reads this when it first uses FFmpeg (the first VideoCapture or VideoWriter): -8 is AV_LOG_QUIET.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
if "OPENCV_LOG_LEVEL" not in os.environ:
    if hasattr(cv2.utils, "logging"):  # OpenCV 5
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    elif hasattr(cv2, "setLogLevel"):  # OpenCV 4 (what Triton's python models run with: numpy < 2)
        cv2.setLogLevel(0)  # LOG_LEVEL_SILENT

_fd2 = threading.Lock()  # one redirection of file descriptor 2 at a time


@contextlib.contextmanager
def libjpeg_quiet() -> Iterator[None]:
    """While the block runs, what C code writes to stderr goes to /dev/null.

    The redirection is process-wide: a Python thread writing to stderr at that moment (a progress
    bar redraw) loses that write, so keep the block to one decode.
    """
    with _fd2:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
