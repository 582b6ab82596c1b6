"""Threaded inference over a frame source: decode -> preprocess -> infer -> postprocess -> draw+encode.

Each stage runs in its own thread (inference in the caller's, where the runner was activated) and the
stages hand batches on through bounded queues, so decoding, letterboxing, inference and encoding
overlap and the inference thread does nothing but infer. Frame and network-input buffers come from
fixed pools, so nothing is allocated per frame and memory does not grow with the length of the video.
Outputs are written under temporary names and renamed when the run ends: at the end of the source,
on Ctrl-C or SIGTERM, or when a stream is lost, so what was written stays playable.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from se_deploy.inference.annotate import Annotator
from se_deploy.artifacts import atomic_output
from se_deploy.errors import ModelServerLostError, SeDeployError
from se_deploy.inference.postprocess import non_max_suppression, scale_boxes
from se_deploy.inference.preprocess import LetterboxInfo, Letterboxer, letterbox_geometry
from se_deploy.runners.base import Runner
from se_deploy.inference.sources import Frame, Source
from se_deploy.inference.video_writer import SUFFIXES, VideoWriter, check_codec

STAGES = ("decode", "preprocess", "infer", "postprocess", "encode")
QUEUE_DEPTH = 2  # batches waiting between two stages
DEFAULT_IMGSZ = 640  # letterbox target for models that accept any input size (detect.py's default)
DEFAULT_FPS = 30.0  # output frame rate when a stream does not report one
_DONE = object()  # end-of-stream marker passed down the queues
SERVER_LOST = "model server lost"  # how stop_reason starts when a served model stopped answering mid-run
_POLL_S = 0.1  # how often a blocked stage looks at the stop flag
# Once the run is stopping, how long to wait for a decoder blocked in OpenCV (a stream's open or read
# waits up to its timeout); it ends by itself when OpenCV returns, and releases the capture then.
DECODE_GRACE_S = 1.0
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}  # signal -> stop_reason
# How far the helper stages' threads step back (nice) when inference runs on the CPU: they then run in
# the moments inference leaves a core idle instead of stalling it (benchmarks/video_throughput.py).
CPU_HELPER_NICE = 19


@dataclass
class InferSettings:
    """What to detect and what to write; the defaults are detect.py's."""

    imgsz: tuple[int, int] | None = None  # letterbox target (h, w); None: the model's own size, else 640
    rect: bool = True  # models of any input size: pad only to a stride multiple (detect.py), else square
    conf: float = 0.25
    iou: float = 0.45
    classes: list[int] | None = None
    max_det: int = 300
    batch: int = 1
    save_media: bool = True  # annotated video / images besides detections.jsonl
    video_codec: str = "mjpeg"  # "mjpeg" (.avi, cheapest to encode) or "mp4v" (.mp4, detect.py's, ~4x smaller)
    helper_nice: int | None = None  # nice steps (0-19) for the other threads; None: CPU_HELPER_NICE on a CPU, else 0


@dataclass
class InferResult:
    """What a run did: frame counts, speed, per-stage times and the files written."""

    frames: int
    skipped: int
    seconds: float
    fps: float
    stages_ms: dict[str, float]
    out_dir: str
    outputs: dict[str, str]
    # 'end', 'interrupted' (Ctrl-C), 'terminated' (SIGTERM), why a live source ended, or SERVER_LOST + why
    stop_reason: str
    model: str
    source: str
    input_hw: list[int] | None
    batch: int

    def summary(self) -> dict:
        return asdict(self)


def detection_records(dets: np.ndarray, names: dict[int, str]) -> list[dict]:
    """Detections (rows x1, y1, x2, y2, conf, cls) as the JSON records of detections.jsonl."""
    return [
        {"xyxy": [round(v, 2) for v in row[:4]], "conf": round(row[4], 4), "cls": int(row[5]),
         "name": names.get(int(row[5]), str(int(row[5])))}
        for row in dets.tolist()
    ]


class InputShaper:
    """Network input size per frame size, and a letterboxer (padded canvas) kept per input size."""

    MAX_LETTERBOXERS = 4  # distinct input sizes kept (a folder of mixed image sizes cycles through them)

    def __init__(self, runner: Runner, settings: InferSettings):
        self.runner = runner
        self.settings = settings
        if runner.imgsz and settings.imgsz and tuple(settings.imgsz) != runner.imgsz:
            h, w = runner.imgsz
            raise SeDeployError(
                f"{runner.path.name} is built for {h}x{w} input; --imgsz {settings.imgsz[0]},{settings.imgsz[1]} "
                "does not match (leave --imgsz out, or export again at that size)"
            )
        stride = runner.stride
        target = settings.imgsz or (DEFAULT_IMGSZ, DEFAULT_IMGSZ)
        self.target = tuple(math.ceil(side / stride) * stride for side in target)  # as detect.py: round up
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._letterboxers: dict[tuple[int, int], Letterboxer] = {}

    def input_hw(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) the network gets for a frame of ``frame_hw``."""
        if self.runner.imgsz:
            return self.runner.imgsz
        if not self.settings.rect:
            return self.target
        if frame_hw not in self._sizes:
            if len(self._sizes) > 256:
                self._sizes.clear()
            (w, h), (top, bottom, left, right), _ = letterbox_geometry(frame_hw, self.target, auto=True,
                                                                       stride=self.runner.stride)
            self._sizes[frame_hw] = (h + top + bottom, w + left + right)
        return self._sizes[frame_hw]

    def groups(self, frames: list[Frame]) -> list[tuple[tuple[int, int], list[int]]]:
        """The frames' positions grouped by input size, in order of first appearance (one group for a video)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for position, frame in enumerate(frames):
            groups.setdefault(self.input_hw(frame.image.shape[:2]), []).append(position)
        return list(groups.items())

    def prepare(self, input_hw: tuple[int, int], images: list[np.ndarray], out: np.ndarray):
        """Letterbox ``images`` into ``out`` (N, 3, *input_hw); returns it and the letterbox infos."""
        letterboxer = self._letterboxers.pop(input_hw, None) or Letterboxer(input_hw)
        self._letterboxers[input_hw] = letterboxer  # most recently used last
        if len(self._letterboxers) > self.MAX_LETTERBOXERS:
            del self._letterboxers[next(iter(self._letterboxers))]
        return letterboxer.prepare(images, out)


class BufferPool:
    """Reusable arrays: at most ``per_shape`` of one shape exist at once, so memory stays bounded.

    ``acquire`` hands out a free array (making one while fewer exist) and waits while all are in use;
    ``release`` gives one back. Free arrays are kept for the few most recently used shapes only.
    """

    MAX_SHAPES = 4

    def __init__(self, per_shape: int, dtype, stop: threading.Event):
        self._per_shape = per_shape
        self._dtype = dtype
        self._stop = stop
        self._free: dict[tuple, list[np.ndarray]] = {}  # shape -> free arrays; most recently used shape last
        self._made: collections.Counter = collections.Counter()  # shape -> arrays of it in existence
        self._changed = threading.Condition()

    def acquire(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A free array of ``shape``; None once the run is stopping."""
        shape = tuple(shape)
        with self._changed:
            while not self._stop.is_set():
                free = self._free.pop(shape, [])
                self._free[shape] = free
                if free:
                    return free.pop()
                if self._made[shape] < self._per_shape:
                    self._made[shape] += 1
                    while len(self._free) > self.MAX_SHAPES:  # forget the free arrays of the oldest shape
                        old = next(iter(self._free))
                        self._made[old] -= len(self._free.pop(old))
                    return np.empty(shape, self._dtype)
                self._changed.wait(_POLL_S)
        return None

    def release(self, array: np.ndarray) -> None:
        with self._changed:
            self._free.setdefault(array.shape, []).append(array)
            self._changed.notify()


class InputChunk(NamedTuple):
    """Frames of one batch that share an input size, letterboxed into a pooled buffer."""

    positions: list[int]  # where the frames sit in their batch
    buffer: np.ndarray  # the pooled (batch, 3, H, W) array, first len(positions) images filled; freed after inference
    infos: list[LetterboxInfo]


class MediaWriter:
    """Writes each finished frame: a detections.jsonl line, and the annotated frame to a video or image."""

    def __init__(self, names: dict[int, str], jsonl_path: Path, video_path: Path | None, image_dir: Path | None,
                 fps: float, codec: str, size_wh: tuple[int, int] | None):
        self.names = names
        self._jsonl = open(jsonl_path, "w", encoding="utf-8", buffering=1)  # line-buffered: tail -f works
        self._video_path = video_path
        self._image_dir = image_dir
        self._fps = fps
        self._codec = codec
        self._video: VideoWriter | None = None
        self._annotator: Annotator | None = None
        if video_path and size_wh:  # opened before decoding starts: OpenCV holds one lock while any FFmpeg
            self._open_video(size_wh)  # open runs, and a stream's reconnect may wait 10 s in one

    def _annotate(self, image: np.ndarray, dets: np.ndarray) -> None:
        hw = image.shape[:2]
        if self._annotator is None or self._annotator_hw != hw:
            self._annotator, self._annotator_hw = Annotator(self.names, hw), hw
        self._annotator.draw(image, dets)

    def write(self, frame: Frame, dets: np.ndarray) -> None:
        record = {"frame": frame.index, "source": frame.name, "detections": detection_records(dets, self.names)}
        if self._video_path or self._image_dir:
            self._annotate(frame.image, dets)
        if self._video_path:
            if self._video is None:  # a source that did not say its frame size
                self._open_video((frame.image.shape[1], frame.image.shape[0]))
            self._video.write(frame.image)
        elif self._image_dir:
            target = self._image_dir / Path(frame.name).name
            if target.resolve() == Path(frame.name).resolve():
                raise SeDeployError(f"{target}: --out-dir would overwrite the source image; choose another folder")
            with atomic_output(target) as tmp:
                if not cv2.imwrite(str(tmp), frame.image):
                    raise SeDeployError(f"{target}: OpenCV cannot write this image")
        self._jsonl.write(json.dumps(record) + "\n")

    def _open_video(self, size_wh: tuple[int, int]) -> None:
        self._video = VideoWriter(self._video_path, self._codec, self._fps, size_wh)

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None
        self._jsonl.close()


def lower_thread_priority(steps: int) -> None:
    """Raise the calling thread's nice value by ``steps`` (Linux, where nice is per thread; else nothing)."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))


class Pipeline:
    """The five stages and their queues for one run; ``run()`` returns when the source is done or stopped."""

    def __init__(self, runner: Runner, source: Source, shaper: InputShaper, writer: MediaWriter,
                 settings: InferSettings, on_frame: Callable[[int], None] | None = None):
        self.runner, self.source, self.shaper, self.writer = runner, source, shaper, writer
        self.settings = settings
        self.on_frame = on_frame
        self.stop = threading.Event()
        self.stopped_by: int | None = None  # the signal that stopped the run, if one did
        self.errors: list[BaseException] = []
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.written = 0
        self.helper_nice = settings.helper_nice
        if self.helper_nice is None:  # on a GPU the inference thread mostly waits: no stage needs precedence
            self.helper_nice = CPU_HELPER_NICE if runner.device == "cpu" else 0
        self.decoded_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self.prepared_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self.inferred_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self.detected_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        # Input buffers in use at most: QUEUE_DEPTH queued, one being filled, one being inferred.
        self.input_pool = BufferPool(QUEUE_DEPTH + 2, np.float32, self.stop)
        self.frame_pool = self.frame_shape = None
        if source.size and source.kind != "images":  # frames in use at most: one batch per queue slot and stage
            w, h = source.size
            self.frame_shape = (h, w, 3)
            self.frame_pool = BufferPool(settings.batch * (4 * QUEUE_DEPTH + 5), np.uint8, self.stop)

    # queue helpers: a blocked stage gives up once the run is stopping ---------------------------
    def _put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _items(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                item = q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            yield item

    def _thread(self, target) -> threading.Thread:
        def guarded():
            lower_thread_priority(self.helper_nice)
            try:
                target()
            except BaseException as e:  # handed to the caller's thread, which re-raises it
                self.errors.append(e)
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"se-deploy-{target.__name__.strip('_')}", daemon=True)
        thread.start()
        return thread

    # stages -------------------------------------------------------------------------------------
    def _decode(self) -> None:
        next_buffer = (lambda: self.frame_pool.acquire(self.frame_shape)) if self.frame_pool else None
        batch: list[Frame] = []
        for frame in self.source.frames(next_buffer, self.stop):
            batch.append(frame)
            if len(batch) == self.settings.batch:
                if not self._put(self.decoded_q, batch):
                    return
                batch = []
        if batch and not self._put(self.decoded_q, batch):
            return
        self._put(self.decoded_q, _DONE)

    def _preprocess(self) -> None:
        for frames in self._items(self.decoded_q):
            chunks = []
            for input_hw, positions in self.shaper.groups(frames):
                buffer = self.input_pool.acquire((self.settings.batch, 3, *input_hw))
                if buffer is None:
                    return
                start = time.perf_counter()
                _, infos = self.shaper.prepare(input_hw, [frames[i].image for i in positions], buffer[: len(positions)])
                self.seconds["preprocess"] += time.perf_counter() - start
                chunks.append(InputChunk(positions, buffer, infos))
            if not self._put(self.prepared_q, (frames, chunks)):
                return
        self._put(self.prepared_q, _DONE)

    def _infer(self) -> None:
        for frames, chunks in self._items(self.prepared_q):
            start = time.perf_counter()
            preds = []
            for chunk in chunks:
                preds.append(self.runner.infer(chunk.buffer[: len(chunk.positions)]))
                self.input_pool.release(chunk.buffer)
            self.seconds["infer"] += time.perf_counter() - start
            if not self._put(self.inferred_q, (frames, chunks, preds)):
                return
        self._put(self.inferred_q, _DONE)

    def _postprocess(self) -> None:
        s = self.settings
        for frames, chunks, preds in self._items(self.inferred_q):
            start = time.perf_counter()
            dets: list[np.ndarray | None] = [None] * len(frames)
            for chunk, pred in zip(chunks, preds):
                found = non_max_suppression(pred, s.conf, s.iou, s.classes, s.max_det)
                for position, frame_dets, info in zip(chunk.positions, found, chunk.infos):
                    dets[position] = scale_boxes(frame_dets, info)
            self.seconds["postprocess"] += time.perf_counter() - start
            if not self._put(self.detected_q, (frames, dets)):
                return
        self._put(self.detected_q, _DONE)

    def _encode(self) -> None:
        for frames, dets in self._items(self.detected_q):
            for frame, frame_dets in zip(frames, dets):
                if self.stop.is_set():  # checked per frame: the JSONL and the video stay in step
                    return
                start = time.perf_counter()
                self.writer.write(frame, frame_dets)
                self.seconds["encode"] += time.perf_counter() - start
                if self.frame_pool:
                    self.frame_pool.release(frame.image)
                self.written += 1
                if self.on_frame:
                    self.on_frame(self.written)

    def run(self) -> float:
        """Run every stage to the end (or until stopped); returns the wall time in seconds."""
        start = time.perf_counter()
        decoder = self._thread(self._decode)
        others = [self._thread(stage) for stage in (self._preprocess, self._postprocess, self._encode)]
        try:
            try:
                self._infer()
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                self.errors.append(e)
                self.stop.set()
            self._join(decoder, others)
        except KeyboardInterrupt:  # a second signal while stopping: stop now, keep what was written
            self.stopped_by = self.stopped_by or signal.SIGINT
            self.stop.set()
            self._join(decoder, others)
        self.seconds["decode"] = self.source.decode_seconds
        return time.perf_counter() - start

    def _join(self, decoder: threading.Thread, others: list[threading.Thread]) -> None:
        """Wait for the stages; once the run is stopping, for the decoder only DECODE_GRACE_S more."""
        for thread in others:
            thread.join()
        while decoder.is_alive() and not self.stop.is_set():
            decoder.join(_POLL_S)
        decoder.join(DECODE_GRACE_S)


@contextlib.contextmanager
def _stop_signals(pipeline: Pipeline):
    """While running, Ctrl-C or SIGTERM (docker stop) asks the pipeline to stop after the frame being
    written; a second one stops at once. A signal the caller ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if pipeline.stopped_by is not None:
            raise KeyboardInterrupt
        pipeline.stopped_by = signum
        pipeline.stop.set()

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, signal.SIG_DFL if before is None else before)


class _StoppedBeforeAnyFrame(Exception):
    """A signal stopped the run before a frame was written: the temporary files go, the signal is passed on."""


def warm_up(runner: Runner, shaper: InputShaper, source: Source, batch: int) -> None:
    """One inference on a blank batch of the size the source will need, so timing starts warm."""
    if source.size:
        w, h = source.size
        runner.infer(np.zeros((batch, 3, *shaper.input_hw((h, w))), np.float32))


def server_lost(pipeline: Pipeline) -> ModelServerLostError | None:
    """The model server's loss, when that is what stopped the run (a Triton model that stopped answering)."""
    return next((e for e in pipeline.errors if isinstance(e, ModelServerLostError)), None)


def _write_outputs(runner: Runner, source: Source, shaper: InputShaper, out_dir: Path, outputs: dict[str, str],
                   settings: InferSettings, on_frame: Callable[[int], None] | None) -> tuple[float, Pipeline]:
    """Run the pipeline into temporary files, renamed to ``outputs`` once it is done (removed if it fails)."""
    with contextlib.ExitStack() as stack:
        jsonl_tmp = stack.enter_context(atomic_output(outputs["jsonl"]))
        video_tmp = image_dir = None
        if settings.save_media and source.kind == "images":
            image_dir = out_dir
            outputs["images"] = str(out_dir)
        elif settings.save_media:
            video_path = out_dir / f"{source.output_stem}{SUFFIXES[settings.video_codec]}"
            video_tmp = stack.enter_context(atomic_output(video_path))
            outputs["video"] = str(video_path)
        writer = MediaWriter(runner.names, jsonl_tmp, video_tmp, image_dir, source.fps or DEFAULT_FPS,
                             settings.video_codec, source.size)
        stack.callback(writer.close)  # closed before the temporary files are renamed
        pipeline = Pipeline(runner, source, shaper, writer, settings, on_frame)
        with _stop_signals(pipeline):
            seconds = pipeline.run()
        if pipeline.errors and not (server_lost(pipeline) and pipeline.written):  # ends like a lost stream
            raise pipeline.errors[0]
        if not pipeline.written:
            if pipeline.stopped_by is not None:
                raise _StoppedBeforeAnyFrame(pipeline.stopped_by)
            why = "" if source.stop_reason in ("end", "stopped") else f"; {source.stop_reason}"
            raise SeDeployError(f"{source.name}: no frame could be decoded ({source.skipped} unreadable{why})")
    return seconds, pipeline


def run_inference(runner: Runner, source: Source, out_dir: str | Path, settings: InferSettings | None = None,
                  on_frame: Callable[[int], None] | None = None) -> InferResult:
    """Detect objects in every frame of ``source`` with the activated ``runner``; write outputs to ``out_dir``.

    Writes ``detections.jsonl`` (one line per frame, boxes in original-frame pixels) and, unless
    ``settings.save_media`` is off, the annotated video (``<source>.avi`` or ``.mp4``, the source's size and fps) or
    annotated images. ``on_frame(done)`` is called after each written frame (for a progress display).
    In the main thread, Ctrl-C or SIGTERM ends the run after the frame being written and keeps what
    was written (``stop_reason`` 'interrupted' or 'terminated'); one that comes before the first frame
    is passed on to the handler from before the run once the temporary files are gone (Ctrl-C:
    KeyboardInterrupt).
    """
    settings = settings or InferSettings()
    if settings.batch < 1:
        raise SeDeployError(f"--batch {settings.batch}: must be at least 1")
    if settings.helper_nice is not None and not 0 <= settings.helper_nice <= 19:
        raise SeDeployError(f"--helper-nice {settings.helper_nice}: expected 0 (off) to 19")
    check_codec(settings.video_codec)
    out_dir = Path(out_dir)
    shaper = InputShaper(runner, settings)
    warm_up(runner, shaper, source, settings.batch)
    outputs = {"jsonl": str(out_dir / "detections.jsonl")}
    try:
        seconds, pipeline = _write_outputs(runner, source, shaper, out_dir, outputs, settings, on_frame)
    except _StoppedBeforeAnyFrame as stopped:
        signal.raise_signal(stopped.args[0])
        raise KeyboardInterrupt from None  # the handler from before let it pass
    frames = pipeline.written
    lost = server_lost(pipeline)
    stop_reason = STOP_SIGNALS.get(pipeline.stopped_by) or (f"{SERVER_LOST}: {lost}" if lost else source.stop_reason)
    first_hw = (source.size[1], source.size[0]) if source.size else None
    input_hw = shaper.input_hw(first_hw) if first_hw else runner.imgsz  # images: None when it varies
    return InferResult(
        frames=frames,
        skipped=source.skipped,
        seconds=round(seconds, 4),
        fps=round(frames / seconds, 2) if seconds > 0 else 0.0,
        stages_ms={k: round(v / frames * 1000, 3) for k, v in pipeline.seconds.items()},
        out_dir=str(out_dir),
        outputs=outputs,
        stop_reason=stop_reason,
        model=runner.description,
        source=source.name,
        input_hw=list(input_hw) if input_hw else None,
        batch=settings.batch,
    )
