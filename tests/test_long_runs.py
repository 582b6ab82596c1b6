"""Long runs: streams that never decode, end, or drop mid-file; Ctrl-C and SIGTERM at any moment; two runs
into one folder; decoder noise on stderr."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CHECKPOINT, CLIP, FIXTURES, REPO, run_cli
from test_infer import UPSTREAM_ONNX, no_partial_files, read_jsonl, video_facts
from test_sources import MjpegCamera, corrupt_copy

from se_deploy.errors import SeDeployError
from se_deploy.inference.run_dir import CLAIM_MARKER, claim_run_dir
from se_deploy.inference.sources import open_source
from se_deploy.inference.video_pipeline import InferSettings, run_inference
from se_deploy.runners import load_runner

DECODER_NOISE = re.compile(r"\[\w+ @ 0x|Corrupt JPEG|Premature end|extraneous bytes|\[ ?WARN|\[ERROR|VIDEOIO")


class FileServer:
    """A web server on localhost serving one video file with byte ranges (as nginx or S3 do), each
    request in a connection of its own. ``cut_once`` cuts the first long answer from a non-zero
    offset in half, as a dropped connection would."""

    def __init__(self, path: Path, cut_once: bool = False):
        data = path.read_bytes()
        self.requests = 0
        cuts = [cut_once]
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                ranged = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(ranged.group(1)) if ranged else 0
                body = data[start:]
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cuts[0] and start > 0 and len(body) > len(data) // 2:
                    cuts[0], body = False, body[: len(body) // 2]
                try:
                    self.wfile.write(body)
                except OSError:  # the client went away
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path.name}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def camera_factory():
    cameras = []

    def make(*args, **kwargs):
        cameras.append(MjpegCamera(*args, **kwargs))
        return cameras[-1]

    yield make
    for camera in cameras:
        camera.close()


def frames_within(source, seconds: float) -> list:
    """The source's frame indices, read in a helper thread; fails if the source has not ended by then."""
    indices, stop = [], threading.Event()
    reader = threading.Thread(target=lambda: indices.extend(f.index for f in source.frames(stop=stop)), daemon=True)
    reader.start()
    reader.join(seconds)
    stop.set()
    assert not reader.is_alive(), f"the source had not ended after {seconds} s ({len(indices)} frames)"
    return indices


def signal_when(condition, pause=0.3, timeout=60.0) -> list[float]:
    """Send SIGINT to this process from a helper thread once ``condition()`` holds (then ``pause``);
    returns a list that gets the time it was sent (nothing is sent if it never holds)."""
    sent: list[float] = []

    def watch():
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        time.sleep(pause)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    return sent


# streams that end, drop or never decode --------------------------------------------------------------
def test_stream_without_a_decodable_frame_uses_up_its_reconnects(fixtures, camera_factory):
    camera = camera_factory([3] * 10, garbage=True)  # every connection opens, none brings a frame that decodes
    source = open_source(camera.url, retries=3, retry_delay=0.05)
    assert frames_within(source, 30) == []
    assert camera.connections == 4  # the first, then three reconnects that each used up one try
    assert "lost" in source.stop_reason and "3 reconnects" in source.stop_reason


def test_undecodable_stream_ends_the_run_in_bounded_time(fixtures, camera_factory, tmp_path):
    camera = camera_factory([3] * 10, garbage=True)
    out = tmp_path / "out"
    start = time.monotonic()
    try:
        proc = run_cli("infer", camera.url, "--model", UPSTREAM_ONNX, "--out-dir", out, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"infer was still reconnecting after 60 s ({camera.connections} connections)")
    assert time.monotonic() - start < 15  # 1 + 2 + 3 s of back-off, and the start-up
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "no frame could be decoded" in lines[-1] and "lost" in lines[-1]
    assert "Traceback" not in proc.stderr and not DECODER_NOISE.search(proc.stderr), proc.stderr
    assert camera.connections == 4 and not out.exists()


def test_video_file_over_http_ends_after_its_last_frame(fixtures, tmp_path):
    server = FileServer(CLIP)
    try:
        proc = run_cli("infer", server.url, "--model", UPSTREAM_ONNX, "--out-dir", tmp_path / "out", "--json",
                       timeout=120)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["frames"], summary["skipped"], summary["stop_reason"]) == (60, 0, "end")
    assert [r["frame"] for r in read_jsonl(Path(summary["outputs"]["jsonl"]))] == list(range(60))
    assert video_facts(Path(summary["outputs"]["video"]))[0] == 60
    assert server.requests <= 4  # opened once: not reconnected and replayed


def test_video_file_over_http_resumes_where_the_connection_dropped(fixtures):
    local = cv2.VideoCapture(str(CLIP))
    expected = [local.read()[1] for _ in range(60)]
    server = FileServer(CLIP, cut_once=True)
    try:
        source = open_source(server.url, retries=2, retry_delay=0.05)
        assert source.total == 60
        frames = []
        reader = threading.Thread(target=lambda: frames.extend(source.frames()), daemon=True)
        reader.start()
        reader.join(60)
    finally:
        server.close()
    assert server.requests > 3  # it did drop and reconnect
    assert [f.index for f in frames] == list(range(60)) and source.stop_reason == "end"
    differing = [f.index for f in frames if not np.array_equal(f.image, expected[f.index])]
    assert len(differing) <= 1  # the frames they claim to be, but for the one the cut went through


# Ctrl-C and SIGTERM ------------------------------------------------------------------------------------
def test_ctrl_c_while_waiting_to_reconnect_stops_at_once(fixtures, camera_factory, tmp_path):
    camera = camera_factory([3] * 10, garbage=True)
    with load_runner(UPSTREAM_ONNX) as runner, open_source(camera.url, retries=3, retry_delay=10) as source:
        sent = signal_when(lambda: camera.connections >= 1, pause=0.5)  # in the 10 s back-off by then
        with pytest.raises(KeyboardInterrupt):  # no frame written: Ctrl-C is passed on as it came
            run_inference(runner, source, tmp_path, InferSettings())
        assert time.monotonic() - sent[0] < 2
    assert camera.connections == 1 and not any(tmp_path.iterdir())


def test_ctrl_c_while_opencv_blocks_in_a_reconnect_keeps_what_was_written(fixtures, camera_factory, tmp_path):
    camera = camera_factory([8], hang_after=True)  # 8 frames, then it takes connections and never answers
    written = []
    with load_runner(UPSTREAM_ONNX) as runner, open_source(camera.url, retries=3, retry_delay=0.05) as source:
        sent = signal_when(lambda: len(written) == 8 and camera.connections == 2)  # OpenCV waits up to 10 s
        result = run_inference(runner, source, tmp_path, InferSettings(), on_frame=written.append)
        assert time.monotonic() - sent[0] < 3
    camera.close()  # the open still blocked holds OpenCV's FFmpeg lock, which reading the video below needs
    assert (result.frames, result.stop_reason) == (8, "interrupted")
    assert len(read_jsonl(tmp_path / "detections.jsonl")) == video_facts(Path(result.outputs["video"]))[0] == 8
    assert no_partial_files(tmp_path)


def test_ctrl_c_while_a_stream_opens_exits_at_once(fixtures, camera_factory, tmp_path):
    camera = camera_factory([], hang_after=True)  # takes the connection, never answers: OpenCV waits 10 s
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "infer", camera.url, "--model", str(UPSTREAM_ONNX),
                             "--out-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while camera.connections == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.communicate(timeout=30)
    assert time.monotonic() - sent < 3
    assert proc.returncode == 130
    assert not out.exists()  # the folder it had claimed is gone again


def test_sigterm_during_export_leaves_nothing_half_written(fixtures, tmp_path):
    out = tmp_path / "model.onnx"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "export", str(CHECKPOINT), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".model.*.partial.onnx")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)  # in the middle of loading or exporting
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in stderr
    assert not out.exists() and no_partial_files(tmp_path)


# one folder per run ------------------------------------------------------------------------------------
def test_each_run_claims_a_folder_of_its_own(tmp_path):
    exp = tmp_path / "runs" / "exp"
    with claim_run_dir(exp) as first:  # does not exist yet: made
        assert first == exp and (exp / CLAIM_MARKER).is_file()
        with claim_run_dir(exp) as second:  # in use
            assert second == tmp_path / "runs" / "exp2"
        (first / "detections.jsonl").write_text("{}\n")
    assert not (exp / CLAIM_MARKER).exists() and not (tmp_path / "runs" / "exp2").exists()  # left empty: removed
    with claim_run_dir(exp) as third:  # not empty
        assert third == tmp_path / "runs" / "exp2"
        (third / "detections.jsonl").write_text("{}\n")
    (tmp_path / "runs" / "exp3").write_text("a file, not a folder")
    (tmp_path / "runs" / "empty").mkdir()
    with claim_run_dir(tmp_path / "runs" / "empty") as claimed, claim_run_dir(exp) as fourth:
        assert claimed == tmp_path / "runs" / "empty" and fourth == tmp_path / "runs" / "exp4"
    assert (tmp_path / "runs" / "empty").is_dir()  # it was there before: kept
    with pytest.raises(SeDeployError, match="is a file"):
        with claim_run_dir(tmp_path / "runs" / "exp3"):
            pass


def test_runs_started_together_never_share_a_folder(tmp_path):
    start, claimed, release = threading.Barrier(8), [], threading.Event()

    def run():
        start.wait()
        with claim_run_dir(tmp_path / "exp") as folder:
            claimed.append(folder)
            release.wait(30)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    while len(claimed) < 8 and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in claimed) == sorted(["exp"] + [f"exp{n}" for n in range(2, 9)])


def test_two_infer_runs_into_one_folder_end_in_two(fixtures, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, str(REPO / "cli.py"), "infer", str(CLIP), "--model", str(UPSTREAM_ONNX),
               "--out-dir", str(out), "--json"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    summaries = []
    for proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    assert sorted(s["out_dir"] for s in summaries) == [str(out), str(tmp_path / "results2")]
    for summary in summaries:
        folder = Path(summary["out_dir"])
        assert sorted(p.name for p in folder.iterdir()) == ["detections.jsonl", "synth_shapes_60f.avi"]
        assert summary["outputs"]["jsonl"] == str(folder / "detections.jsonl")
        assert len(read_jsonl(folder / "detections.jsonl")) == video_facts(folder / "synth_shapes_60f.avi")[0] == 60


def test_out_dir_options(fixtures, tmp_path):
    image = FIXTURES / "dataset" / "images" / "val" / "val_000000.jpg"
    old = run_cli("infer", image, "--model", UPSTREAM_ONNX, "-o", tmp_path / "old", "--no-video")
    assert old.returncode == 0, old.stderr
    assert "deprecated: -o/--out DIR still works but is now --out-dir DIR" in old.stderr
    assert (tmp_path / "old" / "detections.jsonl").is_file()
    (tmp_path / "file").write_text("not a folder")
    refused = run_cli("infer", image, "--model", UPSTREAM_ONNX, "--out-dir", tmp_path / "file")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"error: {tmp_path / 'file'}: is a file; --out-dir takes a folder"]


# decoder noise ------------------------------------------------------------------------------------------
def test_damaged_input_prints_no_decoder_noise(fixtures, tmp_path, capfd):
    folder = tmp_path / "images"
    folder.mkdir()
    data = bytearray((FIXTURES / "dataset" / "images" / "val" / "val_000000.jpg").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)  # libjpeg: "Corrupt JPEG data: ... extraneous bytes"
    (folder / "damaged.jpg").write_bytes(bytes(data))
    (folder / "truncated.jpg").write_bytes(bytes(data[: len(data) // 3]))  # libjpeg: "Premature end of JPEG file"
    with open_source(str(folder)) as source:
        assert len(list(source.frames())) == 2  # both still decode (libjpeg fills in what is missing)
    with open_source(str(corrupt_copy(CLIP, tmp_path / "damaged.mp4"))) as source:
        assert len(list(source.frames())) + source.skipped == 60 and source.skipped > 0
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, np.uint8).tobytes())
    with pytest.raises(SeDeployError, match="cannot be opened"):
        open_source(str(tmp_path / "noise.mp4"))
    with pytest.raises(SeDeployError, match="cannot open the stream"):
        open_source("rtsp://127.0.0.1:9/none")
    assert not DECODER_NOISE.search(capfd.readouterr().err)
