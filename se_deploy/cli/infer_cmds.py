"""``infer``, ``bench`` and ``demo``: run a model on video, images or streams; time it; show the whole chain."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from se_deploy.cli import EXIT_ERROR, app
from se_deploy.cli.options import (
    ConfOpt,
    DeviceOpt,
    IouOpt,
    JsonFlag,
    MaxDetOpt,
    batch_option,
    imgsz_option,
    model_option,
    parse_classes,
)
from se_deploy.cli.output import deprecated, finish
from se_deploy.cli.signals import EXIT_TERMINATED
from se_deploy.demo import DEMO_DIR
from se_deploy.errors import SeDeployError

EXIT_INTERRUPTED = 130
STOP_EXIT_CODES = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}  # stop_reason -> exit code
ModelOpt = model_option("Model file (.engine, .onnx, .pt) or Triton model (grpc://HOST:PORT/NAME, "
                        "http://HOST:PORT/NAME) [default: the newest in engines/]")
ImgszOpt = imgsz_option("Letterbox size: H or H,W (models with a fixed size need none) [default: 640]")
OldOutOpt = typer.Option(None, "--out", "-o", hidden=True, help="Old spelling of --out-dir")


def out_dir_option(default: Path, what: str) -> typer.Option:
    return typer.Option(default, "--out-dir", help=f"{what}; if it is in use or not empty, the next free one: "
                                                   "NAME2, NAME3, ... (the summary names it)")


class FpsColumn(ProgressColumn):
    """Frames per second over the last few seconds."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f} FPS" if task.speed else "   ... FPS", style="cyan")


def check_classes(classes: list[int] | None, runner) -> None:
    """--classes must name classes the model has."""
    unknown = [c for c in classes or () if c >= runner.nc]
    if unknown:
        raise SeDeployError(f"--classes {','.join(map(str, unknown))}: {runner.path.name} has {runner.nc} classes "
                            f"(0-{runner.nc - 1}: {', '.join(runner.names.values())})")


def chosen_out_dir(out_dir: Path, old_out: Path | None) -> Path:
    """--out-dir, or the old -o/--out when given (with a deprecation note)."""
    if old_out is None:
        return out_dir
    deprecated("-o/--out DIR", "--out-dir DIR")
    return old_out


def exit_if_stopped(stop_reason: str, frames: int, console: Console) -> None:
    """After Ctrl-C or SIGTERM: say what was kept and exit 130 or 143."""
    if stop_reason in STOP_EXIT_CODES:
        console.print(f"{stop_reason}: kept the {frames} frames written")
        raise typer.Exit(STOP_EXIT_CODES[stop_reason])


def run_with_progress(runner, source, out: Path, settings, console: Console):
    """run_inference with a rich progress bar (frames done / total, live FPS) on ``console``."""
    from se_deploy.inference.video_pipeline import run_inference

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), FpsColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, speed_estimate_period=3.0, transient=True) as progress:
        task = progress.add_task(f"{source.kind}", total=source.total)
        return run_inference(runner, source, out, settings, on_frame=lambda done: progress.update(task, completed=done))


def summary_table(summary: dict) -> Table:
    table = Table(title="inference", show_header=False)
    table.add_row("model", summary["model"])
    table.add_row("source", summary["source"])
    table.add_row("input", "x".join(map(str, summary["input_hw"] or ["per image"])) + f", batch {summary['batch']}")
    table.add_row("frames", f"{summary['frames']} ({summary['skipped']} unreadable skipped)")
    table.add_row("end-to-end", f"{summary['fps']:.1f} FPS over {summary['seconds']:.2f} s")
    for stage, ms in summary["stages_ms"].items():
        table.add_row(f"  {stage}", f"{ms:.2f} ms/frame")
    table.add_row("stopped by", summary["stop_reason"])
    table.add_row("results in", summary["out_dir"])
    for name, path in summary["outputs"].items():
        table.add_row(name, path)
    return table


@app.command()
def infer(
    source: str = typer.Argument(..., help="Video file, image, folder or glob of images, camera index, RTSP/HTTP URL"),
    model: str = ModelOpt,
    out_dir: Path = out_dir_option(Path("runs") / "infer" / "exp", "Folder for this run's results"),
    old_out: Path = OldOutOpt,
    imgsz: str = ImgszOpt,
    rect: bool = typer.Option(True, "--rect/--no-rect",
                              help="Any-size models: pad only to a multiple of the stride (detect.py) or to the full square"),
    conf: float = ConfOpt,
    iou: float = IouOpt,
    classes: list[str] = typer.Option(None, "--classes", callback=parse_classes,
                                      help="Keep only these class indices (0,2 or repeated)"),
    max_det: int = MaxDetOpt,
    batch: int = batch_option(1, "Frames per inference call"),
    device: str = DeviceOpt,
    no_video: bool = typer.Option(False, "--no-video", help="Write detections.jsonl only, no annotated video/images"),
    video_codec: str = typer.Option("mjpeg", "--video-codec",
                                    help="Annotated video: mjpeg (.avi, least CPU) or mp4v (.mp4, ~4x smaller)"),
    helper_nice: int = typer.Option(None, "--helper-nice",
                                    help="Nice steps (0-19) the decode/letterbox/NMS/encode threads step back from "
                                         "inference, Linux [default: 19 when inference runs on the CPU, else 0]"),
    as_json: bool = JsonFlag,
) -> None:
    """Detect objects in a video, images or a stream; write the annotated video/images and detections.jsonl."""
    from se_deploy.inference.run_dir import claim_run_dir
    from se_deploy.inference.sources import open_source
    from se_deploy.inference.video_pipeline import SERVER_LOST, InferSettings
    from se_deploy.model_select import resolve_model
    from se_deploy.runners import load_runner

    console = Console(stderr=True)
    settings = InferSettings(imgsz, rect, conf, iou, classes, max_det, batch, not no_video,
                             video_codec=video_codec, helper_nice=helper_nice)
    with claim_run_dir(chosen_out_dir(out_dir, old_out)) as run_dir, open_source(source) as src, \
            load_runner(resolve_model(model, console.print), device=device) as runner:
        check_classes(classes, runner)
        result = run_with_progress(runner, src, run_dir, settings, console).summary()
    finish(result, as_json, None, lambda: Console().print(summary_table(result)))
    exit_if_stopped(result["stop_reason"], result["frames"], console)
    if result["stop_reason"].startswith(SERVER_LOST):
        console.print(f"error: {result['stop_reason']}; kept the {result['frames']} frames written", soft_wrap=True)
        raise typer.Exit(EXIT_ERROR)


@app.command()
def bench(
    model: list[str] = typer.Option(None, "--model", "-m", show_default=False,
                                    help="Model file(s) or Triton model URL(s) [default: the newest of each kind "
                                         "in engines/]"),
    batch: int = batch_option(1),
    iters: int = typer.Option(100, "--iters", min=1, help="Timed iterations"),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed iterations first"),
    imgsz: str = ImgszOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout (one model: an object; several: a list)"),
) -> None:
    """Latency p50/p90/p99 and throughput of each backend after warm-up."""
    from se_deploy.inference.bench import benchmark
    from se_deploy.model_select import newest_of_each_kind
    from se_deploy.runners import load_runner

    console = Console(stderr=True)
    paths = model or newest_of_each_kind()
    results = []
    for path in paths:
        with load_runner(path, device=device) as runner, Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{runner.backend} {runner.path.name}", total=iters)
            results.append(benchmark(runner, batch, iters, warmup, imgsz,
                                     on_iter=lambda i: progress.update(task, completed=i)))
    finish(results[0] if len(results) == 1 else results, as_json, None,
           lambda: Console().print(bench_table(results, batch, iters, warmup)))


def bench_table(results: list[dict], batch: int, iters: int, warmup: int) -> Table:
    table = Table("model", "backend", "precision", "device", "input", "p50 ms", "p90 ms", "p99 ms", "images/s",
                  title=f"bench (batch {batch}, {iters} iterations after {warmup} warm-up)")
    for r in results:
        table.add_row(Path(r["model"]).name, r["backend"], r["precision"], r["device"],
                      f"{r['batch']}x3x{r['imgsz'][0]}x{r['imgsz'][1]}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['throughput']:.1f}")
    return table


@app.command()
def demo(
    out_dir: Path = out_dir_option(DEMO_DIR, "Folder for the annotated clip and detections (models go to engines/)"),
    old_out: Path = OldOutOpt,
    no_trt: bool = typer.Option(False, "--no-trt", help="Skip the TensorRT engine even where TensorRT is usable"),
) -> None:
    """Run the whole chain on the bundled SE-YOLOv5n checkpoint and clip: export -> check -> (TensorRT) -> infer."""
    import time

    from se_deploy.demo import run_demo
    from se_deploy.inference.run_dir import claim_run_dir

    console, started = Console(stderr=True), time.perf_counter()
    with claim_run_dir(chosen_out_dir(out_dir, old_out)) as run_dir, console.status("demo") as status:
        report = run_demo(run_dir, tensorrt=False if no_trt else None, say=status.update,
                          on_frame=lambda done: status.update(f"infer: {done} frames"))
    table = Table(title=f"demo ({time.perf_counter() - started:.0f} s)", show_header=False)
    table.add_row("checkpoint", str(report.weights))
    for label, path, parity in (("ONNX", report.onnx, report.onnx_parity), ("engine", report.engine, report.engine_parity)):
        if path is not None:
            verdict = "PASS" if parity.passed else f"FAIL: {'; '.join(parity.failures)}"
            table.add_row(label, f"{path}\nparity vs PyTorch ({parity.precision}): {verdict}, detections agree "
                                 f"{parity.detection_agreement:.1%}, max box error {parity.max_abs_error['boxes']:.2g} px")
    if report.tensorrt_note:
        table.add_row("engine", report.tensorrt_note)
    if report.infer is not None:
        result = report.infer
        table.add_row("inference", f"{result.frames} frames, {result.fps:.1f} FPS end to end ({result.model})")
        for name, path in result.outputs.items():
            table.add_row(name, path)
    Console().print(table)
    if report.infer is not None:
        exit_if_stopped(report.infer.stop_reason, report.infer.frames, console)
    if not report.passed:
        raise typer.Exit(1)
    model = report.engine or report.onnx
    Console(soft_wrap=True).print(f"results are in {run_dir}/ and {model.parent}/ - next: se-deploy infer YOUR_VIDEO.mp4 "
                                  f"(picks {model.name} from {model.parent}/)")
