"""The annotated video: Motion JPEG in AVI (default) or MPEG-4 Part 2 in MP4 (detect.py's format).

Motion JPEG frames are encoded by OpenCV's libjpeg-turbo and handed to FFmpeg's muxer as they are
(OpenCV's raw-video mode), which costs well under half the CPU of FFmpeg's MPEG-4 encoder; with
inference on the CPU that time comes out of inference. Every frame is a key frame, so the file seeks
anywhere and a cut-off file loses nothing before the cut. The price is size: about four times the
mp4v file at the default quality.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from se_deploy.errors import SeDeployError
from se_deploy.inference import opencv_logging  # noqa: F401  FFmpeg quiet before its first use

SUFFIXES = {"mjpeg": ".avi", "mp4v": ".mp4"}  # codec -> container
JPEG_QUALITY = 90  # visually lossless for drawn labels (PSNR ~44 dB on the fixture clip)


def check_codec(codec: str) -> str:
    """``codec`` if it is one we write, else a one-line error."""
    if codec not in SUFFIXES:
        raise SeDeployError(f"--video-codec {codec}: expected one of {', '.join(SUFFIXES)}")
    return codec


class VideoWriter:
    """Writes BGR frames of one size to ``path`` (whose suffix should be ``SUFFIXES[codec]``)."""

    def __init__(self, path: str | Path, codec: str, fps: float, size_wh: tuple[int, int]):
        self.path = Path(path)
        self._jpeg = check_codec(codec) == "mjpeg"
        # Motion JPEG: FFmpeg only muxes the JPEGs we hand it (raw video), each one a key frame
        fourcc, params = ("MJPG", [cv2.VIDEOWRITER_PROP_RAW_VIDEO, 1, cv2.VIDEOWRITER_PROP_KEY_INTERVAL, 1]) \
            if self._jpeg else ("mp4v", [])
        self._writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), fps, size_wh, params)
        if not self._writer.isOpened():
            raise SeDeployError(f"{path}: OpenCV cannot write this video")
        self._jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]

    def write(self, image: np.ndarray) -> None:
        if self._jpeg:
            ok, encoded = cv2.imencode(".jpg", image, self._jpeg_params)
            if not ok:
                raise SeDeployError(f"{self.path}: OpenCV cannot encode a {image.shape} frame as JPEG")
            self._writer.write(encoded.reshape(1, -1))
        else:
            self._writer.write(image)

    def release(self) -> None:
        """Finish the file (writes the index: playable from here on)."""
        self._writer.release()
