"""INT8 within an mAP budget: keep the most sensitive blocks out of INT8, chosen greedily.

1. Each block (a YOLOv5 layer, ``/model.N/`` in node names; a lone node otherwise) is scored by the
   mAP@0.5:0.95 it recovers when only its nodes leave INT8. Trials bypass the Q/DQ pairs in front of
   the block's nodes in the calibrated model (INT8-stored weights are swapped back for the FP32
   model's), so they need no recalibration and the bypassed nodes compute in the float type the
   quantizer left around them (FP32 from ``se_deploy.precision.quantize``, FP16 from ModelOpt's default).
2. Blocks leave INT8 from the most to the least sensitive until the drop against the FP32 model is
   within the budget.
3. The model is quantized again with the kept blocks' nodes excluded (the quantizer's own option) and
   checked; should it still miss the budget, the next blocks are added the same way.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from se_deploy.evaluation.dataset import Dataset, load_dataset
from se_deploy.errors import SeDeployError

BLOCK = re.compile(r"^/?(model\.\d+)[/.]")

# requantize(nodes_to_exclude, out_path) -> path of an INT8 model with those nodes left out of INT8
Requantize = Callable[[list[str], Path], Path]


@dataclass
class BudgetResult:
    """What the search measured and what it kept (mAP in [0, 1]; drops and budget in points)."""

    max_drop: float
    fp32_map: float
    int8_map: float
    final_map: float
    met: bool
    kept_blocks: list[str]
    kept_nodes: list[str]
    model: Path
    sensitivity: dict[str, float] = field(default_factory=dict)  # block -> points recovered alone
    steps: list[dict] = field(default_factory=list)  # {"kept": [...], "map50_95": x, "quantizer": bool}

    @property
    def drop(self) -> float:
        return round((self.fp32_map - self.final_map) * 100, 3)

    def to_dict(self) -> dict:
        return {**asdict(self), "model": str(self.model), "drop": self.drop}

    def summary(self) -> str:
        """One line: what INT8 lost, what was kept out of INT8, and whether the budget is met."""
        lost = round((self.fp32_map - self.int8_map) * 100, 3)
        head = f"INT8 drops mAP@0.5:0.95 by {lost:.2f} points against FP32"
        if not self.kept_blocks:
            return f"{head}: within --max-map-drop {self.max_drop}, no layer kept out of INT8"
        return (f"{head}; with {', '.join(self.kept_blocks)} kept out of INT8 (most sensitive first, "
                f"{len(self.kept_nodes)} node{'s' * (len(self.kept_nodes) != 1)}) by {self.drop:.2f}: "
                f"{'within' if self.met else 'still over'} --max-map-drop {self.max_drop}")


def requantizer(fp32_model: str | Path, calib, calib_size: int, keep_fp32=None, **quantize_options) -> Requantize:
    """A ``Requantize`` over ``quantize_onnx``: its FP32 groups (default: the quantizer's) plus the given nodes."""
    from se_deploy.precision.quantize import DEFAULT_KEEP_FP32, name_nodes, quantize_onnx

    source = onnx.load(str(fp32_model), load_external_data=False)
    name_nodes(source)  # the names quantize_onnx gives unnamed nodes before it resolves them
    names = {n.name for n in source.graph.node}
    keep = tuple(DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)

    def requantize(nodes: list[str], out: Path) -> Path:
        kept = (*keep, *(n for n in nodes if n in names and n not in keep))
        return quantize_onnx(fp32_model, "int8", calib=calib, calib_size=calib_size, out=out, keep_fp32=kept,
                             **quantize_options).path

    return requantize


def quantized_blocks(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Nodes that read a DequantizeLinear output (so compute on INT8-rounded data), grouped by block."""
    producer = {out: node for node in model.graph.node for out in node.output}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input):
            match = BLOCK.match(node.name)
            groups.setdefault(match.group(1) if match else node.name, []).append(node.name)
    return groups


def keep_in_high_precision(model: onnx.ModelProto, nodes: set[str],
                           float_weights: dict[str, onnx.TensorProto] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` where ``nodes`` read their inputs from before the Q/DQ pairs; dead Q/DQ removed.

    A weight stored as INT8 (DequantizeLinear straight from an initializer) is swapped for the float
    initializer of the same name in ``float_weights`` (the FP32 model's) when its type and shape fit.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = {o: node for node in graph.node for o in node.output}
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
            elif dq.input[0] in inits and dq.input[1] in inits and dq.input[0] in (float_weights or {}):
                weight, scale = float_weights[dq.input[0]], inits[dq.input[1]]
                if weight.data_type == scale.data_type and list(weight.dims) == list(inits[dq.input[0]].dims):
                    restored = f"{dq.input[0]}_float"
                    if restored not in inits:
                        inits[restored] = onnx.TensorProto()
                        inits[restored].CopyFrom(weight)
                        inits[restored].name = restored
                        graph.initializer.append(inits[restored])
                    node.input[k] = restored
    while True:  # drop nodes nothing reads any more
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for node in graph.node for i in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return out


def fit_map_budget(fp32_model: str | Path, int8_model: str | Path, dataset: Dataset, max_drop: float,
                   requantize: Requantize, out: str | Path, progress=None, fp32_map: float | None = None,
                   int8_map: float | None = None, **eval_options) -> BudgetResult:
    """Keep the fewest, most sensitive blocks of ``int8_model`` out of INT8 so mAP@0.5:0.95 drops <= ``max_drop`` points.

    ``out`` receives the final model unless the all-INT8 model already meets the budget (then it is
    the answer). ``fp32_map``/``int8_map`` skip measuring what the caller already measured;
    ``eval_options`` go to ``evaluate`` (imgsz, batch, ...).
    """
    from se_deploy.evaluation.evaluate import evaluate

    if max_drop < 0:
        raise SeDeployError(f"--max-map-drop {max_drop}: must be >= 0 (mAP points)")
    score = lambda path: evaluate(path, dataset, **eval_options)["map50_95"]  # noqa: E731
    fp32_map = score(fp32_model) if fp32_map is None else fp32_map
    int8_map = score(int8_model) if int8_map is None else int8_map
    within = lambda value: (fp32_map - value) * 100 <= max_drop + 1e-9  # noqa: E731
    result = BudgetResult(max_drop, fp32_map, int8_map, int8_map, within(int8_map), [], [], Path(int8_model))
    if result.met:
        return result

    calibrated = onnx.load(str(int8_model))
    float_weights = {i.name: i for i in onnx.load(str(fp32_model)).graph.initializer}
    blocks = quantized_blocks(calibrated)
    if not blocks:
        raise SeDeployError(f"{int8_model}: no quantized nodes found (is it an INT8 Q/DQ model?)")
    task = progress.add_task("INT8 sensitivity per block", total=len(blocks)) if progress is not None else None
    with tempfile.TemporaryDirectory(prefix="se-deploy-budget-") as tmp:

        def trial(kept: list[str]) -> float:
            path = Path(tmp) / "trial.onnx"
            onnx.save(keep_in_high_precision(calibrated, {n for b in kept for n in blocks[b]}, float_weights), path)
            return score(path)

        for block in blocks:
            result.sensitivity[block] = round((trial([block]) - int8_map) * 100, 3)
            if task is not None:
                progress.advance(task)
        order = sorted(blocks, key=lambda b: -result.sensitivity[b])
        for block in order:
            result.kept_blocks.append(block)
            value = trial(result.kept_blocks)
            result.steps.append({"kept": list(result.kept_blocks), "map50_95": value, "quantizer": False})
            if within(value):
                break

    out = Path(out)
    while True:  # the shipped model comes from the quantizer itself; confirm it, widen if it falls short
        result.kept_nodes = [n for b in result.kept_blocks for n in blocks[b]]
        result.model = requantize(result.kept_nodes, out)
        result.final_map = score(result.model)
        result.steps.append({"kept": list(result.kept_blocks), "map50_95": result.final_map, "quantizer": True})
        result.met = within(result.final_map)
        remaining = [b for b in order if b not in result.kept_blocks]
        if result.met or not remaining:
            return result
        result.kept_blocks.append(remaining[0])


def budget_for_quantized(fp32_model: str | Path, int8_model: str | Path, data: str | Path | Dataset, max_drop: float,
                         calib, calib_size: int = 512, keep_fp32=None, progress=None,
                         **quantize_options) -> BudgetResult:
    """``quantize --max-map-drop``: score the INT8 model just written on ``data``'s val split and, if it
    loses more than ``max_drop`` points, replace it with the re-quantized mixed model."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    requantize = requantizer(fp32_model, calib, calib_size, keep_fp32, **quantize_options)
    return fit_map_budget(fp32_model, int8_model, dataset, max_drop, requantize, int8_model, progress=progress)
