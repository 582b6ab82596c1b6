"""``infer``, ``bench`` and ``demo``: run a model on video, images or streams; time it; show the whole chain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from se_deploy.cli import app
from se_deploy.cli.output import deprecated
from se_deploy.cli.signals import EXIT_TERMINATED
from se_deploy.demo import DEMO_DIR
from se_deploy.errors import SeDeployError

EXIT_INTERRUPTED = 130
STOP_EXIT_CODES = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}  # stop_reason -> exit code
ModelOpt = typer.Option(None, "--model", "-m", help="Model file (.engine, .onnx, .pt); default: newest in engines/",
                        show_default=False)
DeviceOpt = typer.Option(None, "--device", help="ONNX Runtime: tensorrt, cuda or cpu; PyTorch: cpu or cuda[:N]",
                         show_default=False)
ImgszOpt = typer.Option(None, "--imgsz", help="Letterbox size: H or H,W (models with a fixed size need none)",
                        show_default=False)
OldOutOpt = typer.Option(None, "--out", "-o", hidden=True, help="Old spelling of --out-dir")


def out_dir_option(default: Path, what: str) -> typer.Option:
    return typer.Option(default, "--out-dir", help=f"{what}; if it is in use or not empty, the next free one: "
                                                   "NAME2, NAME3, ... (the summary names it)")


class FpsColumn(ProgressColumn):
    """Frames per second over the last few seconds."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f} FPS" if task.speed else "   ... FPS", style="cyan")


def parse_imgsz(text: str | None) -> tuple[int, int] | None:
    """'320' -> (320, 320); '256,320' or '256x320' -> (256, 320)."""
    if text is None:
        return None
    sides = [s for s in re.split(r"[,x\s]+", text.strip()) if s]
    if len(sides) not in (1, 2) or not all(s.isdigit() and int(s) > 0 for s in sides):
        raise SeDeployError(f"--imgsz {text}: expected H or H,W in pixels")
    h, w = (int(sides[0]), int(sides[-1]))
    return h, w


def parse_classes(values: list[str] | None) -> list[int] | None:
    """--classes 0 --classes 2, or --classes 0,2."""
    if not values:
        return None
    items = [item for value in values for item in re.split(r"[,\s]+", value) if item]
    if not all(item.isdigit() for item in items):
        raise SeDeployError(f"--classes {' '.join(values)}: expected class indices")
    return [int(item) for item in items]


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


def resolve_model(model: Path | None, console: Console) -> Path:
    """--model, or the newest artifact in engines/ (saying which and why)."""
    if model is not None:
        return model
    from se_deploy.model_select import select_model

    choice = select_model()
    console.print(f"model: {choice.path} ({choice.reason})")
    return choice.path


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
    model: Path = ModelOpt,
    out_dir: Path = out_dir_option(Path("runs") / "infer" / "exp", "Folder for this run's results"),
    old_out: Path = OldOutOpt,
    imgsz: str = ImgszOpt,
    rect: bool = typer.Option(True, "--rect/--no-rect",
                              help="Any-size models: pad only to a multiple of the stride (detect.py) or to the full square"),
    conf: float = typer.Option(0.25, "--conf", help="Confidence threshold"),
    iou: float = typer.Option(0.45, "--iou", help="NMS IoU threshold"),
    classes: list[str] = typer.Option(None, "--classes", help="Keep only these class indices (0,2 or repeated)"),
    max_det: int = typer.Option(300, "--max-det", help="Most detections per frame"),
    batch: int = typer.Option(1, "--batch", help="Frames per inference call"),
    device: str = DeviceOpt,
    no_video: bool = typer.Option(False, "--no-video", help="Write detections.jsonl only, no annotated video/images"),
    video_codec: str = typer.Option("mjpeg", "--video-codec",
                                    help="Annotated video: mjpeg (.avi, least CPU) or mp4v (.mp4, ~4x smaller)"),
    helper_nice: int = typer.Option(None, "--helper-nice",
                                    help="Nice steps (0-19) the decode/letterbox/NMS/encode threads step back from "
                                         "inference, Linux [default: 19 when inference runs on the CPU, else 0]"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Detect objects in a video, images or a stream; write the annotated video/images and detections.jsonl."""
    from se_deploy.runners import load_runner
    from se_deploy.inference.run_dir import claim_run_dir
    from se_deploy.inference.sources import open_source
    from se_deploy.inference.video_pipeline import InferSettings

    console = Console(stderr=True)
    settings = InferSettings(parse_imgsz(imgsz), rect, conf, iou, parse_classes(classes), max_det, batch, not no_video,
                             video_codec=video_codec, helper_nice=helper_nice)
    with claim_run_dir(chosen_out_dir(out_dir, old_out)) as run_dir, open_source(source) as src, \
            load_runner(resolve_model(model, console), device=device) as runner:
        result = run_with_progress(runner, src, run_dir, settings, console).summary()
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        Console().print(summary_table(result))
    exit_if_stopped(result["stop_reason"], result["frames"], console)


@app.command()
def bench(
    model: list[Path] = typer.Option(None, "--model", "-m", show_default=False,
                                     help="Model file(s); default: the newest of each kind in engines/"),
    batch: int = typer.Option(1, "--batch", help="Images per inference call"),
    iters: int = typer.Option(100, "--iters", help="Timed iterations"),
    warmup: int = typer.Option(10, "--warmup", help="Untimed iterations first"),
    imgsz: str = ImgszOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object for one model, a list for several)"),
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
            task = progress.add_task(f"{runner.backend} {path.name}", total=iters)
            results.append(benchmark(runner, batch, iters, warmup, parse_imgsz(imgsz),
                                     on_iter=lambda i: progress.update(task, completed=i)))
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    table = Table("model", "backend", "precision", "device", "input", "p50 ms", "p90 ms", "p99 ms", "images/s",
                  title=f"bench (batch {batch}, {iters} iterations after {warmup} warm-up)")
    for r in results:
        table.add_row(Path(r["model"]).name, r["backend"], r["precision"], r["device"],
                      f"{r['batch']}x3x{r['imgsz'][0]}x{r['imgsz'][1]}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['throughput']:.1f}")
    Console().print(table)


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
