"""``quantize`` (FP32 ONNX -> FP16 / INT8 Q/DQ ONNX, checked) and ``build-trt`` (ONNX -> TensorRT engine)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from se_deploy.cli import app
from se_deploy.cli.options import (
    CalibMethodOpt,
    CalibOpt,
    CalibSizeOpt,
    MAX_BATCH,
    JsonFlag,
    LegacyJsonFile,
    imgsz_option,
    output_option,
    parse_device,
)
from se_deploy.cli.output import EXIT_CHECK_FAILED, err, finish, out, print_check
from se_deploy.errors import SeDeployError


class _ProgressView:
    """One rich progress line per quantization stage or TensorRT build phase (nested phases indented)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.depth: dict[str, int] = {}

    def _task(self, name: str, parent: str | None, total: int) -> int:
        if name not in self.tasks:
            self.depth[name] = self.depth.get(parent, -1) + 1 if parent else 0
            self.tasks[name] = self.progress.add_task("  " * self.depth[name] + name, total=total or None)
        return self.tasks[name]

    def stage(self, stage: str, done: int, total: int) -> None:
        """quantize_onnx progress: (stage, done, total); a new stage hides the earlier ones."""
        if stage not in self.tasks:
            for task in self.tasks.values():
                self.progress.update(task, visible=False)
        self.progress.update(self._task(stage, None, total), completed=done, total=total or None)

    def phase(self, name: str, parent: str | None, done: int, total: int) -> None:
        """TensorRT IProgressMonitor: nested phases disappear once finished."""
        task = self._task(name, parent, total)
        self.progress.update(task, completed=done, total=total or None)
        if done >= total and self.depth.get(name):
            self.progress.remove_task(task)
            del self.tasks[name]


@contextmanager
def _progress():
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not sys.stderr.isatty()) as progress:
        yield _ProgressView(progress)


def _print_quantized(result) -> None:
    check = result.check
    verdict = "[green]accepted[/green]" if result.passed else "[red]rejected, nothing written[/red]"
    out.print(f"{result.precision} {result.path}: {verdict} ({result.seconds:.1f} s)")
    if result.calibration:
        cal = result.calibration
        out.print(f"  calibration: {cal['images']} images from {cal['source']} ({cal['method']}, "
                  f"{cal['imgsz'][0]}x{cal['imgsz'][1]})")
    if result.qdq["quantize_nodes"]:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(result.qdq["quantized_ops"].items(), key=lambda kv: -kv[1]))
        zero = "all zero points 0" if not result.qdq["nonzero_zero_points"] else \
            f"{len(result.qdq['nonzero_zero_points'])} non-zero zero points"
        out.print(f"  Q/DQ: {result.qdq['quantize_nodes']} Q + {result.qdq['dequantize_nodes']} DQ nodes, feeding {ops}; {zero}")
    out.print(f"  kept in FP32: {len(result.kept_fp32)} nodes")
    out.print(f"  check vs FP32 ONNX (onnxruntime cpu, {check.images} images at {check.imgsz[0]}x{check.imgsz[1]}):")
    print_check(check.figure_lines(), result.failures, result.notes, indent="    ")


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="FP32 ONNX model (from `se-deploy export`)", show_default=False),
    precision: str = typer.Option(..., "--precision", help="fp16 or int8", show_default=False),
    calib: Path = CalibOpt,
    calib_size: int = CalibSizeOpt,
    calib_method: str = CalibMethodOpt,
    keep_fp32: str = typer.Option("detect", "--keep-fp32",
                                  help="Comma-separated groups (detect, se) or node names left in FP32; '' for none"),
    check_images: Path = typer.Option(None, "--check-images", help="Images for the check [default: the bundled images]",
                                      show_default=False),
    output: Path = output_option("ONNX file to write [default: engines/<stem>.<precision>.onnx]"),
    as_json: bool = JsonFlag,
    json_file: Path = LegacyJsonFile,
    max_map_drop: float = typer.Option(None, "--max-map-drop", min=0.0, show_default=False,
                                       help="INT8: mAP@0.5:0.95 points it may lose on --data; the most sensitive "
                                            "layers stay out of INT8 until it fits"),
    data: Path = typer.Option(None, "--data", help="With --max-map-drop: DATA.yaml whose val split measures mAP",
                              show_default=False),
) -> None:
    """FP16 (ModelOpt AutoCast) or INT8 Q/DQ (ModelOpt PTQ) ONNX, accepted only if it matches the FP32 model."""
    from se_deploy.precision.quantize import QuantizeCheckFailed, quantize_onnx

    if max_map_drop is not None and (precision.lower() != "int8" or data is None):
        raise SeDeployError("--max-map-drop needs --precision int8 and --data DATA.yaml")
    keep = [item.strip() for item in keep_fp32.split(",") if item.strip()]
    try:
        with _progress() as view:
            result = quantize_onnx(model, precision, calib=calib, calib_size=calib_size, out=output, keep_fp32=keep,
                                   calib_method=calib_method, check_images=check_images, progress=view.stage)
    except QuantizeCheckFailed as failed:
        result = failed.result
    budget = None
    if max_map_drop is not None and result.passed:  # fit INT8 into an mAP budget (se_deploy.precision.precision_budget)
        from se_deploy.precision.precision_budget import budget_for_quantized

        with _progress() as view:
            budget = budget_for_quantized(model, result.path, data, max_map_drop, calib, calib_size, keep,
                                          progress=view.progress, calib_method=calib_method, check_images=check_images)

    def human() -> None:
        _print_quantized(result)
        if budget is not None:
            out.print(budget.summary())

    finish({**result.to_dict(), **({"max_map_drop": budget.to_dict()} if budget else {})}, as_json, json_file, human)
    if not result.passed or (budget is not None and not budget.met):
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("build-trt")
def build_trt(
    model: Path = typer.Argument(None, help="ONNX model (default: the newest FP32 ONNX in engines/)",
                                 show_default=False),
    fp16: bool = typer.Option(False, "--fp16", help="Build the FP16 version (quantized first if needed)"),
    int8: bool = typer.Option(False, "--int8", help="Build the INT8 version (needs --calib unless already made)"),
    calib: Path = CalibOpt,
    calib_size: int = CalibSizeOpt,
    calib_method: str = CalibMethodOpt,
    batch: int = typer.Option(None, "--batch", min=1, max=MAX_BATCH, show_default=False,
                              help="Dynamic-batch models: build for exactly this batch"),
    min_batch: int = typer.Option(None, "--min-batch", min=1, max=MAX_BATCH, show_default=False,
                                  help="Batch profile minimum [default: 1]"),
    opt_batch: int = typer.Option(None, "--opt-batch", min=1, max=MAX_BATCH, show_default=False,
                                  help="Batch TensorRT tunes for [default: the minimum]"),
    max_batch: int = typer.Option(None, "--max-batch", min=1, max=MAX_BATCH, show_default=False,
                                  help="Batch profile maximum [default: 8]"),
    imgsz: str = imgsz_option("ONNX with a dynamic size: the size TensorRT tunes for, H or H,W "
                              "[default: the export size]"),
    min_imgsz: str = imgsz_option("ONNX with a dynamic size: smallest input, H or H,W [default: one stride]"),
    max_imgsz: str = imgsz_option("ONNX with a dynamic size: largest input, H or H,W [default: --imgsz]"),
    workspace: float = typer.Option(None, "--workspace", min=0.001, show_default=False,
                                    help="Builder workspace limit in GB [default: TensorRT's]"),
    dla_core: int = typer.Option(None, "--dla-core", min=0, help="Build for this DLA core (Jetson), GPU fallback on",
                                 show_default=False),
    timing_cache: Path = typer.Option(None, "--timing-cache",
                                      help="Timing cache file (default: engines/timing-<gpu>-<trt>.cache)",
                                      show_default=False),
    device: str = typer.Option("cuda:0", "--device", callback=parse_device, help="CUDA device: cuda, cuda:N or N"),
    output: Path = output_option("Engine file to write [default: engines/<onnx stem>.engine]"),
    as_json: bool = JsonFlag,
    json_file: Path = LegacyJsonFile,
) -> None:
    """Build a TensorRT engine (strongly typed, for this GPU) and write its manifest beside it."""
    from se_deploy.precision.quantize import QuantizeCheckFailed
    from se_deploy.runners.tensorrt_runner import device_index
    from se_deploy.tensorrt.builder import build_engine

    if fp16 and int8:
        raise SeDeployError("--fp16 and --int8 exclude each other")
    try:
        with _progress() as view:
            result = build_engine(
                model, output, precision="fp16" if fp16 else "int8" if int8 else None, calib=calib,
                calib_size=calib_size, calib_method=calib_method, batch=batch, min_batch=min_batch,
                opt_batch=opt_batch, max_batch=max_batch, imgsz=imgsz, min_imgsz=min_imgsz, max_imgsz=max_imgsz,
                workspace_gb=workspace, dla_core=dla_core, timing_cache=timing_cache, device=device_index(device),
                on_phase=view.phase, quantize_progress=view.stage,
            )
    except QuantizeCheckFailed as failed:
        _print_quantized(failed.result)
        raise typer.Exit(EXIT_CHECK_FAILED) from None
    for line in result.notes:
        err.print(f"note: {line}")
    finish({**result.manifest, "engine": str(result.engine), "manifest": str(result.manifest_path)}, as_json, json_file,
           lambda: _print_built(result))


def _print_built(result) -> None:
    if result.quantized is not None:
        _print_quantized(result.quantized)
    manifest = result.manifest
    profile, sizes = manifest["batch_profile"], manifest.get("size_profile")
    batching = f"batch {profile['min']}/{profile['opt']}/{profile['max']}" if profile else \
        f"static batch {manifest['inputs'][0]['shape'][0]}"
    size = " / ".join(f"{h}x{w}" for h, w in sizes) if sizes else f"{manifest['imgsz'][0]}x{manifest['imgsz'][1]}"
    out.print(f"[green]built[/green] {result.engine} from {result.source} in {result.seconds:.1f} s")
    out.print(f"  {manifest['precision']}, {batching}, {size}, "
              f"TensorRT {manifest['tensorrt']} on {manifest['gpu']['name']} (sm {manifest['gpu']['compute_capability']})")
    out.print(f"  manifest: {result.manifest_path}")
