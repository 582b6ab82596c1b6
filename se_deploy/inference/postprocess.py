"""Detections from raw YOLOv5 output: class-aware NMS, rescaling to the original image, matching.

All NumPy/OpenCV, vectorised per image (OpenCV's C++ NMS), no torch.
"""

from __future__ import annotations

import cv2
import numpy as np

from se_deploy.inference.preprocess import LetterboxInfo

MAX_WH = 7680  # class offset for class-aware NMS: larger than any image side
MAX_NMS = 30000  # boxes handed to NMS at most, highest confidence first
EMPTY = np.zeros((0, 6), np.float32)


def xywh2xyxy(xywh: np.ndarray) -> np.ndarray:
    """Centre/size boxes to corner boxes."""
    half = xywh[:, 2:4] / 2
    return np.concatenate((xywh[:, :2] - half, xywh[:, :2] + half), axis=1)


def non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45, classes=None, max_det=300, multi_label=False,
                        agnostic=False) -> list[np.ndarray]:
    """Per image, rows [x1, y1, x2, y2, conf, cls] (input pixels) surviving confidence filter and NMS.

    conf = objectness * class score. ``multi_label`` keeps every class above the threshold for a box
    (what mAP evaluation uses); otherwise only the best class.
    """
    results = []
    for x in np.asarray(pred, dtype=np.float32):
        x = x[x[:, 4] > conf_thres]
        if not len(x):
            results.append(EMPTY)
            continue
        scores = x[:, 5:] * x[:, 4:5]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            rows, cls = np.nonzero(scores > conf_thres)
            conf = scores[rows, cls]
            boxes = boxes[rows]
        else:
            cls = scores.argmax(1)
            conf = scores[np.arange(len(scores)), cls]
            keep = conf > conf_thres
            boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
        if classes is not None:
            keep = np.isin(cls, classes)
            boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
        if not len(conf):
            results.append(EMPTY)
            continue
        order = np.argsort(-conf, kind="stable")[:MAX_NMS]
        boxes, conf, cls = boxes[order], conf[order], cls[order]
        keep = nms(boxes + (0 if agnostic else cls[:, None] * MAX_WH), conf, iou_thres, max_det)
        results.append(np.concatenate((boxes[keep], conf[keep, None], cls[keep, None]), 1).astype(np.float32))
    return results


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_thres: float, max_det: int | None = None) -> np.ndarray:
    """Greedy NMS (OpenCV); indices of the kept boxes (the first ``max_det`` of them), highest score first.

    Greedy NMS decides each box by the higher-scored boxes alone, so NMS over only the top-scored
    candidates keeps the same first boxes as NMS over all of them. It starts with a few times
    ``max_det`` candidates and widens until ``max_det`` boxes survive: at mAP's conf 0.001, where
    thousands of boxes survive, that is several times faster than running over all of them.
    """
    xywh = np.concatenate((boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]), 1).astype(np.float64)
    scores = scores.astype(np.float32)
    top_k = 4 * max_det if max_det else len(scores)
    while True:
        top_k = min(top_k, len(scores))
        keep = cv2.dnn.NMSBoxes(xywh, scores, 0.0, float(iou_thres), top_k=top_k)
        if top_k == len(scores) or len(keep) >= max_det:
            break
        top_k *= 4
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    return keep[np.argsort(-scores[keep], kind="stable")][:max_det]


def scale_boxes(dets: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map detection boxes from network-input pixels back to the original image, clipped to it."""
    out = dets.copy()
    out[:, [0, 2]] -= info.pad[0]
    out[:, [1, 3]] -= info.pad[1]
    out[:, :4] /= info.ratio
    h, w = info.orig_hw
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shape (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:4] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:4] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def match_detections(a: np.ndarray, b: np.ndarray, iou_thres: float = 0.9) -> int:
    """Number of one-to-one pairs (same class, IoU >= threshold), best IoU first."""
    if not len(a) or not len(b):
        return 0
    iou = box_iou(a, b) * (a[:, None, 5] == b[None, :, 5])
    rows, cols = np.nonzero(iou >= iou_thres)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_a, used_b = set(), set()
    for r, c in zip(rows[order], cols[order]):
        if r not in used_a and c not in used_b:
            used_a.add(r)
            used_b.add(c)
    return len(used_a)


def detection_agreement(dets_a: list[np.ndarray], dets_b: list[np.ndarray], iou_thres: float = 0.9) -> float:
    """Share of all boxes, from both sides, that have a partner on the other side (1.0 when both are empty)."""
    matched = sum(match_detections(a, b, iou_thres) for a, b in zip(dets_a, dets_b))
    total = sum(len(a) + len(b) for a, b in zip(dets_a, dets_b))
    return 1.0 if total == 0 else 2 * matched / total
