"""YOLOv5 checkpoint -> clean ONNX: fused eval model, decoded (N, anchors, 5+nc) output, simplified,
every SE block in canonical form, YOLOv5-readable metadata, checked by onnx.checker and ONNX Runtime.

The steps are functions from one artifact to the next (``torch_to_onnx``, ``simplify``,
``clean_se_blocks``, ``write_metadata``); ``export_onnx`` chains them and writes the file atomically.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from se_deploy import __version__
from se_deploy.artifacts import ENGINES_DIR, atomic_output, check_output_path, sha256_file
from se_deploy.errors import SeDeployError, first_line
from se_deploy.export.onnx_metadata import OnnxMetadata, write_metadata
from se_deploy.export.se_graph_pass import SERewrite, clean_se_blocks
from se_deploy.inference.preprocess import IMGSZ_RANGE

DEFAULT_OPSET = 17
# 13: first opset with per-channel Q/DQ (INT8) and Squeeze/Unsqueeze axes as inputs.
# 20: the highest the TorchScript exporter emits; TensorRT 10 parses 9-20.
OPSET_RANGE = (13, 20)
INPUT_NAME, OUTPUT_NAME = "images", "output0"  # the names YOLOv5's export uses

Progress = Callable[[str], None]


@dataclass
class ExportReport:
    """What ``export_onnx`` produced and everything it checked on the way."""

    onnx: Path
    weights: Path
    imgsz: tuple[int, int]
    batch: int
    dynamic: bool
    dynamic_size: bool
    input_shape: list  # (batch, 3, h, w); a dynamic axis is its name: 'batch', 'height', 'width'
    opset: int
    simplifier: str | None  # 'onnxsim', 'onnxslim' or None (--no-simplify)
    nodes: dict[str, int | None]  # exported / simplified / final
    se: SERewrite
    metadata: dict[str, str]
    output_shape: list
    seconds: float
    notices: list[str] = field(default_factory=list)
    parity: object | None = None  # se_deploy.evaluation.parity.ParityReport when the check ran

    def to_dict(self) -> dict:
        return {
            "onnx": str(self.onnx), "weights": str(self.weights), "imgsz": list(self.imgsz), "batch": self.batch,
            "dynamic": self.dynamic, "dynamic_size": self.dynamic_size, "input_shape": self.input_shape,
            "opset": self.opset, "simplifier": self.simplifier, "nodes": self.nodes,
            "se_blocks": self.se.to_dict(), "metadata": self.metadata, "output_shape": self.output_shape,
            "seconds": round(self.seconds, 2), "notices": self.notices,
            "parity": None if self.parity is None else self.parity.to_dict(),
        }


def _imgsz(imgsz: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    sides = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    low, high = IMGSZ_RANGE
    if len(sides) != 2 or not all(isinstance(s, (int, np.integer)) and low <= s <= high for s in sides):
        raise SeDeployError(f"--imgsz {imgsz}: expected one or two sides of {low}-{high} px")
    return int(sides[0]), int(sides[1])


def round_to_stride(imgsz: tuple[int, int], stride: int) -> tuple[tuple[int, int], str | None]:
    """Round each side up to a multiple of ``stride``; the notice says so when anything changed."""
    rounded = tuple(max(stride, math.ceil(s / stride) * stride) for s in imgsz)
    if rounded == imgsz:
        return imgsz, None
    return rounded, f"--imgsz {_size(imgsz)} is not a multiple of the largest stride {stride}; using {_size(rounded)}"


def _size(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def check_opset(opset: int) -> int:
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        low, high = OPSET_RANGE
        raise SeDeployError(f"--opset {opset}: unsupported; choose {low}-{high} (default {DEFAULT_OPSET})")
    return opset


def default_output(weights: str | Path) -> Path:
    return ENGINES_DIR / f"{Path(weights).stem}.onnx"


def dynamic_axes(dynamic: bool, dynamic_size: bool) -> dict | None:
    """ONNX axis names: the batch (``dynamic``), or batch, height and width (``dynamic_size``)."""
    if dynamic_size:
        return {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}}
    return {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None


def torch_to_onnx(model, imgsz: tuple[int, int], batch: int, axes: dict | None, opset: int) -> onnx.ModelProto:
    """Trace a fused eval DetectionModel to ONNX with Detect in export mode (TorchScript exporter)."""
    import io

    import torch

    head = model.model[-1]
    # A free height/width needs the Detect grids traced from the feature map's shape, not baked in.
    head.export, head.dynamic = True, bool(axes and 2 in axes[INPUT_NAME])
    example = torch.zeros(batch, 3, *imgsz)
    try:
        with torch.no_grad():
            model(example)  # builds the Detect grids for this input size
    except RuntimeError as e:
        raise SeDeployError(f"the model cannot run at {imgsz[0]}x{imgsz[1]}: {first_line(e)}") from None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarning / deprecation notices about the exporter itself
            torch.onnx.export(model, example, buffer, opset_version=opset, dynamo=False, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    except Exception as e:  # the exporter raises torch.onnx errors, RuntimeError, ...
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise SeDeployError(f"torch.onnx.export failed at opset {opset}: {first[:200]}") from None
    return onnx.load_from_string(buffer.getvalue())


def validate(model: onnx.ModelProto, batch: int, imgsz: tuple[int, int]) -> list:
    """onnx.checker (full), then run a zero batch through ONNX Runtime on CPU; returns the output shape."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise SeDeployError(f"exported ONNX fails onnx.checker: {first_line(e)}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        output = session.run(None, {INPUT_NAME: np.zeros((batch, 3, *imgsz), np.float32)})[0]
    except Exception as e:  # ORT's own exception types
        raise SeDeployError(f"ONNX Runtime cannot run the exported model: {first_line(e)}") from None
    return list(output.shape)


def export_onnx(
    weights: str | Path,
    out: str | Path | None = None,
    *,
    imgsz: int | tuple[int, int] = 640,
    batch: int | None = None,
    dynamic: bool = False,
    dynamic_size: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    check: bool = True,
    cfg: str | Path | None = None,
    trust: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Export ``weights`` to ONNX at ``out`` (default engines/<stem>.onnx); with ``check``, prove parity.

    ``batch`` fixes the batch (default 1); ``dynamic`` frees it; ``dynamic_size`` frees the batch, the
    height and the width. The file appears only once it has passed onnx.checker and run in ONNX
    Runtime. A failed parity check does not raise: the report's ``parity.passed`` says so.
    """
    from se_deploy.checkpoint import load_checkpoint
    from se_deploy.model_info import se_blocks

    started = time.perf_counter()
    say = progress or (lambda message: None)
    check_opset(opset)
    imgsz = _imgsz(imgsz)
    if (dynamic or dynamic_size) and batch is not None:
        raise SeDeployError("--batch and --dynamic/--dynamic-size exclude each other: a dynamic-batch model takes any batch")
    batch = 1 if batch is None else batch
    if batch < 1:
        raise SeDeployError(f"--batch {batch}: must be at least 1")
    out = Path(out) if out is not None else default_output(weights)
    if out.suffix.lower() != ".onnx":
        raise SeDeployError(f"{out}: the output must end in .onnx")
    check_output_path(out)  # before minutes of work, not after

    notices: list[str] = []
    with atomic_output(out) as tmp:
        say(f"loading {weights}")
        loaded = load_checkpoint(weights, cfg=cfg, trust=trust)
        stride = max(loaded.stride)
        imgsz, notice = round_to_stride(imgsz, stride)
        notices += [notice] if notice else []

        axes = dynamic_axes(dynamic, dynamic_size)
        batching = "dynamic batch and size" if dynamic_size else "dynamic batch" if dynamic else f"batch {batch}"
        say(f"exporting ONNX (opset {opset}, {imgsz[0]}x{imgsz[1]}, {batching})")
        model = torch_to_onnx(loaded.model, imgsz, batch, axes, opset)
        nodes = {"exported": len(model.graph.node), "simplified": None, "final": None}
        simplifier = None
        if simplify:
            from se_deploy.export.simplify import simplify as simplify_model

            say("simplifying")
            simplified = simplify_model(model)
            model, simplifier = simplified.model, simplified.tool
            notices += simplified.notices
            nodes["simplified"] = len(model.graph.node)

        say("rewriting SE blocks")
        model, se = clean_se_blocks(model)
        notices += [f"SE block {b.name} left as it is: {b.problem}" for b in se.skipped]
        expected = len(se_blocks(loaded.model))
        if se.found < expected:
            notices.append(f"the checkpoint has {expected} SE blocks; only {se.found} found in the graph")
        nodes["final"] = len(model.graph.node)
        metadata = write_metadata(model, OnnxMetadata(
            stride=stride, names=loaded.names, imgsz=imgsz, nc=int(loaded.model.model[-1].nc), batch=batch,
            dynamic=bool(axes), se_blocks=se.found, source_sha256=sha256_file(weights), se_deploy_version=__version__,
        ))
        model.doc_string = f"se-deploy {__version__} export of {Path(weights).name}"

        say("checking with onnx.checker and ONNX Runtime")
        output_shape = validate(model, batch, imgsz)
        onnx.save(model, tmp)
    input_shape = [batch, 3, *imgsz]
    for names, shape in ((axes or {}).get(INPUT_NAME, {}), input_shape), ((axes or {}).get(OUTPUT_NAME, {}), output_shape):
        for axis, name in names.items():
            shape[axis] = name

    report = ExportReport(
        onnx=out, weights=Path(weights), imgsz=imgsz, batch=batch, dynamic=bool(axes), dynamic_size=dynamic_size,
        input_shape=input_shape, opset=opset,
        simplifier=simplifier, nodes=nodes, se=se, metadata=metadata, output_shape=output_shape,
        seconds=0.0, notices=notices,
    )
    if check:
        from se_deploy.evaluation.parity import run_parity_check

        say("parity check against PyTorch")
        report.parity = run_parity_check(out, weights, precision="fp32", device="cpu", cfg=cfg, trust=trust)
    report.seconds = time.perf_counter() - started
    return report
