"""``val`` (mAP of one model on a labelled dataset) and ``report`` (accuracy vs speed of every precision)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from se_deploy.cli import app
from se_deploy.cli.options import (
    CalibOpt,
    CalibSizeOpt,
    DeviceOpt,
    JsonFlag,
    batch_option,
    imgsz_option,
    model_option,
)
from se_deploy.cli.output import EXIT_CHECK_FAILED, deprecated, err, finish
from se_deploy.errors import SeDeployError


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
    model: str = model_option("Model: .pt, .onnx (FP32/FP16/INT8), .engine or a Triton model URL "
                              "[default: the newest in engines/]"),
    data: Path = DataOpt,
    imgsz: str = imgsz_option("Long side in px [default: the model's input size, else 640]"),
    batch: int = batch_option(16),
    conf: float = typer.Option(0.001, "--conf", min=0.0, max=1.0, help="Confidence threshold (0-1)"),
    iou: float = typer.Option(0.6, "--iou", min=0.0, max=1.0, help="NMS IoU threshold (0-1)"),
    max_det: int = typer.Option(300, "--max-det", min=1, max=100_000, help="Detections kept per image"),
    rect: bool = typer.Option(None, "--rect/--no-rect",
                              help="Rectangular batches like val.py [default: on for models that take any size]"),
    device: str = DeviceOpt,
    skip_bad_labels: bool = SkipBadOpt,
    as_json: bool = JsonFlag,
) -> None:
    """mAP@0.5 and mAP@0.5:0.95 (pycocotools), overall and per class, of any model on a YOLOv5 dataset."""
    from se_deploy.evaluation.evaluate import evaluate
    from se_deploy.model_select import resolve_model

    model = resolve_model(model, say=err.print)
    with Progress(console=err, transient=True, disable=not sys.stderr.isatty()) as progress:
        result = evaluate(model, data, imgsz=imgsz, batch=batch, conf_thres=conf, iou_thres=iou, max_det=max_det,
                          rect=rect, device=device, skip_bad_labels=skip_bad_labels, progress=progress)
    _warn_about_labels(result)
    finish(result, as_json, None, lambda: _print_val(result))


def _print_val(result: dict) -> None:
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
    calib: Path = CalibOpt,
    calib_size: int = CalibSizeOpt,
    imgsz: str = imgsz_option("Square input size of every artifact, a multiple of 32 [default: 640]"),
    batch: int = batch_option(1, "Static batch of the artifacts, for latency and throughput"),
    iters: int = typer.Option(100, "--iters", min=1, help="Timed runs per artifact"),
    max_map_drop: float = typer.Option(None, "--max-map-drop", min=0.0,
                                       help="mAP@0.5:0.95 points INT8 may lose; the most sensitive layers then "
                                            "stay out of INT8 (an int8-mixed row)"),
    workdir: Path = typer.Option(Path("engines"), "--workdir", help="Where artifacts are made and reused"),
    out_dir: Path = typer.Option(None, "--out-dir", show_default=False,
                                 help="Folder for report.md/.json/.png [default: WORKDIR/<stem>-report]"),
    trt: bool = typer.Option(None, "--trt/--no-trt", help="Build TensorRT engines [default: when usable]"),
    device: str = DeviceOpt,
    skip_bad_labels: bool = SkipBadOpt,
    as_json: bool = JsonFlag,
    old_out: Path = typer.Option(None, "--out", hidden=True),
) -> None:
    """Export, quantize and build what is missing, then one table: accuracy, size, speed and parity per artifact."""
    from se_deploy.evaluation.report import COLUMNS, build_report, cells, write_report

    if old_out is not None:
        deprecated("report --out DIR", "report --out-dir DIR")
        out_dir = out_dir or old_out
    side = 640 if imgsz is None else imgsz[0]
    if imgsz is not None and imgsz[0] != imgsz[1]:
        raise SeDeployError(f"--imgsz {imgsz[0]},{imgsz[1]}: report exports every artifact square; give one number")
    with Progress(console=err, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("report", total=None)
        result = build_report(weights, data, precisions, calib=calib, calib_size=calib_size, imgsz=side, batch=batch,
                              workdir=workdir, max_map_drop=max_map_drop, iters=iters, device=device, trt=trt,
                              skip_bad_labels=skip_bad_labels, progress=progress,
                              say=lambda message: progress.update(task, description=message))
    paths = write_report(result, out_dir or workdir / f"{weights.stem}-report")

    def human() -> None:
        table = Table(*(title for title, _ in COLUMNS),
                      title=f"{weights.name} on {result['images']} images at {side} px (Δ vs PyTorch)")
        for row in result["rows"]:
            table.add_row(*cells(row))
        console = _stdout()
        console.print(table)
        for note in result["notes"]:
            console.print(f"note: {note}", soft_wrap=True)
        console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}", soft_wrap=True)

    finish({**result, "files": {kind: str(path) for kind, path in paths.items()}}, as_json, None, human)
    if result["rejected"] or any(row["parity"] == "FAIL" for row in result["rows"]):
        raise typer.Exit(EXIT_CHECK_FAILED)  # ran, but an artifact failed its check
