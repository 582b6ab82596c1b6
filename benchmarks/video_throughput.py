"""End-to-end video FPS of `se-deploy infer` against backend-only throughput and a detect.py-style loop.

On the same frames of one clip, with one activated runner, it times:
  backend   runner.infer alone on frames decoded and letterboxed beforehand (the ceiling),
  pipeline  the threaded pipeline (decode, letterbox, infer, NMS, draw, encode, JSONL), as `infer` runs it,
  loop      a plain per-frame loop: read, letterbox, infer, NMS, draw, write (the way detect.py works).
Each repeat runs backend, pipeline, backend, loop; the medians and the per-repeat ratios are printed.

    python benchmarks/video_throughput.py                                   # fixture clip, upstream ONNX at 320
    python benchmarks/video_throughput.py --model engines/m.engine --video clip.mp4 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from se_deploy.inference.annotate import Annotator  # noqa: E402
from se_deploy.inference.postprocess import non_max_suppression, scale_boxes  # noqa: E402
from se_deploy.inference.preprocess import LetterboxInfo, letterbox, to_input  # noqa: E402
from se_deploy.runners import load_runner  # noqa: E402
from se_deploy.inference.sources import open_source  # noqa: E402
from se_deploy.inference.video_pipeline import InferSettings, InputShaper, detection_records, run_inference  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"


def backend_only(runner, frames, input_hw, batch) -> float:
    """FPS of runner.infer alone, on the clip's frames letterboxed beforehand."""
    inputs = np.stack([to_input(letterbox(f, input_hw)[0]) for f in frames])
    start = time.perf_counter()
    for i in range(0, len(inputs), batch):
        runner.infer(inputs[i : i + batch])
    return len(inputs) / (time.perf_counter() - start)


def pipeline(runner, video, out, batch, helper_nice=None, video_codec="mjpeg") -> float:
    """FPS of the threaded pipeline, writing the annotated video and the JSONL."""
    settings = InferSettings(batch=batch, helper_nice=helper_nice, video_codec=video_codec)
    with open_source(video) as source:
        return run_inference(runner, source, out, settings).fps


def plain_loop(runner, video, out, input_hw) -> float:
    """FPS of a sequential per-frame loop doing the same work, writing detect.py's mp4v video."""
    cap = cv2.VideoCapture(video)
    w, h, fps = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), cap.get(cv2.CAP_PROP_FPS)
    writer = cv2.VideoWriter(str(out / "loop.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    annotator = Annotator(runner.names, (h, w))
    start, n = time.perf_counter(), 0
    with open(out / "loop.jsonl", "w") as jsonl:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            img, ratio, pad = letterbox(frame, input_hw)
            pred = runner.infer(to_input(img)[None])
            dets = scale_boxes(non_max_suppression(pred)[0], LetterboxInfo((h, w), ratio, pad))
            annotator.draw(frame, dets)
            writer.write(frame)
            jsonl.write(json.dumps({"frame": n, "detections": detection_records(dets, runner.names)}) + "\n")
            n += 1
    writer.release()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURES / "onnx" / "upstream-export-320.onnx"))
    parser.add_argument("--video", default=str(REPO / "se_deploy" / "assets" / "synth_shapes_60f.mp4"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    parser.add_argument("--imgsz", type=int, default=320, help="letterbox size for models of any input size")
    parser.add_argument("--helper-nice", type=int, default=None, help="as `infer --helper-nice` (default: infer's)")
    parser.add_argument("--video-codec", default="mjpeg", help="as `infer --video-codec` (default: infer's)")
    args = parser.parse_args()

    options = {"threads": args.threads} if args.model.endswith(".onnx") and args.threads else {}
    with load_runner(args.model, device=args.device, **options) as runner:
        cap = cv2.VideoCapture(args.video)
        frames = []
        while (frame := cap.read()[1]) is not None:
            frames.append(frame)
        input_hw = InputShaper(runner, InferSettings(imgsz=(args.imgsz, args.imgsz))).input_hw(frames[0].shape[:2])
        runner.infer(np.zeros((args.batch, 3, *input_hw), np.float32))  # warm-up
        print(f"{runner.description}; {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]} -> "
              f"{input_hw[0]}x{input_hw[1]}, batch {args.batch}")
        measures = {"backend": lambda: backend_only(runner, frames, input_hw, args.batch),
                    "pipeline": lambda: pipeline(runner, args.video, Path(tmp), args.batch, args.helper_nice,
                                                 args.video_codec),
                    "loop": lambda: plain_loop(runner, args.video, Path(tmp), input_hw)}
        runs = {name: [] for name in measures}
        cpu_ms = {name: [] for name in measures}  # process CPU time per frame, all threads
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeat):
                for name in ("backend", "pipeline", "backend", "loop"):  # the pipeline between two backend runs
                    cpu = time.process_time()
                    runs[name].append(measures[name]())
                    cpu_ms[name].append((time.process_time() - cpu) * 1000 / len(frames))
    for name, values in runs.items():
        print(f"{name:9s} median {statistics.median(values):7.2f} FPS, {statistics.median(cpu_ms[name]):6.1f} "
              f"CPU-ms/frame   runs: {', '.join(f'{v:.2f}' for v in values)}")
    # Each ratio is taken within one repeat (against the mean of the backend runs just before and after the
    # pipeline, which cancels a steady drift), then the median over repeats is printed: on a shared machine
    # the speed drifts between repeats far more than between neighbouring runs.
    backend = [(a + b) / 2 for a, b in zip(runs["backend"][::2], runs["backend"][1::2])]
    for name, reference in (("backend", backend), ("loop", runs["loop"])):
        ratios = [p / r for p, r in zip(runs["pipeline"], reference)]
        print(f"pipeline / {name:7s} = {statistics.median(ratios):.3f}   (per repeat: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")

if __name__ == "__main__":
    main()
