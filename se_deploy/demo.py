"""The whole chain on the bundled SE-YOLOv5n checkpoint and clip: export -> check -> (TensorRT) -> infer.

The ONNX (and the engine, when TensorRT is usable) go to the artifact workspace (default engines/), so
``se-deploy build-trt`` and ``se-deploy infer`` pick them up afterwards; the annotated clip and its
detections go to ``out_dir`` (the CLI gives each run its own: ``runs/demo``, ``runs/demo2``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from se_deploy.artifacts import DEMO_VIDEO, DEMO_WEIGHTS, ENGINES_DIR

DEMO_DIR = Path("runs") / "demo"
DEMO_IMGSZ = 320  # the bundled model was trained at 320 px


@dataclass
class DemoReport:
    """Each step's result; ``passed`` is False when a parity check failed (the chain stops there)."""

    weights: Path
    onnx: Path | None = None
    onnx_parity: object | None = None  # se_deploy.evaluation.parity.ParityReport
    engine: Path | None = None
    engine_parity: object | None = None
    tensorrt_note: str = ""
    infer: object | None = None  # se_deploy.inference.video_pipeline.InferResult

    @property
    def passed(self) -> bool:
        return all(p is None or p.passed for p in (self.onnx_parity, self.engine_parity))


def run_demo(out_dir: str | Path = DEMO_DIR, imgsz: int = DEMO_IMGSZ, tensorrt: bool | None = None,
             say: Callable[[str], None] | None = None, on_frame: Callable[[int], None] | None = None,
             engines_dir: str | Path = ENGINES_DIR) -> DemoReport:
    """Export the bundled checkpoint, check parity, build an engine (if TensorRT is usable), run the clip.

    ``tensorrt``: None builds an engine only when TensorRT is usable here; False skips it.
    """
    from se_deploy.export.onnx_export import export_onnx
    from se_deploy.model_select import tensorrt_usable
    from se_deploy.runners import load_runner
    from se_deploy.inference.sources import open_source
    from se_deploy.inference.video_pipeline import InferSettings, run_inference

    say = say or (lambda message: None)
    out_dir, engines_dir = Path(out_dir), Path(engines_dir)
    report = DemoReport(weights=DEMO_WEIGHTS)

    say("export: checkpoint -> ONNX, with a parity check against PyTorch")
    exported = export_onnx(DEMO_WEIGHTS, engines_dir / f"{DEMO_WEIGHTS.stem}.onnx", imgsz=imgsz, check=True, progress=say)
    report.onnx, report.onnx_parity = exported.onnx, exported.parity
    if not report.passed:
        return report

    model = report.onnx
    if tensorrt is None:
        tensorrt = tensorrt_usable()
        report.tensorrt_note = "" if tensorrt else "TensorRT is not usable here: skipped the engine build"
    elif not tensorrt:
        report.tensorrt_note = "engine build skipped (--no-trt)"
    if tensorrt:
        report.engine, report.engine_parity = build_checked_engine(report.onnx, engines_dir, say)
        if not report.passed:
            return report
        model = report.engine

    say(f"infer: {DEMO_VIDEO.name} with {model.name}")
    with load_runner(model) as runner, open_source(str(DEMO_VIDEO)) as source:
        report.infer = run_inference(runner, source, out_dir, InferSettings(), on_frame=on_frame)
    return report


def build_checked_engine(onnx_path: Path, out_dir: Path, say: Callable[[str], None]):
    """Build an FP16 TensorRT engine from ``onnx_path`` (into ``out_dir``) and check it against the checkpoint."""
    from se_deploy.evaluation.parity import run_parity_check
    from se_deploy.tensorrt.builder import build_engine

    say("TensorRT: building an FP16 engine")
    built = build_engine(onnx_path, out_dir / f"{onnx_path.stem}.engine", precision="fp16", directory=out_dir,
                         on_phase=lambda phase, parent, done, total: say(f"TensorRT: {phase} ({done}/{total})"))
    say("check: engine vs PyTorch")
    return built.engine, run_parity_check(built.engine, DEMO_WEIGHTS)
