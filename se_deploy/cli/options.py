"""Options every command spells the same way (docs/cli.md): their names, ranges and parsers.

A value out of range is a usage error, answered by ``cli.main`` with one ``error:`` line and exit 2
before any work starts.
"""

from __future__ import annotations

import re

import typer

from se_deploy.inference.preprocess import IMGSZ_RANGE

MAX_BATCH = 1024


def parse_imgsz(text: str | None) -> tuple[int, int] | None:
    """'640' -> (640, 640); '384,640' or '384x640' -> (384, 640); each side within IMGSZ_RANGE."""
    if text is None:
        return None
    sides = [s for s in re.split(r"[,x\s]+", str(text).strip().lower()) if s]
    if len(sides) not in (1, 2) or not all(s.isdigit() for s in sides):
        raise typer.BadParameter(f"{text}: expected H or H,W in pixels")
    h, w = int(sides[0]), int(sides[-1])
    low, high = IMGSZ_RANGE
    if not (low <= h <= high and low <= w <= high):
        raise typer.BadParameter(f"{text}: each side must be {low}-{high} px")
    return h, w


def parse_device(text: str | None) -> str | None:
    """cpu, cuda, cuda:N, N (= cuda:N) or tensorrt, normalised to lower case."""
    if text is None:
        return None
    device = str(text).strip().lower()
    if device.isdigit():
        return f"cuda:{int(device)}"
    if device in ("cpu", "cuda", "tensorrt") or re.fullmatch(r"cuda:\d+", device):
        return device
    raise typer.BadParameter(f"{text}: expected cpu, cuda, cuda:N, N or tensorrt")


def parse_classes(values: list[str] | None) -> list[int] | None:
    """--classes 0 --classes 2, or --classes 0,2 (checked against the model's class count later)."""
    if not values:
        return None
    items = [item for value in values for item in re.split(r"[,\s]+", value) if item]
    if not items or not all(item.isdigit() for item in items):
        raise typer.BadParameter(f"{' '.join(values)}: expected class indices (0,2 or repeated)")
    return [int(item) for item in items]


def model_option(help_text: str) -> typer.Option:
    return typer.Option(None, "--model", "-m", help=help_text, show_default=False)


def output_option(help_text: str) -> typer.Option:
    return typer.Option(None, "-o", "--output", help=help_text, show_default=False)


def imgsz_option(help_text: str = "Input size: H or H,W in pixels") -> typer.Option:
    return typer.Option(None, "--imgsz", help=help_text, callback=parse_imgsz, metavar="H[,W]", show_default=False)


def batch_option(default: int | None, help_text: str = "Images per inference call") -> typer.Option:
    return typer.Option(default, "--batch", help=help_text, min=1, max=MAX_BATCH, show_default=default is not None)


JsonFlag = typer.Option(False, "--json", help="Print the result as JSON on stdout (the table goes away)")
# `--json FILE` of earlier releases: cli.legacy turns it into this hidden option.
LegacyJsonFile = typer.Option(None, "--json-file", hidden=True)
DeviceOpt = typer.Option(None, "--device", callback=parse_device, show_default=False,
                         help="cpu, cuda, cuda:N, N or tensorrt (ONNX Runtime's TensorRT provider) [default: best]")
CfgOpt = typer.Option(None, "--cfg", help="Model YAML, needed when the checkpoint is a bare state_dict")
TrustOpt = typer.Option(False, "--trust-checkpoint", help="Allow any pickled class (only for files you trust)")
ConfOpt = typer.Option(0.25, "--conf", min=0.0, max=1.0, help="Confidence threshold (0-1)")
IouOpt = typer.Option(0.45, "--iou", min=0.0, max=1.0, help="NMS IoU threshold (0-1)")
MaxDetOpt = typer.Option(300, "--max-det", min=1, max=100_000, help="Most detections kept per image")
CalibOpt = typer.Option(None, "--calib", help="INT8: folder or glob of your own training images (never the val set)")
CalibSizeOpt = typer.Option(512, "--calib-size", min=1, help="INT8: most calibration images (spread over the set)")
CalibMethodOpt = typer.Option("entropy", "--calib-method", help="INT8 activation ranges: entropy (KL) or max")
