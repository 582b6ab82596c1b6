"""`se-deploy infer`: detections match PyTorch and YOLOv5's detect.py; outputs are complete and playable;
bad input is refused in one line; Ctrl-C, SIGTERM and lost streams keep what was written; no torch on the ONNX path."""

from __future__ import annotations

import json
import os
import shutil
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
from test_sources import MjpegCamera, corrupt_copy

from se_deploy.errors import SeDeployError
from se_deploy.inference.postprocess import match_detections
from se_deploy.runners import load_runner
from se_deploy.inference.sources import open_source
from se_deploy.inference.video_pipeline import CPU_HELPER_NICE, InferSettings, run_inference

UPSTREAM_ONNX = FIXTURES / "onnx" / "upstream-export-320.onnx"
DETECT_PY = FIXTURES / "detect"
DETECT_IMAGES = [f"val_00000{i}" for i in range(5)]  # the images detect.py ran on
STAGES = {"decode", "preprocess", "infer", "postprocess", "encode"}


# helpers ------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_arrays(records: list[dict]) -> list[np.ndarray]:
    """Per frame, detections as rows x1, y1, x2, y2, conf, cls."""
    return [np.array([d["xyxy"] + [d["conf"], d["cls"]] for d in r["detections"]], np.float32).reshape(-1, 6)
            for r in records]


def detect_py_boxes(label_file: Path, w: int, h: int) -> np.ndarray:
    """detect.py's --save-txt --save-conf rows (cls cx cy w h conf, normalised) as pixel xyxy rows."""
    if not label_file.is_file():
        return np.zeros((0, 6), np.float32)
    cls, cx, cy, bw, bh, conf = np.loadtxt(label_file, ndmin=2).T
    return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, conf, cls], 1)


def share_of_reference_found(ours: list[np.ndarray], reference: list[np.ndarray], iou=0.5) -> float:
    found = sum(match_detections(o, r, iou) for o, r in zip(ours, reference))
    return found / sum(len(r) for r in reference)


def video_facts(path: Path) -> tuple[int, int, int, float]:
    """(decoded frame count, width, height, fps) of a video file."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    w, h, fps = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), cap.get(cv2.CAP_PROP_FPS)
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return count, w, h, fps


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.fixture(scope="module")
def single_thread_torch():
    """PyTorch on one thread: the test clip is small and the CPU may be shared with other jobs."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_library(model: Path, source: str, out: Path, **settings):
    with load_runner(model) as runner, open_source(source) as src:
        result = run_inference(runner, src, out, InferSettings(**settings))
    return result, read_jsonl(out / "detections.jsonl")


# the fixture clip, once per backend --------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_clip_run(fixtures, tmp_path_factory):
    """`se-deploy infer CLIP --model upstream.onnx --json`: (process, output folder, summary)."""
    out = tmp_path_factory.mktemp("onnx_clip")
    proc = run_cli("infer", CLIP, "--model", UPSTREAM_ONNX, "--out-dir", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return proc, out, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def torch_square_clip(fixtures, single_thread_torch, tmp_path_factory):
    """The clip through PyTorch letterboxed to the same 320x320 square as the static ONNX."""
    return run_library(CHECKPOINT, str(CLIP), tmp_path_factory.mktemp("pt_sq"), imgsz=(320, 320), rect=False,
                       save_media=False)


def test_infer_video_writes_playable_annotated_copy(onnx_clip_run):
    _, out, summary = onnx_clip_run
    video = out / "synth_shapes_60f.avi"  # Motion JPEG by default
    assert summary["outputs"] == {"jsonl": str(out / "detections.jsonl"), "video": str(video)}
    assert video_facts(video) == video_facts(CLIP) == (60, 640, 480, 30.0)
    assert no_partial_files(out)
    original = cv2.VideoCapture(str(CLIP)).read()[1]
    annotated = cv2.VideoCapture(str(video)).read()[1]
    assert np.abs(original.astype(int) - annotated).max() > 100  # boxes were drawn on it
    packets = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])  # undecoded
    key_frames = []
    while packets.grab():
        key_frames.append(packets.get(cv2.CAP_PROP_LRF_HAS_KEY_FRAME))
    assert key_frames == [1] * 60  # each frame stands alone: seeks land exactly, a cut loses nothing before it


def test_mp4v_video_codec_writes_detect_py_format(fixtures, tmp_path):
    result, _ = run_library(UPSTREAM_ONNX, str(CLIP), tmp_path, video_codec="mp4v")
    assert result.outputs["video"] == str(tmp_path / "synth_shapes_60f.mp4")
    cap = cv2.VideoCapture(result.outputs["video"])
    assert int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little") in (b"FMP4", b"mp4v")  # MPEG-4 Part 2
    assert video_facts(tmp_path / "synth_shapes_60f.mp4") == (60, 640, 480, 30.0)
    mjpeg = tmp_path / "mjpeg"
    run_library(UPSTREAM_ONNX, str(CLIP), mjpeg)
    # the same drawn frames, within what the two lossy codecs change
    assert cv2.PSNR(cap.read()[1], cv2.VideoCapture(str(mjpeg / "synth_shapes_60f.avi")).read()[1]) > 30


def test_infer_json_summary_and_jsonl_records(onnx_clip_run):
    _, out, summary = onnx_clip_run
    assert summary["frames"] == 60 and summary["skipped"] == 0 and summary["stop_reason"] == "end"
    assert summary["fps"] > 0 and set(summary["stages_ms"]) == STAGES
    assert all(v >= 0 for v in summary["stages_ms"].values()) and summary["stages_ms"]["infer"] > 0
    assert summary["input_hw"] == [320, 320] and "onnxruntime" in summary["model"]
    records = read_jsonl(out / "detections.jsonl")
    assert [r["frame"] for r in records] == list(range(60))
    assert all(r["source"] == str(CLIP) for r in records)
    names = {0: "circle", 1: "rectangle", 2: "triangle"}
    dets = [d for r in records for d in r["detections"]]
    assert len(dets) > 60
    for d in dets:
        assert set(d) == {"xyxy", "conf", "cls", "name"} and d["name"] == names[d["cls"]] and 0.25 < d["conf"] <= 1
        x1, y1, x2, y2 = d["xyxy"]
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480  # original-frame pixels, not the 320 input
    assert max(d["xyxy"][2] for d in dets) > 320


def test_onnx_and_pytorch_give_the_same_detections(onnx_clip_run, torch_square_clip):
    ort = as_arrays(read_jsonl(onnx_clip_run[1] / "detections.jsonl"))
    result, records = torch_square_clip
    assert result.input_hw == [320, 320]
    pt = as_arrays(records)
    assert len(ort) == len(pt) == 60
    for frame, (a, b) in enumerate(zip(ort, pt)):
        matched = match_detections(a, b, iou_thres=0.9)
        # A box whose confidence sits on the 0.25 threshold may fall on either side of it.
        borderline = sum(abs(d[4] - 0.25) < 1e-3 for d in (*a, *b))
        assert len(a) - matched <= borderline and len(b) - matched <= borderline, f"frame {frame}"
    assert sum(map(len, ort)) > 100


def test_clip_matches_detect_py(onnx_clip_run, single_thread_torch, tmp_path):
    reference = [detect_py_boxes(DETECT_PY / "video" / "labels" / f"synth_shapes_60f_{i + 1}.txt", 640, 480)
                 for i in range(60)]
    assert sum(map(len, reference)) > 100
    ort = as_arrays(read_jsonl(onnx_clip_run[1] / "detections.jsonl"))
    assert share_of_reference_found(ort, reference) >= 0.9  # static 320x320 vs detect.py's 256x320
    # A .pt model takes any stride multiple, so --imgsz 320 letterboxes as detect.py did: 256x320.
    result, records = run_library(CHECKPOINT, str(CLIP), tmp_path, imgsz=(320, 320), save_media=False)
    assert result.input_hw == [256, 320]
    assert share_of_reference_found(as_arrays(records), reference) >= 0.9


# images, without torch ----------------------------------------------------------------------------
BLOCK_TORCH_AND_RUN = """
import sys
sys.modules["torch"] = None  # as if PyTorch were not installed: any import of it fails
from se_deploy.cli import main
sys.argv = ["se-deploy", *sys.argv[1:]]
try:
    main()
finally:
    print("torch imported" if sys.modules.get("torch") is not None else "torch never imported", file=sys.stderr)
"""


def test_images_glob_through_onnx_without_torch(fixtures, tmp_path):
    source = FIXTURES / "dataset" / "images" / "val" / "val_00000[0-4].jpg"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH_AND_RUN, "infer", str(source), "--model",
                           str(UPSTREAM_ONNX), "--out-dir", str(out), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "torch never imported" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["frames"] == 5 and summary["outputs"]["images"] == str(out)
    records = read_jsonl(out / "detections.jsonl")
    assert [Path(r["source"]).stem for r in records] == DETECT_IMAGES
    for name in DETECT_IMAGES:
        annotated = cv2.imread(str(out / f"{name}.jpg"))
        assert annotated is not None and annotated.shape == (320, 320, 3)
    reference = [detect_py_boxes(DETECT_PY / "images" / "labels" / f"{name}.txt", 320, 320) for name in DETECT_IMAGES]
    assert share_of_reference_found(as_arrays(records), reference) >= 0.9


# options ------------------------------------------------------------------------------------------
def test_batched_run_gives_the_same_detections(onnx_clip_run, tmp_path):
    result, records = run_library(UPSTREAM_ONNX, str(CLIP), tmp_path, batch=4, save_media=False)
    assert result.frames == 60 and result.batch == 4
    assert not (tmp_path / "synth_shapes_60f.mp4").exists()  # --no-video
    single = read_jsonl(onnx_clip_run[1] / "detections.jsonl")
    assert records == single


def test_mixed_image_sizes_in_one_batch_keep_their_order(fixtures, single_thread_torch, tmp_path):
    """A batch whose images need different input sizes is split by size and put back in order."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = [None, (640, 480), (400, 640), None, (640, 480), (400, 640)]  # (w, h) to resize to; None keeps 320x320
    for i, size in enumerate(sizes):
        image = cv2.imread(str(FIXTURES / "dataset" / "images" / "val" / f"val_00000{i}.jpg"))
        cv2.imwrite(str(folder / f"{i}.png"), image if size is None else cv2.resize(image, size))
    _, batched = run_library(CHECKPOINT, str(folder), tmp_path / "b4", batch=4, save_media=False)
    _, single = run_library(CHECKPOINT, str(folder), tmp_path / "b1", batch=1, save_media=False)
    assert [Path(r["source"]).name for r in batched] == [f"{i}.png" for i in range(len(sizes))]
    for b, s in zip(as_arrays(batched), as_arrays(single)):
        assert len(b) == len(s) and match_detections(b, s, 0.95) == len(s)
    assert sum(map(len, as_arrays(single))) > len(sizes)  # the images do hold objects


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux behaviour")
def test_helper_threads_yield_to_cpu_inference(fixtures, tmp_path):
    def nice_of_encoder_thread(**settings):
        seen = set()
        on_frame = lambda done: seen.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))  # noqa: E731
        with load_runner(UPSTREAM_ONNX) as runner, open_source(str(CLIP)) as src:
            run_inference(runner, src, tmp_path, InferSettings(save_media=False, **settings), on_frame=on_frame)
        return seen

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice_of_encoder_thread() == {min(19, own + CPU_HELPER_NICE)}  # ONNX Runtime on the CPU: helpers step back
    assert nice_of_encoder_thread(helper_nice=0) == {own}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the caller's thread is untouched
    with pytest.raises(SeDeployError, match="--helper-nice 20"):
        nice_of_encoder_thread(helper_nice=20)


def test_class_filter_and_max_det(onnx_clip_run, tmp_path):
    images = FIXTURES / "dataset" / "images" / "val" / "val_00000[0-4].jpg"
    result, records = run_library(UPSTREAM_ONNX, str(images), tmp_path, classes=[2], max_det=1, conf=0.1,
                                  save_media=False)
    assert result.frames == 5
    dets = [r["detections"] for r in records]
    assert all(len(d) <= 1 for d in dets) and {x["cls"] for d in dets for x in d} == {2}


def test_without_model_the_newest_artifact_is_used_and_named(fixtures, tmp_path):
    (tmp_path / "engines").mkdir()
    shutil.copy(CHECKPOINT, tmp_path / "engines" / "old.pt")
    shutil.copy(UPSTREAM_ONNX, tmp_path / "engines" / "model.onnx")
    image = FIXTURES / "dataset" / "images" / "val" / "val_000000.jpg"
    proc = run_cli("infer", image, "--out-dir", tmp_path / "out", "--no-video", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "engines/model.onnx" in proc.stderr and "newest ONNX model" in proc.stderr
    assert (tmp_path / "out" / "detections.jsonl").is_file()


# robustness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "text", "zero-frames", "model-suffix", "imgsz", "batch", "helper-nice",
                                  "video-codec"])
def test_bad_input_is_one_line_error_and_writes_nothing(fixtures, tmp_path, case):
    video, model, extra = tmp_path / "clip.mp4", UPSTREAM_ONNX, []
    if case == "text":
        video.write_text("this is not a video\n" * 50)
    elif case == "zero-frames":
        cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48)).release()
    elif case != "missing":
        shutil.copy(CLIP, video)
    if case == "model-suffix":
        model = tmp_path / "model.tflite"
        model.write_bytes(b"\0" * 64)
    extra = {"imgsz": ["--imgsz", "640"], "batch": ["--batch", "0"], "helper-nice": ["--helper-nice", "-1"],
             "video-codec": ["--video-codec", "h264"]}.get(case, [])
    out = tmp_path / "out"
    proc = run_cli("infer", video, "--model", model, "--out-dir", out, *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    expected = {"missing": "no such file", "text": "cannot be opened", "zero-frames": str(video),
                "model-suffix": "unknown model type", "imgsz": "built for 320x320", "batch": "--batch",
                "helper-nice": "--helper-nice -1",
                "video-codec": "--video-codec h264: expected one of mjpeg, mp4v"}[case]
    assert expected in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_corrupt_frames_are_skipped_counted_and_left_out(fixtures, tmp_path):
    damaged = corrupt_copy(CLIP, tmp_path / "damaged.mp4")
    result, records = run_library(UPSTREAM_ONNX, str(damaged), tmp_path / "out")
    assert result.skipped > 0 and result.frames + result.skipped == 60
    assert len(records) == result.frames
    assert video_facts(Path(result.outputs["video"]))[0] == result.frames


def test_lost_stream_keeps_the_frames_written(fixtures, tmp_path):
    camera = MjpegCamera([12, 6])
    try:
        with load_runner(UPSTREAM_ONNX) as runner:
            source = open_source(camera.url, retries=2, retry_delay=0.05)
            result = run_inference(runner, source, tmp_path, InferSettings())
    finally:
        camera.close()
    assert result.frames == 18 and "lost" in result.stop_reason
    assert len(read_jsonl(tmp_path / "detections.jsonl")) == 18
    count, w, h, _ = video_facts(Path(result.outputs["video"]))
    assert (count, w, h) == (18, 640, 480)
    assert no_partial_files(tmp_path)


@pytest.fixture
def long_clip(fixtures, tmp_path):
    """420 small frames (the fixture clip at 320x240, seven times): long enough to interrupt."""
    path = tmp_path / "long.mp4"
    cap = cv2.VideoCapture(str(CLIP))
    frames = [cv2.resize(cap.read()[1], (320, 240)) for _ in range(60)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (320, 240))
    for _ in range(7):
        for frame in frames:
            writer.write(frame)
    writer.release()
    return path


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),  # Ctrl-C
                                                (signal.SIGTERM, 143, "terminated")])  # docker stop
def test_stop_signal_keeps_a_playable_video_and_complete_jsonl(long_clip, tmp_path, signum, code, word):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "infer", str(long_clip), "--model",
                             str(UPSTREAM_ONNX), "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        partial = list(out.glob(".detections.*.partial.jsonl")) if out.exists() else []
        if partial and len(partial[0].read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"{word}: kept the" in stderr and "Traceback" not in stderr
    assert word in stdout  # the summary's "stopped by"
    records = read_jsonl(out / "detections.jsonl")  # every line complete
    assert 5 <= len(records) < 420
    assert [r["frame"] for r in records] == list(range(len(records)))
    count, w, h, fps = video_facts(out / "long.avi")
    assert (count, w, h, fps) == (len(records), 320, 240, 30.0)
    assert no_partial_files(out)


def test_library_refuses_bad_settings(fixtures, tmp_path):
    with load_runner(UPSTREAM_ONNX) as runner, open_source(str(CLIP)) as source:
        with pytest.raises(SeDeployError, match="built for 320x320"):
            run_inference(runner, source, tmp_path, InferSettings(imgsz=(256, 320)))
    assert not any(tmp_path.iterdir())

