"""``export`` (checkpoint -> clean ONNX, with a parity check) and ``check`` (deployed model vs checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from se_deploy.cli import app
from se_deploy.cli.output import EXIT_CHECK_FAILED, err, out, print_check
from se_deploy.errors import SeDeployError


CfgOpt = typer.Option(None, "--cfg", help="Model YAML, needed when the checkpoint is a bare state_dict")
TrustOpt = typer.Option(False, "--trust-checkpoint", help="Allow any pickled class (only for files you trust)")
JsonOpt = typer.Option(None, "--json", help="Also write the report as JSON to this file", show_default=False)


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        from se_deploy.artifacts import write_text_atomic

        write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _dims(shape) -> str:
    """(1, 3, 640, 640) -> 1x3x640x640; a named (dynamic) axis shows as N."""
    return "x".join(str(d) if isinstance(d, int) else "N" for d in shape)


def _print_parity(report) -> None:
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    out.print(
        f"parity ({report.backend} {report.precision} on {report.device} vs PyTorch fp32 on cpu, "
        f"{report.images} images at {report.imgsz[0]}x{report.imgsz[1]}): {verdict}"
    )
    print_check(report.figure_lines(), report.failures, report.notes)


@app.command()
def export(
    weights: Path = typer.Argument(..., help="YOLOv5 checkpoint (.pt)", show_default=False),
    output: Path = typer.Option(None, "-o", "--output", help="ONNX file to write (default: engines/<stem>.onnx)"),
    imgsz: int = typer.Option(640, "--imgsz", help="Input size (rounded up to a multiple of the largest stride)"),
    batch: int = typer.Option(None, "--batch", help="Static batch size (default: 1)", show_default=False),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic batch axis instead of a static batch"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (13-20)"),
    no_simplify: bool = typer.Option(False, "--no-simplify", help="Skip onnxsim/onnxslim"),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check against PyTorch"),
    json_file: Path = JsonOpt,
    cfg: Path = CfgOpt,
    trust_checkpoint: bool = TrustOpt,
) -> None:
    """Export a checkpoint to a clean ONNX (fused, simplified, canonical SE blocks) and prove parity."""
    from se_deploy.export.onnx_export import export_onnx
    from se_deploy.export.se_graph_pass import CANONICAL

    if dynamic and batch is not None:
        raise SeDeployError("--batch and --dynamic exclude each other: a dynamic-batch model takes any batch")
    with err.status("exporting") as status:
        report = export_onnx(
            weights, output, imgsz=imgsz, batch=batch or 1, dynamic=dynamic, opset=opset, simplify=not no_simplify,
            check=not no_check, cfg=cfg, trust=trust_checkpoint, progress=lambda message: status.update(message),
        )
    for notice in report.notices:
        err.print(f"notice: {notice}")
    batch_dim = "batch" if report.dynamic else report.batch
    out.print(f"[bold]{report.onnx}[/bold]  opset {report.opset}, input {_dims([batch_dim, 3, *report.imgsz])}, "
              f"output {_dims(report.output_shape)}, {report.seconds:.1f} s")
    nodes = report.nodes
    simplified = f" -> {nodes['simplified']} after {report.simplifier}" if report.simplifier else " (not simplified)"
    out.print(f"  nodes: {nodes['exported']} exported{simplified} -> {nodes['final']} final")
    se = report.se
    out.print(f"  SE blocks: {se.found} found, {se.rewritten} rewritten to {' -> '.join(CANONICAL)}"
              + (f", {len(se.skipped)} left as they were" if se.skipped else ""))
    if report.parity is not None:
        _print_parity(report.parity)
    _write_json(json_file, report.to_dict())
    if report.parity is not None and not report.parity.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def check(
    model: str = typer.Argument(..., help="Deployed model (.onnx, .engine, or grpc://HOST:PORT/NAME)",
                                show_default=False),
    weights: Path = typer.Option(..., "--weights", help="The checkpoint it was made from (.pt)", show_default=False),
    images: Path = typer.Option(None, "--images", help="Image folder or glob (default: the bundled images)"),
    precision: str = typer.Option(None, "--precision", help="Limits for fp32, fp16 or int8 (default: the model's)"),
    device: str = typer.Option(None, "--device", help="cpu, cuda or tensorrt (default: cpu for ONNX)"),
    json_file: Path = JsonOpt,
    cfg: Path = CfgOpt,
    trust_checkpoint: bool = TrustOpt,
) -> None:
    """Run the model and its PyTorch checkpoint on the same images; exit 1 if they disagree."""
    from se_deploy.evaluation.parity import run_parity_check

    with err.status("checking parity"):
        report = run_parity_check(model, weights, images, precision, device=device, cfg=cfg, trust=trust_checkpoint)
    _print_parity(report)
    _write_json(json_file, report.to_dict())
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
