"""Parity of a deployed model (ONNX / TensorRT) with its PyTorch checkpoint on the same letterboxed images.

Two levels: raw output error (max/mean absolute, boxes in input pixels and scores separately, over every
anchor) and detection agreement after NMS (conf 0.25, IoU 0.45): the share of boxes, counted from both
sides, that have a partner of the same class with IoU >= 0.9. Limits depend on the model's precision.
The reference is always the FP32 checkpoint on CPU, so GPU TF32 cannot blur it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from se_deploy.errors import SeDeployError


@dataclass(frozen=True)
class Thresholds:
    boxes: float | None  # max abs error on cx, cy, w, h (input pixels); None: reported, not judged
    scores: float  # max abs error on objectness and class scores
    agreement: float  # minimum detection agreement


# Measured on the fixture (60 val images, 320 px; see README): FP32 ONNX Runtime 3.5e-4 px / 1.1e-6;
# FP16 ONNX 0.82 px / 1.5e-3 / 99.7%. INT8 Q/DQ models calibrated on real images: scores 0.11-0.31,
# agreement 64-93% (few boxes on 8 images make it noisy); broken calibrations (black or random images):
# scores 0.77-0.89, agreement 0%. The INT8 limits sit between the two. Errors on boxes are largest on
# background anchors with the widest priors, so INT8 box error is reported, not judged.
THRESHOLDS = {
    "fp32": Thresholds(boxes=1e-2, scores=1e-3, agreement=0.99),
    "fp16": Thresholds(boxes=4.0, scores=2e-2, agreement=0.95),
    "int8": Thresholds(boxes=None, scores=0.5, agreement=0.50),
}
CONF_THRES, IOU_THRES, MATCH_IOU = 0.25, 0.45, 0.9
CHUNK = 8  # images per inference call


@dataclass
class ParityReport:
    """The verdict and the figures behind it."""

    passed: bool
    precision: str
    model: str
    reference: str
    backend: str
    device: str
    images: int
    imgsz: tuple[int, int]
    max_abs_error: dict[str, float]  # {'boxes': px, 'scores': ...}
    mean_abs_error: dict[str, float]
    detection_agreement: float
    detections: dict[str, int]  # {'reference': n, 'model': n}
    thresholds: Thresholds
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["imgsz"] = list(self.imgsz)
        return data

    def figure_lines(self) -> list[str]:
        """The error and agreement figures against their limits, one line each, for display."""
        limits, high, mean = self.thresholds, self.max_abs_error, self.mean_abs_error
        box_limit = "not judged" if limits.boxes is None else f"limit {limits.boxes:g}"
        return [
            f"boxes  max abs {high['boxes']:.3g} px ({box_limit}), mean {mean['boxes']:.3g}",
            f"scores max abs {high['scores']:.3g} (limit {limits.scores:g}), mean {mean['scores']:.3g}",
            f"detections agree {self.detection_agreement:.1%} (limit {limits.agreement:.0%}; "
            f"{self.detections['model']} vs {self.detections['reference']} boxes, IoU >= {MATCH_IOU}, same class)",
        ]


def _input_size(runner, reference) -> tuple[int, int]:
    """The size to letterbox to: the model's fixed input, else its metadata, else 640."""
    size = runner.imgsz
    if size is None:
        meta = getattr(runner, "metadata", {}) or {}
        from se_deploy.export.onnx_metadata import OnnxMetadata

        size = OnnxMetadata.from_props(meta).imgsz or (640, 640)
    stride = reference.stride
    if size[0] % stride or size[1] % stride:
        raise SeDeployError(
            f"{runner.path.name}: input {size[0]}x{size[1]} is not a multiple of {reference.path.name}'s stride "
            f"{stride}; this model was not exported from these weights"
        )
    return tuple(size)


def _check_same_model(runner, reference, pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape[2] != ref.shape[2]:
        raise SeDeployError(
            f"{runner.path.name} predicts {pred.shape[2] - 5} classes but {reference.path.name} has "
            f"{ref.shape[2] - 5}; this model was not exported from these weights"
        )
    if pred.shape[1] != ref.shape[1]:
        raise SeDeployError(
            f"{runner.path.name} gives {pred.shape[1]} anchors but {reference.path.name} gives {ref.shape[1]} at the "
            "same input size; this model was not exported from these weights"
        )


def _provenance_note(runner, weights: Path) -> list[str]:
    from se_deploy.artifacts import sha256_file

    recorded = (getattr(runner, "metadata", {}) or {}).get("source_sha256")
    if recorded and recorded != sha256_file(weights):
        return [f"{runner.path.name} records a different source checkpoint (sha256 {recorded[:12]}...)"]
    return []


def compare_runners(runner, reference, images: list[Path], precision: str, imgsz: tuple[int, int]) -> ParityReport:
    """Run two active runners on the same letterboxed images; judge ``runner`` by the limits for ``precision``.

    Statistics are gathered per chunk of images, so memory stays flat for any number of images.
    """
    from se_deploy.inference.postprocess import detection_agreement, non_max_suppression
    from se_deploy.inference.preprocess import Letterboxer, read_image

    if precision not in THRESHOLDS:
        raise SeDeployError(f"--precision {precision}: expected one of {', '.join(THRESHOLDS)}")
    letterboxer = Letterboxer(imgsz, max_batch=CHUNK)
    max_abs, abs_sum, count = {"boxes": 0.0, "scores": 0.0}, {"boxes": 0.0, "scores": 0.0}, {"boxes": 0, "scores": 0}
    dets_ref, dets_pred = [], []
    for start in range(0, len(images), CHUNK):
        batch, _ = letterboxer.prepare([read_image(p) for p in images[start : start + CHUNK]])
        ref = reference.infer(batch)
        pred = runner.infer(batch)
        _check_same_model(runner, reference, pred, ref)
        diff = np.abs(pred.astype(np.float64) - ref)
        for key, part in (("boxes", diff[..., :4]), ("scores", diff[..., 4:])):
            max_abs[key] = max(max_abs[key], float(part.max()))
            abs_sum[key] += float(part.sum())
            count[key] += part.size
        dets_ref += non_max_suppression(ref, CONF_THRES, IOU_THRES)
        dets_pred += non_max_suppression(pred, CONF_THRES, IOU_THRES)
    agreement = detection_agreement(dets_ref, dets_pred, MATCH_IOU)

    limits = THRESHOLDS[precision]
    failures = []
    if limits.boxes is not None and not max_abs["boxes"] <= limits.boxes:
        failures.append(f"max abs error on boxes {max_abs['boxes']:.3g} px > {limits.boxes:g} px")
    if not max_abs["scores"] <= limits.scores:
        failures.append(f"max abs error on scores {max_abs['scores']:.3g} > {limits.scores:g}")
    if not agreement >= limits.agreement:
        failures.append(f"detection agreement {agreement:.1%} < {limits.agreement:.0%}")
    return ParityReport(
        passed=not failures, precision=precision, model=str(runner.path), reference=str(reference.path),
        backend=runner.backend, device=runner.device, images=len(images), imgsz=tuple(imgsz), max_abs_error=max_abs,
        mean_abs_error={key: abs_sum[key] / max(count[key], 1) for key in abs_sum}, detection_agreement=agreement,
        detections={"reference": sum(map(len, dets_ref)), "model": sum(map(len, dets_pred))},
        thresholds=limits, failures=failures,
    )


def run_parity_check(
    model_path: str | Path,
    weights: str | Path,
    images: str | Path | None = None,
    precision: str | None = None,
    *,
    device: str | None = None,
    cfg: str | Path | None = None,
    trust: bool = False,
) -> ParityReport:
    """Compare ``model_path`` (.onnx/.engine, or a Triton model's URL) with the checkpoint ``weights`` on ``images``
    (default: bundled).

    An ONNX model runs on ONNX Runtime's CPU provider unless ``device`` names another.
    """
    from se_deploy.artifacts import DEMO_IMAGES
    from se_deploy.inference.preprocess import image_paths
    from se_deploy.runners import is_model_url, load_runner
    from se_deploy.runners.torch_runner import TorchRunner

    weights = Path(weights)
    suffix = "" if is_model_url(model_path) else Path(model_path).suffix.lower()  # a Triton URL stays a string
    if suffix == ".pt":
        raise SeDeployError(f"{model_path}: give the exported model (.onnx, .engine) to check, not a checkpoint")
    if precision is not None and precision.lower() not in THRESHOLDS:
        raise SeDeployError(f"--precision {precision}: expected one of {', '.join(THRESHOLDS)}")
    files = image_paths(images if images is not None else DEMO_IMAGES)
    if device is None and suffix == ".onnx":
        device = "cpu"  # judge the graph, not a GPU provider's TF32 or kernel choices
    reference = TorchRunner(weights, device="cpu", cfg=cfg, trust=trust)  # whatever its name: the loader judges it
    with load_runner(model_path, device=device) as runner, reference:
        if runner.nc and runner.nc != reference.nc:
            raise SeDeployError(
                f"{runner.path.name} has {runner.nc} classes but {weights.name} has {reference.nc}; "
                "this model was not exported from these weights"
            )
        report = compare_runners(runner, reference, files, (precision or runner.precision).lower(),
                                 _input_size(runner, reference))
        report.notes += _provenance_note(runner, weights)
    return report
