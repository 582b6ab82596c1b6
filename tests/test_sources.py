"""Frame sources: what each kind of input yields, and how bad or failing input is handled."""

from __future__ import annotations

import http.server
import shutil
import threading

import cv2
import numpy as np
import pytest
from conftest import CLIP, FIXTURES

from se_deploy.errors import SeDeployError
from se_deploy.inference.sources import ImageSource, LiveSource, VideoFileSource, open_source

VAL_IMAGES = FIXTURES / "dataset" / "images" / "val"


def corrupt_copy(src, dst, at=0.3, length=20000):
    """A copy of ``src`` with a run of bytes zeroed: some frames in the middle no longer decode."""
    data = bytearray(src.read_bytes())
    start = int(len(data) * at)
    data[start : start + length] = bytes(length)
    dst.write_bytes(bytes(data))
    return dst


def test_video_file_yields_every_frame_in_order(fixtures):
    with open_source(str(CLIP)) as source:
        assert isinstance(source, VideoFileSource)
        assert (source.total, source.fps, source.size) == (60, 30.0, (640, 480))
        frames = list(source.frames())
    assert [f.index for f in frames] == list(range(60))
    assert all(f.image.shape == (480, 640, 3) and f.name == str(CLIP) for f in frames)
    assert (source.skipped, source.stop_reason) == (0, "end")


def test_video_decodes_into_the_buffers_it_is_given(fixtures):
    buffers = [np.empty((480, 640, 3), np.uint8) for _ in range(2)]
    handed = iter(buffers * 30)
    with open_source(str(CLIP)) as source:
        frames = source.frames(lambda: next(handed))
        assert next(frames).index == 0  # decoded when the file was opened, to prove that it decodes
        for buffer, frame in zip(buffers * 3, frames):
            assert np.shares_memory(frame.image, buffer)


def test_corrupt_frames_are_skipped_and_counted(fixtures, tmp_path):
    damaged = corrupt_copy(CLIP, tmp_path / "damaged.mp4")
    with open_source(str(damaged)) as source:
        frames = list(source.frames())
    assert source.skipped > 0
    assert len(frames) + source.skipped == 60
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)) and indices[-1] == 59  # gaps where frames were lost, none repeated


def test_bad_video_files_raise_one_line_errors(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48)).release()  # no frames
    assert empty.is_file()
    for path, words in [(tmp_path / "missing.mp4", "no such file"), (text, "cannot be opened"), (empty, "")]:
        with pytest.raises(SeDeployError) as err:
            open_source(str(path))
        assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_image_folder_glob_and_file(fixtures, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("val_000001.jpg", "val_000000.jpg"):
        shutil.copy(VAL_IMAGES / name, folder / name)
    (folder / "broken.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("ignored")
    source = open_source(str(folder))
    assert isinstance(source, ImageSource) and source.total == 3
    frames = list(source.frames())
    assert [f.name for f in frames] == [str(folder / "val_000000.jpg"), str(folder / "val_000001.jpg")]
    assert source.skipped == 1  # broken.jpg
    assert len(list(open_source(str(folder / "val_*.jpg")).frames())) == 2
    assert len(list(open_source(str(folder / "val_000001.jpg")).frames())) == 1
    with pytest.raises(SeDeployError, match="no images"):
        open_source(str(folder / "nothing_*.jpg"))


def test_source_kind_is_chosen_from_the_spec(monkeypatch):
    opened = []

    class FakeCapture:
        def __init__(self, target, *args):
            opened.append(target)

        def isOpened(self):
            return False

    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    with pytest.raises(SeDeployError, match="camera"):
        open_source("0")
    with pytest.raises(SeDeployError, match="stream"):
        open_source("rtsp://cam.local/live")
    assert opened == [0, "rtsp://cam.local/live"]


class MjpegCamera:
    """An HTTP MJPEG camera on localhost that sends ``bursts[i]`` frames on the i-th connection, then drops
    the connection (or, with ``stall``, keeps it open and sends nothing more).

    After the last burst it answers 503, like a camera that went away, or with ``hang_after`` it takes
    the connection and never answers. ``garbage`` sends noise where the JPEGs should be.
    """

    def __init__(self, bursts, stall=False, hang_after=False, garbage=False):
        cap = cv2.VideoCapture(str(CLIP))
        self.jpegs = []
        noise = np.random.default_rng(0)
        while len(self.jpegs) < sum(bursts):
            ok, frame = cap.read()
            assert ok
            jpg = cv2.imencode(".jpg", frame)[1].tobytes()
            self.jpegs.append(noise.integers(0, 256, len(jpg), np.uint8).tobytes() if garbage else jpg)
        self.bursts = list(bursts)
        self.connections = 0
        self.closing = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                burst = camera.connections
                camera.connections += 1
                if burst >= len(camera.bursts):
                    if hang_after:
                        camera.closing.wait(30)
                    else:
                        self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                first = sum(camera.bursts[:burst])
                try:
                    for jpg in camera.jpegs[first : first + camera.bursts[burst]]:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                         % (len(jpg), jpg))
                    if stall:
                        self.wfile.flush()
                        camera.closing.wait(30)
                except OSError:  # the client went away
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dropping_camera(fixtures):
    camera = MjpegCamera([20, 10])
    yield camera
    camera.close()


def test_stream_that_drops_is_reopened_then_ends(dropping_camera):
    source = open_source(dropping_camera.url, retries=2, retry_delay=0.05)
    assert isinstance(source, LiveSource) and source.kind == "stream"
    frames = list(source.frames())
    assert len(frames) == 30  # both bursts, across one reconnect
    assert [f.index for f in frames] == list(range(30))
    assert dropping_camera.connections == 4  # the two bursts, then two failed reconnects
    assert "lost" in source.stop_reason and "2 reconnects" in source.stop_reason


def test_stalled_stream_times_out_and_counts_as_dropped(fixtures, monkeypatch):
    from se_deploy.inference import sources

    monkeypatch.setattr(sources, "STREAM_TIMEOUTS_MS", [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 2000,
                                                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, 500])
    camera = MjpegCamera([8], stall=True)  # sends 8 frames, then keeps the connection open, silent
    try:
        source = open_source(camera.url, retries=1, retry_delay=0.05)
        frames = list(source.frames())
    finally:
        camera.close()
    assert len(frames) == 8 and "lost" in source.stop_reason


def test_every_frame_is_read_when_the_container_miscounts(tmp_path):
    path = tmp_path / "clip.mpg"  # MPEG-1 program stream: OpenCV estimates 1 frame for these 10
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mpg1"), 30, (64, 48))
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    with open_source(str(path)) as source:
        frames = list(source.frames())
    assert [f.index for f in frames] == list(range(10)) and source.skipped == 0
