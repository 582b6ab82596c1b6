"""``val``: mAP@0.5 and mAP@0.5:0.95 of any model on a labelled YOLOv5 dataset, by pycocotools.

The images go through what YOLOv5's val.py does to them: long side resized to ``imgsz`` (INTER_AREA
when shrinking), then padded (never enlarged) to the batch shape. A model that takes any input size
(.pt, fully dynamic ONNX) gets val.py's rectangular batches by default: images sorted by aspect ratio,
each batch padded to ``ceil(imgsz * ratio / stride + 0.5) * stride`` (352 for 320x320 images at
``imgsz`` 320); a fixed-size model gets its own input size. Detections are multi-label NMS
(conf 0.001, IoU 0.6, 300 per image) mapped back to original pixels and scored by COCOeval with
``maxDets`` raised to ``max_det``.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from se_deploy.evaluation.dataset import Dataset, load_dataset
from se_deploy.errors import SeDeployError
from se_deploy.inference.postprocess import non_max_suppression, scale_boxes
from se_deploy.inference.preprocess import LetterboxInfo, letterbox, read_image, to_input
from se_deploy.runners import Runner, load_runner

RECT_PAD = 0.5  # val.py's padding of rectangular batch shapes, in strides


@dataclass(frozen=True)
class Batch:
    """Indices into the dataset and the (h, w) input shape they are padded to."""

    indices: list[int]
    shape: tuple[int, int]


def image_size(path: Path) -> tuple[int, int]:
    """(h, w) of an image as OpenCV will decode it (EXIF rotation applied), from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
    except (OSError, SyntaxError):
        raise SeDeployError(f"{path}: cannot be read as an image") from None
    return h, w


def plan_batches(dataset: Dataset, imgsz: int | tuple[int, int], batch: int, rect: bool, stride: int) -> list[Batch]:
    """Batches in val.py's order and shapes: fixed ``imgsz`` (h, w), or rectangular shapes sorted by aspect."""
    n = len(dataset.images)
    if not rect:
        shape = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
        return [Batch(list(range(i, min(i + batch, n))), shape) for i in range(0, n, batch)]
    hw = np.array([image_size(p) for p in dataset.images], np.float64)
    aspect = hw[:, 0] / hw[:, 1]
    order = np.argsort(aspect, kind="stable")
    batches = []
    for i in range(0, n, batch):
        idx = order[i : i + batch]
        lo, hi = aspect[idx].min(), aspect[idx].max()
        ratio = (hi, 1.0) if hi < 1 else (1.0, 1 / lo) if lo > 1 else (1.0, 1.0)
        shape = tuple(int(math.ceil(r * imgsz / stride + RECT_PAD) * stride) for r in ratio)
        batches.append(Batch(idx.tolist(), shape))
    return batches


def fit_image(img: np.ndarray, long_side: int, shape: tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """val.py's geometry: resize the long side to ``long_side``, then pad to ``shape`` (shrinking only if needed)."""
    h0, w0 = img.shape[:2]
    r = long_side / max(h0, w0)
    if r != 1:
        interp = cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA
        img = cv2.resize(img, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
    h = img.shape[0]
    img, ratio, pad = letterbox(img, shape, auto=False, scaleup=False)
    return img, LetterboxInfo((h0, w0), h / h0 * ratio, pad)


def coco_map(dataset: Dataset, image_hw: list[tuple[int, int]], detections: list[np.ndarray], max_det: int) -> dict:
    """COCOeval (bbox) of detections in original pixels: overall and per-class AP at 0.5 and 0.5:0.95."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations = [], []
    for i, ((h, w), labels) in enumerate(zip(image_hw, dataset.labels), 1):
        images.append({"id": i, "width": w, "height": h})
        for cls, cx, cy, bw, bh in labels.tolist():
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cls) + 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": k + 1, "name": v} for k, v in dataset.names.items()]
    rows = [np.column_stack((np.full(len(d), i), d[:, 0], d[:, 1], d[:, 2] - d[:, 0], d[:, 3] - d[:, 1], d[:, 4],
                             d[:, 5] + 1)) for i, d in enumerate(detections, 1) if len(d)]
    per_class_ap = np.full((len(categories), 2), np.nan)
    if rows:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress with print()
            gt = COCO()
            gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
            gt.createIndex()
            evaluator = COCOeval(gt, gt.loadRes(np.concatenate(rows).astype(np.float64)), "bbox")
            evaluator.params.imgIds = [im["id"] for im in images]
            evaluator.params.maxDets = [1, 10, max_det]
            evaluator.evaluate()
            evaluator.accumulate()
        precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (IoU thresholds, recall points, classes), area all
        for k in range(len(categories)):
            p = precision[:, :, k]
            if (p > -1).any():
                per_class_ap[k] = p[0].mean(), p.mean()
    counts = np.bincount(np.concatenate([lb[:, 0] for lb in dataset.labels]).astype(int), minlength=dataset.nc)
    per_class_ap[(counts > 0) & np.isnan(per_class_ap[:, 0])] = 0.0  # labelled but never detected
    valid = ~np.isnan(per_class_ap[:, 0])
    per_class = [{"class": k, "name": dataset.names[k], "instances": int(counts[k]),
                  "map50": None if np.isnan(ap50) else float(ap50), "map50_95": None if np.isnan(ap) else float(ap)}
                 for k, (ap50, ap) in enumerate(per_class_ap)]
    return {"map50": float(per_class_ap[valid, 0].mean()) if valid.any() else 0.0,
            "map50_95": float(per_class_ap[valid, 1].mean()) if valid.any() else 0.0,
            "per_class": per_class}


def evaluate(model: str | Path | Runner, data: str | Path | Dataset, imgsz: int | tuple[int, int] | None = None,
             batch: int = 16,
             conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300, rect: bool | None = None,
             device: str | None = None, skip_bad_labels: bool = False, progress=None) -> dict:
    """mAP of ``model`` (a path or a Runner) on the ``val`` split of ``data`` (a DATA.yaml or a loaded Dataset).

    ``imgsz`` is the long side (default: the model's fixed input size, else 640), or a fixed-size model's
    own (h, w); ``rect`` defaults to True exactly when the model accepts any input size. ``progress`` is
    an optional rich Progress.
    """
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz) if imgsz is not None else None
    dataset = data if isinstance(data, Dataset) else load_dataset(data, "val", skip_bad=skip_bad_labels)
    if batch < 1:
        raise SeDeployError(f"--batch {batch}: must be at least 1")
    runner = model if isinstance(model, Runner) else load_runner(model, device=device)
    with contextlib.ExitStack() as stack:
        if not runner.is_active:
            stack.enter_context(runner)
        if runner.nc != dataset.nc:
            raise SeDeployError(f"{runner.path.name} predicts {runner.nc} classes but {dataset.yaml_path} has nc {dataset.nc}")
        if runner.imgsz:  # fixed input size: that is the size, and rectangular batches are impossible
            if hw is not None and hw != runner.imgsz and not (hw[0] == hw[1] == max(runner.imgsz)):
                raise SeDeployError(f"--imgsz {hw[0]},{hw[1]}: {runner.path.name} is built for "
                                    f"{runner.imgsz[0]}x{runner.imgsz[1]} input")
            if rect:
                raise SeDeployError(f"--rect: {runner.path.name} has a fixed input size")
            size, rect = runner.imgsz, False
        else:
            if hw is not None and hw[0] != hw[1]:
                raise SeDeployError(f"--imgsz {hw[0]},{hw[1]}: {runner.path.name} takes any size and val letterboxes "
                                    "the long side to --imgsz: give one number")
            size = math.ceil((hw[0] if hw else 640) / runner.stride) * runner.stride  # val.py rounds up the same way
            rect = True if rect is None else rect
        result = _run(runner, dataset, size, batch, conf_thres, iou_thres, max_det, rect, progress)
    return result


def _run(runner: Runner, dataset: Dataset, size, batch, conf_thres, iou_thres, max_det, rect, progress) -> dict:
    batches = plan_batches(dataset, size, batch, rect, runner.stride)
    long_side = size if isinstance(size, int) else max(size)
    n = len(dataset.images)
    detections: list[np.ndarray] = [None] * n
    image_hw: list[tuple[int, int]] = [None] * n
    seconds = np.zeros(3)
    task = progress.add_task(f"val {runner.path.name}", total=n) if progress is not None else None
    for b in batches:
        t0 = time.perf_counter()
        inputs, infos = [], []
        for i in b.indices:
            img, info = fit_image(read_image(dataset.images[i]), long_side, b.shape)
            inputs.append(to_input(img))
            infos.append(info)
            image_hw[i] = info.orig_hw
        t1 = time.perf_counter()
        pred = runner.infer(np.stack(inputs))
        t2 = time.perf_counter()
        dets = non_max_suppression(pred, conf_thres, iou_thres, max_det=max_det, multi_label=runner.nc > 1)
        for i, d, info in zip(b.indices, dets, infos):
            detections[i] = scale_boxes(d, info)
        seconds += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        if task is not None:
            progress.advance(task, len(b.indices))
    scores = coco_map(dataset, image_hw, detections, max_det)
    shapes = sorted({b.shape for b in batches})
    return {
        "model": str(runner.path),
        "backend": runner.backend,
        "precision": runner.precision,
        "device": runner.device,
        "data": str(dataset.yaml_path),
        "images": n,
        "instances": dataset.instances,
        **scores,
        "imgsz": long_side,
        "input_shapes": [list(s) for s in shapes],
        "rect": rect,
        "batch": batch,
        "conf": conf_thres,
        "iou": iou_thres,
        "max_det": max_det,
        "speed_ms": dict(zip(("preprocess", "inference", "nms"), (seconds * 1000 / n).round(3).tolist())),
        "missing_labels": len(dataset.missing_labels),
        "skipped_images": [str(p) for p in dataset.skipped],
        "label_problems": [str(p) for p in dataset.problems],
        "label_notices": dataset.notices,
        "evaluator": f"pycocotools COCOeval bbox, 101-point AP, area all, maxDets {max_det}",
    }
