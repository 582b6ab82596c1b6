"""FP16 and INT8 at the ONNX level, verified on ONNX Runtime before anything is written.

TensorRT 11 dropped the builder's FP16/INT8 flags and its calibrator: networks are strongly typed,
so precision lives in the ONNX. FP16 comes from ModelOpt AutoCast, INT8 from ModelOpt's ONNX
post-training quantization (Q/DQ nodes, calibrated on the user's images). Both run on CPU and
TensorRT 10 builds the result the same way, strongly typed.

Choices, measured on the fixture (see README): the Detect head (its three 1x1 convs and the box
decode) stays FP32 by default: an FP16 decode had ~7x the box error for no speed, INT8 head convs
lowered detection agreement. INT8 ranges are 'max' by default: under ``check``'s INT8 limits 'max'
models passed on 5 of 6 calibration sets, 'entropy' models (lower mean error, but clipped outliers
cost up to 0.30 on a score) on none; 'entropy' stays an option. Layers left out of INT8 stay FP32:
ModelOpt's FP16 'high precision' mode cut the fixture's mAP@0.5 from 0.31 to 0.10 on ONNX Runtime.
ModelOpt itself leaves the SE block's two Gemms (GEMVs at batch 1) unquantized. Weights are stored as
INT8 with a DequantizeLinear (TensorRT's pre-quantized weights): a third of the file, same outputs.

A quantized model is accepted only if it matches the FP32 model at its precision's ``check``
thresholds and, for INT8, every Q/DQ zero point is 0 (TensorRT supports only symmetric INT8).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from se_deploy.artifacts import ENGINES_DIR, atomic_output, sha256_file
from se_deploy.errors import SeDeployError, first_line

PRECISIONS = ("fp16", "int8")
CALIB_METHODS = ("entropy", "max")
# Entropy (KL) calibration: INT8 mAP@0.5 of the fixture +0.07 point vs FP32 (max: +1.4, -0.9 to +1.2 over runs).
DEFAULT_CALIB_METHOD = "entropy"
KEEP_GROUPS = ("detect", "se")
DEFAULT_KEEP_FP32 = ("detect",)

Progress = Callable[[str, int, int], None]  # (stage, done, total); total 0 while unknown


class QuantizeCheckFailed(SeDeployError):
    """The quantized model ran but missed its precision's thresholds; nothing was written."""

    def __init__(self, result: QuantizeResult):
        self.result = result
        super().__init__(f"{result.source.name} -> {result.precision}: rejected, nothing written "
                         f"({'; '.join(result.failures)})")


@dataclass
class QuantizeResult:
    """The quantized model, how it was made, and the check that accepted (or rejected) it."""

    path: Path
    source: Path
    precision: str
    kept_fp32: list[str]  # node names left in FP32
    qdq: dict  # Q/DQ facts (INT8): counts and non-zero zero points
    check: object  # se_deploy.evaluation.parity.ParityReport against the FP32 model on ONNX Runtime CPU
    calibration: dict | None = None  # images, source, method (INT8)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        zero_points = [f"{len(self.qdq['nonzero_zero_points'])} Q/DQ zero points are not 0"] \
            if self.qdq.get("nonzero_zero_points") else []
        no_qdq = ["no Q/DQ nodes were inserted"] if self.precision == "int8" and not self.qdq.get("quantize_nodes") else []
        return zero_points + no_qdq + list(self.check.failures)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"path": str(self.path), "source": str(self.source), "precision": self.precision,
                "passed": self.passed, "failures": self.failures, "kept_fp32": self.kept_fp32, "qdq": self.qdq,
                "calibration": self.calibration, "check": self.check.to_dict(), "seconds": round(self.seconds, 2),
                "notes": self.notes}


# --- reading models ----------------------------------------------------------------------------------
def onnx_precision(path: str | Path) -> str:
    """'int8' (Q/DQ nodes), 'fp16' (float16 compute) or 'fp32': the se-deploy metadata, else the graph."""
    from se_deploy.export.onnx_metadata import read_props
    from se_deploy.runners.onnxruntime_runner import model_precision

    recorded = read_props(path).get("precision")
    return recorded if recorded in ("fp32", *PRECISIONS) else model_precision(path)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise SeDeployError(f"{path}: model not found")
    if path.suffix.lower() != ".onnx":
        raise SeDeployError(f"{path}: expected an ONNX model (.onnx)")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf and onnx raise several types for a damaged file
        raise SeDeployError(f"{path}: not a readable ONNX model ({first_line(e)})") from None


def graph_input(model: onnx.ModelProto, path: Path) -> tuple[str, tuple]:
    """(name, dims with None where dynamic) of the one image input (N, 3, H, W)."""
    weights = {init.name for init in model.graph.initializer}  # old exporters list weights as inputs
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise SeDeployError(f"{path}: expected one input and one output (a YOLOv5 detector)")
    dims = tuple(d.dim_value if d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim)
    if len(dims) != 4:
        raise SeDeployError(f"{path}: input '{inputs[0].name}' has {len(dims)} dimensions, expected (N, 3, H, W)")
    return inputs[0].name, dims


def input_facts(model: onnx.ModelProto, path: Path) -> tuple[str, tuple, tuple[int, int]]:
    """(input name, input dims with None where dynamic, (h, w) to calibrate/check at) of an FP32 model."""
    from se_deploy.export.onnx_metadata import OnnxMetadata

    name, dims = graph_input(model, path)
    if next(i for i in model.graph.input if i.name == name).type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise SeDeployError(f"{path}: the input is not float32; quantize the FP32 model")
    imgsz = dims[2:] if all(dims[2:]) else OnnxMetadata.from_props({p.key: p.value for p in model.metadata_props}).imgsz
    if not imgsz:
        raise SeDeployError(f"{path}: its input size is dynamic and its metadata has no imgsz; export with --imgsz")
    return name, dims, tuple(imgsz)


def quantized_path(model: str | Path, precision: str, directory: str | Path = ENGINES_DIR) -> Path:
    """Where ``quantize`` writes by default: ``engines/<stem>.<precision>.onnx``."""
    return Path(directory) / f"{Path(model).stem}.{precision}.onnx"


def quantized_from(candidate: str | Path, source: str | Path, precision: str) -> bool:
    """Whether ``candidate`` is ``source`` quantized to ``precision`` by se-deploy (by checksum)."""
    from se_deploy.export.onnx_metadata import read_props

    if not Path(candidate).is_file():
        return False
    props = read_props(candidate)
    return props.get("precision") == precision and props.get("quantized_from_sha256") == sha256_file(source)


# --- what stays FP32 ---------------------------------------------------------------------------------
def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (node selections and ModelOpt both go by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_se_deploy_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


def detect_nodes(model: onnx.ModelProto) -> list[str]:
    """The Detect head: the box decode (every node between the last Convs and the output) and those Convs."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found, heads = [], []
    pending, seen = [o.name for o in model.graph.output], set()
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            heads.append(node.name)
            continue
        found.append(node.name)
        pending.extend(node.input)
    return heads + found


def se_nodes(model: onnx.ModelProto) -> list[str]:
    """Every SE block's squeeze/excite branch: from its GlobalAveragePool up to (not incl.) the channel Mul."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[str] = []
    for pool in (n for n in model.graph.node if n.op_type == "GlobalAveragePool"):
        pending = [pool]
        while pending:
            node = pending.pop()
            if node.name in found or (node.op_type == "Mul" and pool.input[0] in node.input):
                continue
            found.append(node.name)
            pending.extend(c for out in node.output for c in consumers.get(out, []))
    return found


def resolve_keep_fp32(model: onnx.ModelProto, keep: Iterable[str]) -> list[str]:
    """Node names for ``keep``: groups ('detect', 'se') and/or exact node names."""
    names = {n.name for n in model.graph.node}
    groups = {"detect": detect_nodes, "se": se_nodes}
    kept: list[str] = []
    for item in keep:
        if item in groups:
            nodes = groups[item](model)
            if not nodes:
                raise SeDeployError(f"--keep-fp32 {item}: no such block found in this model")
        elif item in names:
            nodes = [item]
        else:
            raise SeDeployError(f"--keep-fp32 {item}: neither a group ({', '.join(KEEP_GROUPS)}) nor a node name")
        kept += [n for n in nodes if n not in kept]
    return kept


# --- checks ------------------------------------------------------------------------------------------
def qdq_report(model: onnx.ModelProto) -> dict:
    """Q/DQ counts, the nodes computing on dequantized inputs, and every non-zero zero point."""
    constants = {i.name: i for i in model.graph.initializer}
    constants.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    producer = {out: node for node in model.graph.node for out in node.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    nonzero = [n.name for n in qdq if len(n.input) > 2 and n.input[2]
               and (n.input[2] not in constants or np.any(numpy_helper.to_array(constants[n.input[2]]) != 0))]
    quantized = [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                 and any(getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in n.input)]
    ops: dict[str, int] = {}
    for node in quantized:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in qdq),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in qdq),
            "quantized_ops": ops, "nonzero_zero_points": nonzero}


def check_against_fp32(fp32: str | Path, candidate: str | Path, precision: str, images: list[Path]):
    """``check`` for a quantized model: outputs vs the FP32 model, ONNX Runtime on CPU, same images."""
    from se_deploy.evaluation.parity import compare_runners
    from se_deploy.runners.onnxruntime_runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(fp32, device="cpu") as reference, OnnxRuntimeRunner(candidate, device="cpu") as runner:
        imgsz = reference.imgsz or input_facts(load_onnx(fp32), Path(fp32))[2]
        return compare_runners(runner, reference, images, precision, imgsz)


# --- quantizing --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Keep ModelOpt's and ONNX Runtime's logs, prints and progress bars off the user's terminal."""
    import onnxruntime as ort
    from modelopt.onnx.autocast.logging_config import configure_logging

    configure_logging("CRITICAL")
    ort.set_default_logger_severity(3)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        ort.set_default_logger_severity(2)


def _run_modelopt(model: Path, src: Path, raw: Path, kept: list[str], reader, calib_method: str) -> None:
    """FP16 (AutoCast; ``reader`` None) or INT8 PTQ of ``src`` into ``raw``, ``kept`` nodes left in FP32."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise SeDeployError("NVIDIA ModelOpt is not installed: pip install 'se-deploy[quantize]'") from None
    exclude = [f"^{re.escape(name)}$" for name in kept] or None
    precision = "fp16" if reader is None else "int8"
    try:
        with _quiet():
            if reader is None:
                onnx.save(convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16",
                                                     keep_io_types=True, nodes_to_exclude=exclude), raw)
            else:
                quantize(onnx_path=str(src), quantize_mode="int8", calibration_data_reader=reader,
                         calibration_method=calib_method, calibration_eps=["cpu"], high_precision_dtype="fp32",
                         dq_only=True, nodes_to_exclude=exclude, output_path=str(raw), log_level="CRITICAL")
    except SeDeployError:
        raise  # e.g. a calibration image that cannot be read
    except Exception as e:  # ModelOpt and ONNX Runtime raise many types for graphs they cannot handle
        raise SeDeployError(f"{model}: ModelOpt could not make the {precision} model "
                            f"({type(e).__name__}: {first_line(e)})") from None


def _write_metadata(model: onnx.ModelProto, source: onnx.ModelProto, props: dict[str, str]) -> None:
    """The source's metadata (names, stride, provenance...) plus what quantization adds."""
    del model.metadata_props[:]
    for prop in source.metadata_props:
        if prop.key not in props:
            model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def quantize_onnx(model: str | Path, precision: str, calib: str | Path | None = None, calib_size: int = 512,
                  out: str | Path | None = None, keep_fp32: Iterable[str] = DEFAULT_KEEP_FP32, *,
                  calib_method: str = DEFAULT_CALIB_METHOD, check_images: str | Path | None = None,
                  progress: Progress | None = None) -> QuantizeResult:
    """Quantize the FP32 ONNX ``model`` to ``precision`` ('fp16' or 'int8'), check it, write it to ``out``.

    INT8 needs ``calib`` (a folder or glob of the user's images; up to ``calib_size`` are used).
    ``keep_fp32`` holds groups ('detect', 'se') and/or node names to leave in FP32. The check runs on
    ``check_images`` (default: the bundled images, as ``se-deploy check`` does). The model is written
    (default ``engines/<stem>.<precision>.onnx``) only if its check passes; otherwise
    ``QuantizeCheckFailed`` carries the result.
    """
    from se_deploy import __version__
    from se_deploy.artifacts import DEMO_IMAGES
    from se_deploy.precision.calibration import LetterboxCalibrationReader, select_images
    from se_deploy.inference.preprocess import image_paths

    started = time.perf_counter()
    tick = progress or (lambda stage, done, total: None)
    model, precision, keep_fp32 = Path(model), str(precision).lower(), tuple(keep_fp32)
    if precision not in PRECISIONS:
        raise SeDeployError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if calib_method not in CALIB_METHODS:
        raise SeDeployError(f"--calib-method {calib_method}: expected one of {', '.join(CALIB_METHODS)}")
    if precision == "int8" and calib is None:
        raise SeDeployError("INT8 needs calibration images: pass --calib DIR (a few hundred of your training "
                            "images; without them the INT8 ranges would be guesses)")
    out = Path(out) if out is not None else quantized_path(model, precision)
    if out.suffix.lower() != ".onnx":
        raise SeDeployError(f"{out}: the output must end in .onnx")
    if out.resolve() == model.resolve():
        raise SeDeployError(f"{out}: would overwrite the FP32 model; choose another -o")
    source = load_onnx(model)
    have = onnx_precision(model)
    if have != "fp32":
        raise SeDeployError(f"{model}: already {have}; quantize the FP32 model")
    input_name, dims, imgsz = input_facts(source, model)
    name_nodes(source)
    kept = resolve_keep_fp32(source, keep_fp32)

    notes, calibration, reader = [], None, None
    if precision == "fp16" and calib is not None:
        notes.append("FP16 needs no calibration: --calib was not used")
    if precision == "int8":
        reader = LetterboxCalibrationReader(select_images(calib, calib_size), input_name, imgsz, dims[0] or 1,
                                            on_images=lambda done, total: tick("calibrating INT8", done, total))
        calibration = {"source": str(calib), "images": len(reader), "method": calib_method, "imgsz": list(imgsz)}
        if len(reader) < 32:
            notes.append(f"calibrated on only {len(reader)} images; a few hundred give steadier ranges")
    with tempfile.TemporaryDirectory(prefix="se-deploy-quantize-") as tmp:
        src, raw, final = (Path(tmp) / name for name in ("source.onnx", "quantized.onnx", "final.onnx"))
        onnx.save(source, src)  # ModelOpt writes its intermediate files beside its input
        tick("converting to FP16 (ModelOpt AutoCast)" if reader is None else "calibrating INT8", 0,
             0 if reader is None else len(reader))
        _run_modelopt(model, src, raw, kept, reader, calib_method)
        quantized = onnx.load(str(raw))
        _write_metadata(quantized, source, {
            "precision": precision, "quantized_from_sha256": sha256_file(model),
            "kept_fp32": ",".join(keep_fp32), "se_deploy_version": __version__,
            **({"calibration": f"{calibration['images']} images, {calib_method}"} if calibration else {}),
        })
        onnx.save(quantized, final)

        tick(f"checking {precision} against FP32 (ONNX Runtime CPU)", 0, 0)
        check = check_against_fp32(model, final, precision, image_paths(check_images or DEMO_IMAGES))
        check.model = str(out)
        result = QuantizeResult(path=out, source=model, precision=precision, kept_fp32=kept, qdq=qdq_report(quantized),
                                check=check, calibration=calibration, notes=notes)
        result.seconds = time.perf_counter() - started
        if not result.passed:
            raise QuantizeCheckFailed(result)
        with atomic_output(out) as tmp_out:
            shutil.copyfile(final, tmp_out)
    return result
