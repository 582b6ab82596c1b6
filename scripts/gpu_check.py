"""GPU checks that CI cannot run: PyTorch CUDA FP16 vs FP32, ONNX Runtime's CUDA EP, the TensorRT path.

Uses only what ships in the repo (the bundled checkpoint, val images and clip), so it runs on a bare
GPU machine with se-deploy installed. Each step prints 'verified', 'skipped' (and why) or 'FAILED';
the exit status is 1 when anything failed. ``scripts/gpu_check.sh`` runs it under a 5-minute limit.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from se_deploy.artifacts import DEMO_IMAGES, DEMO_VIDEO, DEMO_WEIGHTS  # noqa: E402
from se_deploy.errors import SeDeployError  # noqa: E402

IMGSZ = 320
results: list[tuple[str, str, str]] = []  # (status, step, detail)


def report(status: str, step: str, detail: str) -> None:
    results.append((status, step, detail))
    print(f"{status:>9}: {step}: {detail}", flush=True)


def step(name: str):
    """Run a check and report it: Skip -> 'skipped' (and why), any other exception -> 'FAILED'."""

    def wrap(fn):
        def run(*args):
            started = time.perf_counter()
            try:
                outcome = fn(*args)
            except Skip as why:
                report("skipped", name, str(why))
                return None
            except Exception as e:  # a check that crashes is a failed check
                report("FAILED", name, f"{type(e).__name__}: {e}")
                traceback.print_exc(limit=3)
                return None
            status, detail = outcome[:2]
            report(status, name, f"{detail} ({time.perf_counter() - started:.1f} s)")
            return outcome[2] if len(outcome) > 2 else None

        return run

    return wrap


class Skip(Exception):
    """The check cannot run here (missing package or device)."""


def images() -> list[Path]:
    from se_deploy.inference.preprocess import image_paths

    return image_paths(DEMO_IMAGES)


def batch_of(paths) -> np.ndarray:
    from se_deploy.inference.preprocess import Letterboxer, read_image

    batch, _ = Letterboxer((IMGSZ, IMGSZ), max_batch=len(paths)).prepare([read_image(p) for p in paths])
    return batch.copy()


def compare(pred: np.ndarray, ref: np.ndarray, precision: str) -> tuple[bool, str]:
    """``check``'s verdict and figures for two raw outputs."""
    from se_deploy.precision.quantize import compare_outputs

    figures = compare_outputs(pred, ref, precision)
    boxes, scores = figures["max_abs_error"]["boxes"], figures["max_abs_error"]["scores"]
    return not figures["failures"], (f"max |d| boxes {boxes:.3g} px, scores {scores:.3g}, detections agree "
                                     f"{figures['detection_agreement']:.1%} ({precision} limits)")


@step("PyTorch CUDA FP32 and FP16 vs FP32 on CPU")
def torch_fp16():
    import torch

    from se_deploy.checkpoint import load_checkpoint

    if not torch.cuda.is_available():
        raise Skip("PyTorch sees no CUDA device")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.from_numpy(batch_of(images()))
    model = load_checkpoint(DEMO_WEIGHTS).model
    head = model.model[-1]

    def run(model, x):
        head.grid = [torch.empty(0) for _ in head.grid]  # Detect's grids are cached per device and dtype
        head.anchor_grid = [torch.empty(0) for _ in head.anchor_grid]
        return model(x)[0].float().cpu().numpy()

    with torch.no_grad():
        ref = run(model, x)
        fp32 = run(model.cuda(), x.cuda())
        fp16 = run(model.half(), x.cuda().half())
    ok32, detail32 = compare(fp32, ref, "fp32")
    ok16, detail16 = compare(fp16, ref, "fp16")
    return ("verified" if ok32 and ok16 else "FAILED", f"{torch.cuda.get_device_name()}: FP32 {detail32}; FP16 {detail16}")


@step("export ONNX (static batch 1 and dynamic batch)")
def export(tmp: Path):
    from se_deploy.export.onnx_export import export_onnx

    static = export_onnx(DEMO_WEIGHTS, tmp / "shapes.onnx", imgsz=IMGSZ, check=False).onnx
    dynamic = export_onnx(DEMO_WEIGHTS, tmp / "shapes-dyn.onnx", imgsz=IMGSZ, dynamic=True, check=False).onnx
    return "verified", f"{static.name}, {dynamic.name}", (static, dynamic)


@step("ONNX Runtime CUDA EP, FP32 and FP16 ONNX")
def ort_cuda(static: Path, fp16: Path | None):
    import onnxruntime as ort

    from se_deploy.evaluation.parity import run_parity_check

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    details, ok = [], True
    for model, precision in [(static, "fp32"), (fp16, "fp16")]:
        if model is None:
            details.append("FP16 skipped (no ModelOpt to make it)")
            continue
        try:
            check = run_parity_check(model, DEMO_WEIGHTS, device="cuda", precision=precision)
        except SeDeployError as e:  # the EP is listed but cannot load (CUDA/cuDNN mismatch)
            raise Skip(str(e)) from None
        ok &= check.passed
        details.append(f"{precision}: boxes {check.max_abs_error['boxes']:.3g} px, scores "
                       f"{check.max_abs_error['scores']:.3g}, agree {check.detection_agreement:.1%} on {check.device}")
    return ("verified" if ok else "FAILED", "; ".join(details))


@step("quantize FP16 (ModelOpt AutoCast, checked on ONNX Runtime CPU)")
def quantize_fp16(static: Path, tmp: Path):
    if importlib.util.find_spec("modelopt") is None:
        raise Skip("ModelOpt is not installed (pip install 'se-deploy[quantize]')")
    from se_deploy.precision.quantize import quantize_onnx

    result = quantize_onnx(static, "fp16", out=tmp / "shapes.fp16.onnx")
    return "verified", f"agree {result.check.detection_agreement:.1%}", result.path


def calibration_frames(tmp: Path, count: int = 32) -> Path:
    """Frames of the bundled clip (not the val images) as INT8 calibration images."""
    import cv2

    folder = tmp / "calib"
    folder.mkdir()
    capture = cv2.VideoCapture(str(DEMO_VIDEO))
    for i in range(count):
        ok, frame = capture.read()
        if not ok:
            break
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), frame)
    capture.release()
    return folder


@step("TensorRT FP16 engine: build, manifest, check vs PyTorch")
def trt_fp16(static: Path, tmp: Path):
    from se_deploy.evaluation.parity import run_parity_check
    from se_deploy.tensorrt.builder import build_engine

    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("tensorrt is not installed (pip install 'se-deploy[trt]')")
    built = build_engine(static, tmp / "shapes.fp16.engine", precision="fp16", directory=tmp)
    check = run_parity_check(built.engine, DEMO_WEIGHTS, precision="fp16")
    status = "verified" if check.passed and built.manifest["precision"] == "fp16" else "FAILED"
    return (status, f"TensorRT {built.manifest['tensorrt']}, built in {built.seconds:.1f} s; boxes "
            f"{check.max_abs_error['boxes']:.3g} px, scores {check.max_abs_error['scores']:.3g}, agree "
            f"{check.detection_agreement:.1%}", built.engine)


@step("TensorRT INT8 engine (Q/DQ, calibrated on clip frames) vs PyTorch")
def trt_int8(static: Path, tmp: Path):
    from se_deploy.evaluation.parity import run_parity_check
    from se_deploy.tensorrt.builder import build_engine

    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("modelopt") is None:
        raise Skip("needs tensorrt and ModelOpt")
    built = build_engine(static, tmp / "shapes.int8.engine", precision="int8", calib=calibration_frames(tmp),
                         directory=tmp)
    check = run_parity_check(built.engine, DEMO_WEIGHTS, precision="int8")
    return ("verified" if check.passed else "FAILED",
            f"scores {check.max_abs_error['scores']:.3g}, agree {check.detection_agreement:.1%}")


@step("TensorRT dynamic batch: profile 1/1/4, batch 3 == three batches of 1")
def trt_dynamic(dynamic: Path, tmp: Path):
    from se_deploy.runners import load_runner
    from se_deploy.tensorrt.builder import build_engine

    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("tensorrt is not installed")
    built = build_engine(dynamic, tmp / "dyn.engine", max_batch=4, directory=tmp)
    x = batch_of(images()[:6])
    with load_runner(built.engine) as runner:
        together = runner.infer(x[:3])
        alone = np.concatenate([runner.infer(x[i : i + 1]) for i in range(3)])
        chunked = runner.infer(x)  # 6 > max batch 4: two calls
    same = np.abs(together - alone).max() < 1e-3 and chunked.shape[0] == 6
    cache = Path(built.manifest["build"]["timing_cache"])
    return ("verified" if same and cache.is_file() else "FAILED",
            f"max |batch3 - 3x batch1| {np.abs(together - alone).max():.2e}; timing cache {cache.name}")


@step("TensorRT dynamic size: --dynamic-size export, profile 128..320 px, two sizes vs ONNX Runtime CPU")
def trt_dynamic_size(tmp: Path):
    from se_deploy.export.onnx_export import export_onnx
    from se_deploy.runners import load_runner
    from se_deploy.tensorrt.builder import build_engine

    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("tensorrt is not installed")
    onnx_path = export_onnx(DEMO_WEIGHTS, tmp / "shapes-any.onnx", imgsz=IMGSZ, dynamic_size=True, check=False).onnx
    built = build_engine(onnx_path, tmp / "any.engine", imgsz=(256, 320), min_imgsz=128, max_imgsz=IMGSZ,
                         max_batch=2, directory=tmp)
    rng = np.random.default_rng(0)
    worst = 0.0
    with load_runner(built.engine) as engine, load_runner(onnx_path, device="cpu") as reference:
        for hw in ((256, 320), (160, 224)):
            x = rng.random((2, 3, *hw), dtype=np.float32)
            worst = max(worst, float(np.abs(engine.infer(x)[..., 4:] - reference.infer(x)[..., 4:]).max()))
    return ("verified" if worst < 1e-2 else "FAILED",
            f"size profile {built.manifest['size_profile']}; max score difference {worst:.2e}")


@step("TensorRT runner refuses an engine whose manifest names another TensorRT")
def trt_guard(engine: Path, tmp: Path):
    import json

    from se_deploy.tensorrt.engine_manifest import manifest_path
    from se_deploy.runners import load_runner

    if engine is None:
        raise Skip("no engine was built")
    copy = tmp / "stale.engine"
    shutil.copyfile(engine, copy)
    manifest = json.loads(manifest_path(engine).read_text())
    manifest["tensorrt"] = "0.0.0"
    manifest_path(copy).write_text(json.dumps(manifest))
    try:
        load_runner(copy).activate()
    except SeDeployError as e:
        ok = "TensorRT 0.0.0 !=" in str(e) and "se-deploy build-trt" in str(e)
        return ("verified" if ok else "FAILED", str(e))
    return "FAILED", "the stale engine was loaded"


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="se-deploy-gpu-check-") as name:
        tmp = Path(name)
        torch_fp16()
        exported = export(tmp)
        static, dynamic = exported if exported else (None, None)
        if static is None:
            report("skipped", "ONNX Runtime and TensorRT checks", "no ONNX could be exported")
        else:
            fp16 = quantize_fp16(static, tmp)
            ort_cuda(static, fp16)
            engine = trt_fp16(static, tmp)
            trt_int8(static, tmp)
            trt_dynamic(dynamic, tmp)
            trt_dynamic_size(tmp)
            trt_guard(engine, tmp)
    counts = {s: sum(r[0] == s for r in results) for s in ("verified", "skipped", "FAILED")}
    print(f"\n{counts['verified']} verified, {counts['skipped']} skipped, {counts['FAILED']} failed "
          f"in {time.perf_counter() - started:.0f} s")
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
