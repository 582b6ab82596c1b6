"""``val`` (mAP of one model on a labelled dataset) and ``report`` (accuracy vs speed of every precision)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from se_deploy.cli import app

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    """Rich console for tables: the terminal's width, or wide enough to keep a table whole in pipes and logs."""
    return Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=160)

DataOpt = typer.Option(..., "--data", help="YOLOv5 DATA.yaml (path, val, nc, names; YOLO txt labels beside the images)")
SkipBadOpt = typer.Option(False, "--skip-bad-labels",
                          help="Leave out images whose label file has bad lines (listed) instead of refusing the set")


def _warn_about_labels(result: dict) -> None:
    """Missing, skipped and repaired labels go to stderr, one line each."""
    if result["missing_labels"]:
        err.print(f"warning: {result['missing_labels']} image(s) have no label file and count as background")
    for problem in result["label_problems"]:
        err.print(f"warning: skipped image, bad label: {problem}")
    for notice in result["label_notices"]:
        err.print(f"warning: {notice}")


@app.command("val")
def val(
    model: str = typer.Option(..., "--model",
                              help="Model: .pt, .onnx (FP32/FP16/INT8), .engine or a Triton model URL"),
    data: Path = DataOpt,
    imgsz: int = typer.Option(None, "--imgsz", help="Long side in px (default: the model's input size, else 640)"),
    batch: int = typer.Option(16, "--batch", help="Images per inference call"),
    conf: float = typer.Option(0.001, "--conf", help="Confidence threshold"),
    iou: float = typer.Option(0.6, "--iou", help="NMS IoU threshold"),
    max_det: int = typer.Option(300, "--max-det", help="Detections kept per image"),
    rect: bool = typer.Option(None, "--rect/--no-rect",
                              help="Rectangular batches like val.py (default: on for models that take any size)"),
    device: str = typer.Option(None, "--device", help="cpu, cuda or tensorrt (default: best available)"),
    skip_bad_labels: bool = SkipBadOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """mAP@0.5 and mAP@0.5:0.95 (pycocotools), overall and per class, of any model on a YOLOv5 dataset."""
    from se_deploy.evaluation.evaluate import evaluate

    with Progress(console=err, transient=True, disable=not sys.stderr.isatty()) as progress:
        result = evaluate(model, data, imgsz=imgsz, batch=batch, conf_thres=conf, iou_thres=iou, max_det=max_det,
                          rect=rect, device=device, skip_bad_labels=skip_bad_labels, progress=progress)
    _warn_about_labels(result)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    shapes = ", ".join("x".join(map(str, s)) for s in result["input_shapes"])
    console = _stdout()
    console.print(f"{result['model']}: {result['backend']} {result['precision']} on {result['device']}, input {shapes}")
    table = Table("class", "images", "instances", "mAP@0.5", "mAP@0.5:0.95")
    table.add_row("all", str(result["images"]), str(result["instances"]), f"{result['map50']:.4f}",
                  f"{result['map50_95']:.4f}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731  (no labelled object of that class)
    for c in result["per_class"]:
        table.add_row(c["name"], "", str(c["instances"]), fmt(c["map50"]), fmt(c["map50_95"]))
    console.print(table)
    speed = result["speed_ms"]
    console.print(f"speed per image: {speed['preprocess']:.1f} ms pre-process, {speed['inference']:.1f} ms inference, "
                  f"{speed['nms']:.1f} ms NMS (batch {result['batch']})")


@app.command("report")
def report(
    weights: Path = typer.Argument(..., help="YOLOv5 checkpoint (.pt)", show_default=False),
    data: Path = DataOpt,
    precisions: str = typer.Option("fp32,fp16,int8", "--precisions", help="Comma-separated: fp32, fp16, int8"),
    calib: Path = typer.Option(None, "--calib", help="Calibration images for INT8 (folder or glob)"),
    calib_size: int = typer.Option(256, "--calib-size", help="Calibration images used at most"),
    imgsz: int = typer.Option(640, "--imgsz", help="Input size of every artifact (multiple of 32)"),
    batch: int = typer.Option(1, "--batch", help="Static batch of the artifacts, for latency and throughput"),
    iters: int = typer.Option(100, "--iters", help="Timed runs per artifact"),
    max_map_drop: float = typer.Option(None, "--max-map-drop",
                                       help="mAP@0.5:0.95 points INT8 may lose; the most sensitive layers then "
                                            "stay out of INT8 (an int8-mixed row)"),
    workdir: Path = typer.Option(Path("engines"), "--workdir", help="Where artifacts are made and reused"),
    out: Path = typer.Option(None, "--out", help="Folder for report.md/.json/.png [default: WORKDIR/<stem>-report]"),
    trt: bool = typer.Option(None, "--trt/--no-trt", help="Build TensorRT engines [default: when usable]"),
    device: str = typer.Option(None, "--device", help="Where ONNX models run: cpu, cuda, tensorrt [default: best]"),
    skip_bad_labels: bool = SkipBadOpt,
) -> None:
    """Export, quantize and build what is missing, then one table: accuracy, size, speed and parity per artifact."""
    from se_deploy.evaluation.report import COLUMNS, build_report, cells, write_report

    with Progress(console=err, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("report", total=None)
        result = build_report(weights, data, precisions, calib=calib, calib_size=calib_size, imgsz=imgsz, batch=batch,
                              workdir=workdir, max_map_drop=max_map_drop, iters=iters, device=device, trt=trt,
                              skip_bad_labels=skip_bad_labels, progress=progress,
                              say=lambda message: progress.update(task, description=message))
    paths = write_report(result, out or workdir / f"{weights.stem}-report")
    table = Table(*(title for title, _ in COLUMNS),
                  title=f"{weights.name} on {result['images']} images at {imgsz} px (Δ vs PyTorch)")
    for row in result["rows"]:
        table.add_row(*cells(row))
    console = _stdout()
    console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}", soft_wrap=True)
    if result["rejected"] or any(row["parity"] == "FAIL" for row in result["rows"]):
        raise typer.Exit(1)  # ran, but an artifact failed its check
