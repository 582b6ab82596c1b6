"""Triton model configs: what a detector file says about itself, and the config.pbtxt of each model.

Configs are built as Triton's own protobuf messages (``model_config_pb2``, shipped with tritonclient),
printed as text, parsed back and checked against the rules Triton applies when it loads a model, all
before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from se_deploy.errors import SeDeployError, first_line

PARAMETER_PREFIX = "se_deploy."  # config parameters se-deploy writes and reads back (names, stride, role, ...)
QUEUE_DELAY_US = 1000  # how long the dynamic batcher waits for more requests to fill a batch
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "uint8": "TYPE_UINT8",
                 "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL",
                 "bytes": "TYPE_STRING"}
# The tensors of the end-to-end models (the detector's own names come from its file).
IMAGE, LETTERBOX, PREDICTIONS = "image", "letterbox", "predictions"
DETECTIONS, DETECTION_NAMES, COUNT = "detections", "names", "count"
LABELS_FILE = "labels.txt"
WARMUP_IMAGE = "gray.jpg"  # the pre-processing model's warm-up input, in the model's warmup/ folder


def config_pb2():
    """Triton's model config schema, from tritonclient (the `triton` extra)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise SeDeployError("tritonclient is not installed: pip install 'se-deploy[triton]'") from None
    return model_config_pb2


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy's name ('float32', 'float16', ...), or 'bytes' for encoded data
    dims: tuple[int, ...]  # without the batch axis; -1 for a size the model leaves open


@dataclass(frozen=True)
class Detector:
    """A detector file as Triton must be told about it."""

    path: Path
    kind: str  # 'onnx' or 'engine'
    input: Tensor
    output: Tensor
    max_batch: int | None  # the largest batch it takes; None when the batch axis is unbounded
    names: dict[int, str]
    stride: int
    precision: str
    source_sha256: str | None = None

    @property
    def imgsz(self) -> tuple[int, int] | None:
        h, w = self.input.dims[1:]
        return (h, w) if h > 0 and w > 0 else None


def _static_batch_error(path: Path, batch: int, imgsz, engine: bool) -> SeDeployError:
    size = "H" if not imgsz else str(imgsz[0]) if imgsz[0] == imgsz[1] else f"{imgsz[0]},{imgsz[1]}"
    rebuild = " and build the engine again from it with `se-deploy build-trt`" if engine else ""
    return SeDeployError(f"{path}: its batch is fixed at {batch}, and Triton batches requests only on a dynamic "
                         f"batch axis; make a batchable model with `se-deploy export WEIGHTS.pt --dynamic --imgsz "
                         f"{size}`{rebuild}")


def read_onnx(path: Path) -> Detector:
    """The detector's input, output, batch and metadata from an ONNX file."""
    import onnx

    from se_deploy.export.onnx_metadata import read_metadata
    from se_deploy.runners.onnxruntime_runner import model_precision

    meta = read_metadata(path)  # a file that is not ONNX is refused here, with one line
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise SeDeployError(f"{path}: expected one input and one output, found {len(inputs)} and {len(graph.output)}")

    def tensor(value) -> tuple[str, str, list[int]]:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
        return value.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims

    (in_name, in_dtype, in_dims), (out_name, out_dtype, out_dims) = tensor(inputs[0]), tensor(graph.output[0])
    if len(in_dims) != 4 or in_dims[1] != 3 or len(out_dims) != 3:
        raise SeDeployError(f"{path}: not a YOLOv5 detector (input {in_dims}, output {out_dims})")
    imgsz = tuple(in_dims[2:]) if min(in_dims[2:]) > 0 else meta.imgsz
    if in_dims[0] != -1:
        raise _static_batch_error(path, in_dims[0], imgsz, engine=False)
    nc = out_dims[2] - 5 if out_dims[2] > 5 else meta.nc or 0
    return Detector(
        path=path, kind="onnx", input=Tensor(in_name, in_dtype, tuple(in_dims[1:])),
        output=Tensor(out_name, out_dtype, tuple(out_dims[1:])), max_batch=None,
        names=meta.names or {i: f"class{i}" for i in range(nc)}, stride=meta.stride or 32,
        precision=model_precision(path), source_sha256=meta.source_sha256,
    )


def read_engine(path: Path) -> Detector:
    """The detector's input, output and batch profile from a TensorRT engine's manifest, after its guard."""
    from se_deploy.artifacts import sha256_file
    from se_deploy.model_select import tensorrt_usable
    from se_deploy.tensorrt.engine_manifest import (
        built_for,
        check_engine,
        current_environment,
        manifest_path,
        read_manifest,
    )

    manifest = read_manifest(path)
    if manifest is None:
        raise SeDeployError(f"{path}: no manifest ({manifest_path(path).name}) beside it to read its inputs, outputs "
                            "and batch profile from; build it with `se-deploy build-trt`")
    # Here a TensorRT and GPU that could load it: the full guard. Elsewhere: the manifest must describe this file.
    check_engine(path, manifest, current_environment() if tensorrt_usable() else built_for(manifest),
                 sha256_file(path))
    if len(manifest["inputs"]) != 1 or len(manifest["outputs"]) != 1:
        raise SeDeployError(f"{path}: expected one input and one output in its manifest")
    (inp,), (out,) = manifest["inputs"], manifest["outputs"]
    imgsz = tuple(manifest.get("imgsz") or ()) or None
    if inp["shape"][0] != -1:
        raise _static_batch_error(path, inp["shape"][0], imgsz, engine=True)
    profile = manifest.get("batch_profile") or {}
    if profile.get("min", 1) > 1:
        raise SeDeployError(f"{path}: its batch profile starts at {profile['min']}; Triton sends batches from 1 "
                            f"(rebuild it with a profile from 1: `{manifest.get('rebuild', 'se-deploy build-trt')}`)")
    return Detector(
        path=path, kind="engine", input=Tensor(inp["name"], inp["dtype"], tuple(inp["shape"][1:])),
        output=Tensor(out["name"], out["dtype"], tuple(out["shape"][1:])), max_batch=profile.get("max"),
        names={int(k): v for k, v in manifest["names"].items()}, stride=int(manifest.get("stride", 32)),
        precision=manifest["precision"], source_sha256=(manifest.get("source_onnx") or {}).get("sha256"),
    )


def read_detector(path: str | Path) -> Detector:
    """An ONNX model or a TensorRT engine (with its manifest), checked for what Triton needs."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".engine", ".plan"):
        raise SeDeployError(f"{path}: not an ONNX model or a TensorRT engine (expected .onnx, .engine or .plan)")
    if not path.is_file():
        raise SeDeployError(f"{path}: model not found")
    return read_onnx(path) if suffix == ".onnx" else read_engine(path)


# --- building configs ---------------------------------------------------------------------------------------
def _tensor(pb, message, tensor: Tensor):
    message.name = tensor.name
    message.data_type = pb.DataType.Value(TRITON_DTYPES.get(tensor.dtype, "TYPE_INVALID"))
    message.dims.extend(tensor.dims)
    return message


def _base(name: str, max_batch: int, instances: int, kind: str, params: dict[str, object]):
    """A config with the parts every batching model shares: batch size, batcher, instances, parameters."""
    pb = config_pb2()
    model_config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    sizes = [size for size in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if size < max_batch] + [max_batch]
    model_config.dynamic_batching.preferred_batch_size.extend(sizes if max_batch > 1 else [])
    model_config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    model_config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    for key, value in params.items():
        model_config.parameters[PARAMETER_PREFIX + key].string_value = value if isinstance(value, str) else json.dumps(value)
    return pb, model_config


def _warmup(pb, model_config, tensors: list[Tensor], data_file: str | None = None) -> None:
    """One batch-1 warm-up request: zeros, or ``data_file`` from the model's warmup/ folder."""
    warmup = model_config.model_warmup.add(name="warmup", batch_size=1, count=1)
    for tensor in tensors:
        item = warmup.inputs[tensor.name]
        item.data_type = pb.DataType.Value(TRITON_DTYPES[tensor.dtype])
        item.dims.extend(tensor.dims)
        if data_file:
            item.input_data_file = data_file
        else:
            item.zero_data = True


def detector_params(det: Detector, role: str) -> dict[str, object]:
    return {"role": role, "names": repr({int(k): v for k, v in det.names.items()}), "stride": det.stride,
            "precision": det.precision, "source_sha256": det.source_sha256 or "", "source": det.path.name}


def detector_config(det: Detector, name: str, max_batch: int, instances: int, cpu: bool = False,
                    trt_accelerator: str | None = None):
    """The detector: ONNX Runtime or TensorRT backend on the GPU, or the python backend (ONNX Runtime) on the CPU."""
    pb, model_config = _base(name, max_batch, instances, "KIND_CPU" if cpu else "KIND_GPU", detector_params(det, "detector"))
    if cpu:
        model_config.backend = "python"
    else:
        model_config.platform = "onnxruntime_onnx" if det.kind == "onnx" else "tensorrt_plan"
    _tensor(pb, model_config.input.add(), det.input)
    _tensor(pb, model_config.output.add(), det.output).label_filename = LABELS_FILE
    if trt_accelerator:
        accelerator = model_config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = trt_accelerator.upper()
    _warmup(pb, model_config, [det.input])
    return model_config


def preprocess_config(det: Detector, name: str, max_batch: int, instances: int, imgsz: tuple[int, int]):
    """Encoded image bytes -> the detector's letterboxed input and the letterbox geometry."""
    pb, model_config = _base(name, max_batch, instances, "KIND_CPU", {"role": "preprocess", "imgsz": list(imgsz)})
    model_config.backend = "python"
    image = Tensor(IMAGE, "bytes", (1,))
    _tensor(pb, model_config.input.add(), image)
    _tensor(pb, model_config.output.add(), Tensor(det.input.name, det.input.dtype, (3, *imgsz)))
    _tensor(pb, model_config.output.add(), Tensor(LETTERBOX, "float64", (5,)))
    _warmup(pb, model_config, [image], WARMUP_IMAGE)
    return model_config


def postprocess_config(det: Detector, name: str, max_batch: int, instances: int, conf: float, iou: float,
                       max_det: int):
    """Raw predictions + letterbox geometry -> NMS'd boxes in original-image pixels, their class names, a count."""
    pb, model_config = _base(name, max_batch, instances, "KIND_CPU",
                       {"role": "postprocess", "conf": conf, "iou": iou, "max_det": max_det})
    model_config.backend = "python"
    inputs = [Tensor(PREDICTIONS, det.output.dtype, det.output.dims), Tensor(LETTERBOX, "float64", (5,))]
    for tensor in inputs:
        _tensor(pb, model_config.input.add(), tensor)
    _tensor(pb, model_config.output.add(), Tensor(DETECTIONS, "float32", (-1, 6)))
    _tensor(pb, model_config.output.add(), Tensor(DETECTION_NAMES, "bytes", (-1,)))
    _tensor(pb, model_config.output.add(), Tensor(COUNT, "int32", (1,)))
    _warmup(pb, model_config, inputs)
    return model_config


def ensemble_config(det: Detector, name: str, max_batch: int, pre: str, detector: str, post: str):
    """JPEG/PNG bytes in, detections out: pre-processing -> detector -> post-processing as one model."""
    pb = config_pb2()
    model_config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    model_config.parameters[PARAMETER_PREFIX + "role"].string_value = "e2e"
    _tensor(pb, model_config.input.add(), Tensor(IMAGE, "bytes", (1,)))
    _tensor(pb, model_config.output.add(), Tensor(DETECTIONS, "float32", (-1, 6)))
    _tensor(pb, model_config.output.add(), Tensor(DETECTION_NAMES, "bytes", (-1,)))
    _tensor(pb, model_config.output.add(), Tensor(COUNT, "int32", (1,)))
    steps = model_config.ensemble_scheduling.step
    steps.add(model_name=pre, model_version=-1, input_map={IMAGE: IMAGE},
              output_map={det.input.name: "preprocessed", LETTERBOX: LETTERBOX})
    steps.add(model_name=detector, model_version=-1, input_map={det.input.name: "preprocessed"},
              output_map={det.output.name: "raw"})
    steps.add(model_name=post, model_version=-1, input_map={PREDICTIONS: "raw", LETTERBOX: LETTERBOX},
              output_map={DETECTIONS: DETECTIONS, DETECTION_NAMES: DETECTION_NAMES, COUNT: COUNT})
    return model_config


# --- checking -----------------------------------------------------------------------------------------------
def check_config(model_config, models: dict | None = None) -> list[str]:
    """What Triton would refuse in ``model_config`` (empty: nothing). ``models`` maps names to the repository's configs,
    for an ensemble's steps."""
    pb = config_pb2()
    problems = []
    where = f"model '{model_config.name}'"
    if not model_config.name or "/" in model_config.name:
        problems.append(f"{where}: a model name must be non-empty and hold no '/'")
    if model_config.platform != "ensemble" and bool(model_config.platform) == bool(model_config.backend):
        problems.append(f"{where}: exactly one of platform and backend must be set")
    if model_config.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size must be at least 0")
    for kind, tensors in (("input", model_config.input), ("output", model_config.output)):
        names = [t.name for t in tensors]
        if not names or len(set(names)) != len(names) or not all(names):
            problems.append(f"{where}: {kind} names must be present and unique, got {names}")
        for t in tensors:
            if t.data_type == pb.DataType.TYPE_INVALID:
                problems.append(f"{where}: {kind} '{t.name}' has no data type")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{where}: {kind} '{t.name}' dims {list(t.dims)}: each must be -1 or at least 1")
    if model_config.HasField("dynamic_batching"):
        if model_config.max_batch_size == 0:
            problems.append(f"{where}: dynamic batching needs max_batch_size > 0")
        bad = [s for s in model_config.dynamic_batching.preferred_batch_size if not 1 <= s <= model_config.max_batch_size]
        if bad:
            problems.append(f"{where}: preferred batch sizes {bad} outside 1..{model_config.max_batch_size}")
    if any(group.count < 1 for group in model_config.instance_group):
        problems.append(f"{where}: every instance group needs a count of at least 1")
    inputs = {t.name: t for t in model_config.input}
    for warmup in model_config.model_warmup:
        if not 1 <= warmup.batch_size <= max(model_config.max_batch_size, 1) or set(warmup.inputs) != set(inputs):
            problems.append(f"{where}: warm-up '{warmup.name}' must give every input, in a batch the model takes")
        problems += [f"{where}: warm-up input '{key}' has another data type than the input"
                     for key, item in warmup.inputs.items() if key in inputs and item.data_type != inputs[key].data_type]
    if model_config.platform == "ensemble":
        problems += _check_ensemble(model_config, models or {})
    return problems


def _check_ensemble(model_config, models: dict) -> list[str]:
    """Every step's model exists and batches as far as the ensemble; every tensor is produced before it is used."""
    problems, available = [], {t.name for t in model_config.input}
    if not model_config.ensemble_scheduling.step:
        return [f"ensemble '{model_config.name}': no steps"]
    for step in model_config.ensemble_scheduling.step:
        model = models.get(step.model_name)
        if model is None:
            problems.append(f"ensemble '{model_config.name}': step model '{step.model_name}' is not in the repository")
            continue
        if model.max_batch_size < model_config.max_batch_size:
            problems.append(f"ensemble '{model_config.name}': '{step.model_name}' batches up to {model.max_batch_size}, "
                            f"less than the ensemble's {model_config.max_batch_size}")
        missing = [v for v in step.input_map.values() if v not in available]
        unknown = ([k for k in step.input_map if k not in {t.name for t in model.input}]
                   + [k for k in step.output_map if k not in {t.name for t in model.output}])
        if missing or unknown:
            problems.append(f"ensemble '{model_config.name}': step '{step.model_name}' uses tensors not yet made {missing} "
                            f"or names the model lacks {unknown}")
        available |= set(step.output_map.values())
    missing = [t.name for t in model_config.output if t.name not in available]
    if missing:
        problems.append(f"ensemble '{model_config.name}': outputs {missing} are made by no step")
    return problems


def config_text(model_config, models: dict | None = None) -> str:
    """``config`` as config.pbtxt text, refused unless it parses back identically with Triton's schema and passes
    ``check_config``."""
    from google.protobuf import text_format

    pb = config_pb2()
    text = text_format.MessageToString(model_config)
    parsed = text_format.Parse(text, pb.ModelConfig())
    problems = ([] if parsed == model_config else ["the text does not parse back to the same config"]) + check_config(
        parsed, models)
    if problems:
        raise SeDeployError(f"config.pbtxt of '{model_config.name}' would not load in Triton: {'; '.join(problems)}")
    return text


def parse_config(path: str | Path):
    """A config.pbtxt read with Triton's schema; one line when it does not parse."""
    from google.protobuf import text_format

    pb = config_pb2()
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        raise SeDeployError(f"{path}: not a readable Triton model config ({first_line(e)})") from None


def parameters(model_config) -> dict[str, str]:
    """The se-deploy parameters of a config, without their prefix."""
    return {k[len(PARAMETER_PREFIX):]: v.string_value for k, v in model_config.parameters.items()
            if k.startswith(PARAMETER_PREFIX)}
