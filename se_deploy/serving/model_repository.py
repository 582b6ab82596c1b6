"""Write a Triton model repository from a detector se-deploy made (.onnx, or .engine/.plan with its manifest).

Layout (``<name>`` is the model's name)::

    model_repository/
      <name>/        config.pbtxt, labels.txt, 1/model.onnx | 1/model.plan | 1/model.py + 1/model.onnx (--cpu)
      <name>_pre/    (--e2e) config.pbtxt, warmup/gray.jpg, 1/model.py + se-deploy's pre-processing code
      <name>_post/   (--e2e) config.pbtxt, labels.txt, 1/model.py + se-deploy's post-processing code
      <name>_e2e/    (--e2e) config.pbtxt, 1/ (the ensemble: image bytes in, detections out)

Everything is built in a temporary folder beside the repository and checked; then a new repository is
renamed into place, or, in an existing one, each model folder is swapped in whole (other models stay).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from se_deploy.artifacts import _umask
from se_deploy.errors import SeDeployError
from se_deploy.serving import model_config as mc

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_MAX_BATCH = 8  # for a dynamic-batch ONNX, whose batch axis has no limit of its own
TRT_ACCELERATORS = ("fp16", "fp32")
PYTHON_MODELS = Path(__file__).resolve().parent / "python_models"
# se-deploy's own pre/post-processing, copied into the e2e python models (they import nothing else of se-deploy)
PROCESSING_MODULES = ("__init__.py", "errors.py", "inference/__init__.py", "inference/opencv_logging.py",
                      "inference/preprocess.py", "inference/postprocess.py")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.05-py3"  # same release as the Dockerfile's TensorRT base


@dataclass
class RepositoryReport:
    repository: Path
    models: list[dict]  # name, role, platform or backend, max_batch_size, inputs, outputs
    replaced: list[str] = field(default_factory=list)  # model folders that were there and were swapped
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"repository": str(self.repository), "models": self.models, "replaced": self.replaced,
                "notes": self.notes}


def is_repository(path: Path) -> bool:
    """A folder that is empty or holds only model folders (each with a config.pbtxt), hidden entries aside."""
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return all(p.is_dir() and (p / "config.pbtxt").is_file() for p in entries)


def check_output(output: Path) -> None:
    """Refuse an output path that exists and is not a model repository, before any work."""
    if output.exists() and not is_repository(output):
        kind = "a folder holding other things" if output.is_dir() else "a file"
        raise SeDeployError(f"{output}: exists and is {kind}, not a Triton model repository (a folder of model "
                            "folders, each with a config.pbtxt); choose another -o/--output")


def read_repository(path: str | Path) -> dict[str, object]:
    """The configs of a repository's models, by name (each config.pbtxt read with Triton's schema)."""
    path = Path(path)
    if not path.is_dir():
        raise SeDeployError(f"{path}: no such model repository")
    if not is_repository(path):
        raise SeDeployError(f"{path}: not a Triton model repository (a folder of model folders, each with a "
                            "config.pbtxt)")
    configs = {}
    for folder in sorted(p for p in path.iterdir() if not p.name.startswith(".")):
        model_config = mc.parse_config(folder / "config.pbtxt")
        configs[model_config.name or folder.name] = model_config
    if not configs:
        raise SeDeployError(f"{path}: the model repository is empty (write one with `se-deploy triton MODEL`)")
    return configs


def _check_options(det: mc.Detector, name: str, max_batch: int | None, instances: int, e2e: bool, cpu: bool,
                   trt_accelerator: str | None, conf: float, iou: float, max_det: int) -> int:
    """Every option against its range and the model; returns the max batch size to write."""
    if not NAME_PATTERN.fullmatch(name):
        raise SeDeployError(f"--name {name}: letters, digits, '_', '.' and '-' only, starting with a letter or digit")
    if max_batch is not None and not 1 <= max_batch <= 1024:
        raise SeDeployError(f"--max-batch {max_batch}: expected 1 to 1024")
    if not 1 <= instances <= 64:
        raise SeDeployError(f"--instances {instances}: expected 1 to 64")
    if not (0 <= conf <= 1 and 0 <= iou <= 1):
        raise SeDeployError(f"--conf {conf} / --iou {iou}: thresholds are in [0, 1]")
    if max_det < 1:
        raise SeDeployError(f"--max-det {max_det}: must be at least 1")
    if trt_accelerator is not None and trt_accelerator not in TRT_ACCELERATORS:
        raise SeDeployError(f"--trt-accelerator {trt_accelerator}: expected {' or '.join(TRT_ACCELERATORS)}")
    if det.kind == "engine" and (cpu or trt_accelerator):
        raise SeDeployError(f"{det.path}: --cpu and --trt-accelerator take an ONNX model; a TensorRT engine "
                            "runs on Triton's TensorRT backend as it is")
    if cpu and trt_accelerator:
        raise SeDeployError("--cpu and --trt-accelerator exclude each other (the accelerator is a GPU one)")
    if e2e and det.imgsz is None:
        raise SeDeployError(f"{det.path}: --e2e needs a model with a fixed input size (export it with --imgsz)")
    if det.max_batch is not None and max_batch is not None and max_batch > det.max_batch:
        raise SeDeployError(f"--max-batch {max_batch}: {det.path.name}'s batch profile ends at {det.max_batch} "
                            "(rebuild the engine with a larger profile, or give a smaller --max-batch)")
    return max_batch or det.max_batch or DEFAULT_MAX_BATCH


def _warmup_image() -> bytes:
    """A small grey JPEG in Triton's file format for a TYPE_STRING element: 4-byte length, then the bytes."""
    import cv2
    import numpy as np

    ok, encoded = cv2.imencode(".jpg", np.full((64, 64, 3), 114, np.uint8))
    return struct.pack("<I", len(encoded)) + encoded.tobytes()


def _copy_processing_code(version_dir: Path) -> None:
    package = Path(__file__).resolve().parents[1]
    for module in PROCESSING_MODULES:
        target = version_dir / "se_deploy" / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package / module, target)


def _write_model(root: Path, model_config, models: dict, files: dict[str, bytes | Path]) -> None:
    """A model folder: config.pbtxt (checked first) and ``files`` (relative path -> bytes or a file to copy)."""
    text = mc.config_text(model_config, models)
    folder = root / model_config.name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")
    for relative, content in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)


def _describe(model_config) -> dict:
    pb = mc.config_pb2()

    def tensors(items):
        return [{"name": t.name, "datatype": pb.DataType.Name(t.data_type).removeprefix("TYPE_"),
                 "dims": list(t.dims)} for t in items]

    return {"name": model_config.name, "role": mc.parameters(model_config).get("role", ""),
            "platform": model_config.platform or model_config.backend, "max_batch_size": model_config.max_batch_size,
            "inputs": tensors(model_config.input), "outputs": tensors(model_config.output)}


def build_repository(root: Path, det: mc.Detector, name: str, max_batch: int, instances: int, e2e: bool, cpu: bool,
                     trt_accelerator: str | None, conf: float, iou: float, max_det: int) -> list[dict]:
    """Write the models into the (empty) folder ``root``; returns their descriptions."""
    labels = ("\n".join(det.names.get(i, str(i)) for i in range(max(det.names, default=-1) + 1)) + "\n").encode()
    weights = ("1/model.onnx" if det.kind == "onnx" else "1/model.plan")
    detector = mc.detector_config(det, name, max_batch, instances, cpu, trt_accelerator)
    files: dict[str, bytes | Path] = {weights: det.path, mc.LABELS_FILE: labels}
    if cpu:
        files["1/model.py"] = PYTHON_MODELS / "detector_cpu.py"
    configs = [(detector, files)]
    if e2e:
        pre, post = f"{name}_pre", f"{name}_post"
        configs += [
            (mc.preprocess_config(det, pre, max_batch, instances, det.imgsz),
             {"1/model.py": PYTHON_MODELS / "preprocess.py", f"warmup/{mc.WARMUP_IMAGE}": _warmup_image()}),
            (mc.postprocess_config(det, post, max_batch, instances, conf, iou, max_det),
             {"1/model.py": PYTHON_MODELS / "postprocess.py", mc.LABELS_FILE: labels}),
        ]
        step_models = {model_config.name: model_config for model_config, _ in configs}
        configs.append((mc.ensemble_config(det, f"{name}_e2e", max_batch, pre, name, post), {}))
    else:
        step_models = {}
    for model_config, model_files in configs:
        _write_model(root, model_config, step_models, model_files)
    if e2e:
        for model in (f"{name}_pre", f"{name}_post"):
            _copy_processing_code(root / model / "1")
    return [_describe(model_config) for model_config, _ in configs]


def _swap_in(built: Path, output: Path) -> list[str]:
    """Move the models in ``built`` into the repository ``output``, each folder whole; returns those replaced."""
    replaced = []
    for folder in sorted(built.iterdir()):
        target = output / folder.name
        old = built / f".old-{folder.name}"
        if target.exists():
            os.rename(target, old)
            replaced.append(folder.name)
        os.rename(folder, target)
    return replaced


def write_repository(model: str | Path, output: str | Path = DEFAULT_REPOSITORY, *, name: str | None = None,
                     max_batch: int | None = None, instances: int = 1, e2e: bool = False, cpu: bool = False,
                     trt_accelerator: str | None = None, conf: float = 0.25, iou: float = 0.45,
                     max_det: int = 300) -> RepositoryReport:
    """Write (or add to) the Triton model repository ``output`` for ``model``; see the module docstring."""
    output = Path(output)
    check_output(output)
    det = mc.read_detector(model)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", det.path.stem).lstrip("_.-") or "model"
    max_batch = _check_options(det, name, max_batch, instances, e2e, cpu, trt_accelerator, conf, iou, max_det)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        built = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    except OSError as e:
        raise SeDeployError(f"{output}: cannot write here ({e.strerror or e})") from None
    try:
        os.chmod(built, 0o777 & ~_umask())  # mkdtemp makes 0700; a server in a container must read it
        models = build_repository(built, det, name, max_batch, instances, e2e, cpu, trt_accelerator, conf, iou,
                                  max_det)
        replaced = []
        try:
            os.rename(built, output)  # a new repository appears whole
        except OSError:  # it exists (or appeared meanwhile): swap our model folders in
            check_output(output)
            replaced = _swap_in(built, output)
    except OSError as e:
        raise SeDeployError(f"{output}: cannot write the repository ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(built)
    report = RepositoryReport(output, models, replaced)
    if replaced:
        report.notes.append(f"replaced {', '.join(replaced)} in {output} (other models there are kept)")
    if det.kind == "engine":
        report.notes.append(f"{det.path.name} loads only on a Triton whose TensorRT built it, on the same GPU model "
                            "(see its manifest); use the tritonserver release of the se-deploy image that built it")
    return report


def python_packages(configs: dict) -> list[str]:
    """The pip packages the repository's python-backend models import (numpy aside), as pip arguments. OpenCV
    stays below 4.12, the last release that takes the numpy 1 the python backend of Triton 2.51 needs."""
    roles = {mc.parameters(c).get("role") for c in configs.values() if c.backend == "python"}
    return (["opencv-python-headless<4.12"] if roles & {"preprocess", "postprocess"} else []) + (
        ["onnxruntime"] if "detector" in roles else [])


def docker_command(repository: Path, configs: dict) -> str:
    """The `docker run` line that serves ``repository`` with NVIDIA's tritonserver (every backend, on the GPU)."""
    serve = "tritonserver --model-repository=/models"
    packages = python_packages(configs)
    if packages:  # the container's Python has numpy; the python models need these too
        serve = f"bash -c \"pip install {' '.join(shlex.quote(p) for p in packages)} && exec {serve}\""
    return (f"docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 "
            f"-v {shlex.quote(str(Path(repository).resolve()))}:/models {TRITON_IMAGE} {serve}")
