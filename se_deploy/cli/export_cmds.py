"""``export`` (checkpoint -> clean ONNX, with a parity check) and ``check`` (deployed model vs checkpoint)."""

from __future__ import annotations

from pathlib import Path

import typer

from se_deploy.cli import app
from se_deploy.cli.options import (
    CfgOpt,
    DeviceOpt,
    JsonFlag,
    LegacyJsonFile,
    TrustOpt,
    batch_option,
    imgsz_option,
    model_option,
    output_option,
)
from se_deploy.cli.output import EXIT_CHECK_FAILED, deprecated, err, finish, out, print_check


def _dims(shape) -> str:
    """(1, 3, 640, 640) -> 1x3x640x640; a named (dynamic) axis shows as its name."""
    return "x".join(str(d) for d in shape)


def _print_parity(report) -> None:
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    out.print(
        f"parity ({report.backend} {report.precision} on {report.device} vs PyTorch fp32 on cpu, "
        f"{report.images} images at {report.imgsz[0]}x{report.imgsz[1]}): {verdict}"
    )
    print_check(report.figure_lines(), report.failures, report.notes)


def _print_export(report) -> None:
    from se_deploy.export.se_graph_pass import canonical

    out.print(f"[bold]{report.onnx}[/bold]  opset {report.opset}, input {_dims(report.input_shape)}, "
              f"output {_dims(report.output_shape)}, {report.seconds:.1f} s")
    nodes = report.nodes
    simplified = f" -> {nodes['simplified']} after {report.simplifier}" if report.simplifier else " (not simplified)"
    out.print(f"  nodes: {nodes['exported']} exported{simplified} -> {nodes['final']} final")
    se = report.se
    gates = dict.fromkeys(block.gate for block in se.blocks) or ["sigmoid"]  # each gate once, in graph order
    chains = " / ".join(" -> ".join(canonical(gate)) for gate in gates)
    out.print(f"  SE blocks: {se.found} found, {se.rewritten} rewritten to {chains}"
              + (f", {len(se.skipped)} left as they were" if se.skipped else ""))
    if report.parity is not None:
        _print_parity(report.parity)


@app.command()
def export(
    weights: Path = typer.Argument(..., help="YOLOv5 checkpoint (.pt)", show_default=False),
    output: Path = output_option("ONNX file to write [default: engines/<weights stem>.onnx]"),
    imgsz: str = imgsz_option("Input size H or H,W, rounded up to a multiple of the largest stride [default: 640]"),
    batch: int = batch_option(None, "Static batch size [default: 1]"),
    dynamic: bool = typer.Option(False, "--dynamic",
                                 help="Dynamic batch; height and width stay fixed (fastest engines, Triton batching)"),
    dynamic_size: bool = typer.Option(False, "--dynamic-size",
                                      help="Dynamic batch, height and width (YOLOv5's --dynamic): any letterbox size"),
    opset: int = typer.Option(17, "--opset", min=13, max=20, help="ONNX opset (13-20)"),
    no_simplify: bool = typer.Option(False, "--no-simplify", help="Skip onnxsim/onnxslim"),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check against PyTorch"),
    as_json: bool = JsonFlag,
    json_file: Path = LegacyJsonFile,
    cfg: Path = CfgOpt,
    trust_checkpoint: bool = TrustOpt,
) -> None:
    """Export a checkpoint to a clean ONNX (fused, simplified, canonical SE blocks) and prove parity."""
    from se_deploy.export.onnx_export import export_onnx

    with err.status("exporting") as status:
        report = export_onnx(
            weights, output, imgsz=imgsz or 640, batch=batch, dynamic=dynamic, dynamic_size=dynamic_size,
            opset=opset, simplify=not no_simplify, check=not no_check, cfg=cfg, trust=trust_checkpoint,
            progress=lambda message: status.update(message),
        )
    for notice in report.notices:
        err.print(f"notice: {notice}")
    finish(report.to_dict(), as_json, json_file, lambda: _print_export(report))
    if report.parity is not None and not report.parity.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def check(
    model: str = model_option("Deployed model (.onnx, .engine) or Triton model URL [default: the newest in engines/]"),
    weights: Path = typer.Option(..., "--weights", "-w", help="The checkpoint it was made from (.pt)",
                                 show_default=False),
    images: Path = typer.Option(None, "--images", help="Image folder or glob [default: the bundled images]",
                                show_default=False),
    precision: str = typer.Option(None, "--precision", show_default=False,
                                  help="Limits for fp32, fp16 or int8 [default: the model's own precision]"),
    device: str = DeviceOpt,
    as_json: bool = JsonFlag,
    json_file: Path = LegacyJsonFile,
    cfg: Path = CfgOpt,
    trust_checkpoint: bool = TrustOpt,
    old_model: str = typer.Argument(None, hidden=True, show_default=False),
) -> None:
    """Run the model and its PyTorch checkpoint on the same images; exit 1 if they disagree."""
    from se_deploy.evaluation.parity import run_parity_check
    from se_deploy.model_select import resolve_model

    if old_model is not None:
        if model is not None:
            raise typer.BadParameter("give the model once: -m MODEL", param_hint="'--model'")
        deprecated("check MODEL", "check -m MODEL")
        model = old_model
    model = resolve_model(model, say=err.print)
    with err.status("checking parity"):
        report = run_parity_check(model, weights, images, precision, device=device, cfg=cfg, trust=trust_checkpoint)
    finish(report.to_dict(), as_json, json_file, lambda: _print_parity(report))
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
