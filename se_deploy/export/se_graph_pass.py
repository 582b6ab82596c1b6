"""Find every Squeeze-and-Excitation block in an ONNX graph by structure; rewrite it to one clean form.

Exporters and simplifiers leave SE blocks in many shapes: GlobalAveragePool or ReduceMean, MatMul or
Gemm (with transB 0 or 1) or a 1x1 Conv on the pooled map, Reshape/Flatten/Squeeze before the first
FC, Reshape/Unsqueeze/Expand after the gate, and with a dynamic batch Shape/Gather/Unsqueeze/Concat
chains feeding those Reshapes and Expands. Every one of them computes ``x * gate(W2 relu(W1 mean_hw(x) + b1) + b2)``
with a Sigmoid, HardSigmoid or SiLU (``v * sigmoid(v)``) gate, and every one is rewritten to exactly
``canonical(gate)``: Gemm with transB=1 (bias only if the block had one), the gate, one Unsqueeze on
axes 2 and 3, and a broadcasting Mul. A block is recognised only when the weights and the (inferred)
shapes of every value along it fit that computation; SE blocks inside C3 bottlenecks are found the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass, TopologicalSortPass

GATE_OPS = {"sigmoid": ("Sigmoid",), "hardsigmoid": ("HardSigmoid",), "silu": ("Sigmoid", "Mul")}


def canonical(gate: str = "sigmoid") -> tuple[str, ...]:
    """The clean op chain of an SE block with ``gate`` ('sigmoid', 'hardsigmoid' or 'silu')."""
    return ("GlobalAveragePool", "Flatten", "Gemm", "Relu", "Gemm", *GATE_OPS[gate], "Unsqueeze", "Mul")


CANONICAL = canonical("sigmoid")
# Ops that must not appear anywhere inside a clean SE block (shape plumbing and the unclean forms).
FORBIDDEN = frozenset({"Shape", "Gather", "Expand", "Concat", "Reshape", "ReduceMean"})
_PRE_VIEWS = {"Reshape", "Flatten", "Squeeze"}  # (N, C, 1, 1) -> (N, C) before the first FC
_POST_VIEWS = {"Reshape", "Unsqueeze", "Expand"}  # (N, C) -> (N, C, 1, 1) or (N, C, H, W) after the gate
# Where a shape input's computation is traced back to: tensors whose shape, not values, is read end there.
_SHAPE_SOURCES = {"Shape", "Size"}


@dataclass
class SEBlock:
    """One SE block as found in a graph."""

    name: str
    channels: int
    hidden: int
    ops: list[str]  # the data path, pooling to Mul
    helper_ops: list[str]  # nodes computing shapes/axes for the data path (Shape, Gather, Concat...)
    clean: bool  # already exactly canonical(gate)
    problem: str | None = None  # why it was left as it is (None: matched and rewritable)
    gate: str = "sigmoid"  # 'sigmoid', 'hardsigmoid' or 'silu'
    bias: bool = False  # the FC layers carry biases

    @property
    def all_ops(self) -> list[str]:
        return self.ops + self.helper_ops

    def to_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "hidden": self.hidden, "gate": self.gate,
                "bias": self.bias, "ops": self.ops, "helper_ops": self.helper_ops, "clean": self.clean,
                "problem": self.problem}


@dataclass
class SERewrite:
    """What the pass did: blocks found (before rewriting) and how many it rewrote."""

    blocks: list[SEBlock] = field(default_factory=list)
    rewritten: int = 0

    @property
    def found(self) -> int:
        return len(self.blocks)

    @property
    def skipped(self) -> list[SEBlock]:
        return [b for b in self.blocks if b.problem]

    def to_dict(self) -> dict:
        return {"found": self.found, "rewritten": self.rewritten, "canonical": list(CANONICAL),
                "blocks": [b.to_dict() for b in self.blocks]}


@dataclass
class _Match:
    x: ir.Value  # the feature map that is pooled and rescaled
    nodes: list[ir.Node]  # data path, pool first, Mul last
    w1: np.ndarray  # (hidden, channels), Gemm transB=1 layout
    b1: np.ndarray | None
    w2: np.ndarray  # (channels, hidden)
    b2: np.ndarray | None
    gate: str  # 'sigmoid', 'hardsigmoid' or 'silu'
    gate_attrs: dict  # HardSigmoid's alpha and beta
    conv: bool  # the FCs are 1x1 Convs reading (N, C, 1, 1)
    pre: list[ir.Value] = field(default_factory=list)  # values between pooling and the first FC
    post: list[ir.Value] = field(default_factory=list)  # values between the gate and the Mul

    @property
    def mul(self) -> ir.Node:
        return self.nodes[-1]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _only_use(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The single (node, input index) reading ``value``, if it has exactly one reader and is no graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node, uses[0].idx


def _axes(node: ir.Node) -> list[int] | None:
    """The ``axes`` of ReduceMean/Squeeze/Unsqueeze, whether an attribute (old opsets) or an input."""
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = _const(node.inputs[1])
        if axes is None:
            return None
    return None if axes is None else [int(a) for a in np.ravel(axes)]


def _is_global_pool(node: ir.Node) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = _axes(node)
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


def _follow(value: ir.Value, ops: set[str], nodes: list[ir.Node], values: list[ir.Value]) -> ir.Value:
    """Walk forward through single-reader shape-only ops (reading ``value`` as their data input)."""
    while (use := _only_use(value)) and use[0].op_type in ops and use[1] == 0:
        nodes.append(use[0])
        value = use[0].outputs[0]
        values.append(value)
    return value


def _conv_fc(node: ir.Node):
    """A 1x1 Conv (one group, no padding) as a fully connected layer on a 1x1 map: (W, b, out) or None."""
    w = _const(node.inputs[1])
    pads = _attr(node, "pads") or [0]
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1) or _attr(node, "group", 1) != 1 or any(pads):
        return None
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _const(node.inputs[2])
        if bias is None or bias.size != w.shape[0]:
            return None
        bias = bias.reshape(-1)
    return w.reshape(w.shape[0], w.shape[1]), bias, node.outputs[0]


def _match_fc(value: ir.Value, nodes: list[ir.Node]):
    """A fully connected layer reading ``value``: MatMul (+ Add bias), Gemm or a 1x1 Conv. Returns (W, b, out)."""
    use = _only_use(value)
    if not use or use[1] != 0:
        return None
    node = use[0]
    if node.op_type == "Conv":
        fc = _conv_fc(node)
        if fc is not None:
            nodes.append(node)
        return fc
    if node.op_type == "MatMul":
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        nodes.append(node)
        weight, bias, out = w.T, None, node.outputs[0]
        add = _only_use(out)
        if add and add[0].op_type == "Add":
            b = _const(add[0].inputs[1 - add[1]])
            if b is not None and b.size == weight.shape[0]:
                nodes.append(add[0])
                bias, out = b.reshape(-1), add[0].outputs[0]
        return weight, bias, out
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        weight = (w if _attr(node, "transB", 0) else w.T) * np.asarray(_attr(node, "alpha", 1.0), w.dtype)
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _const(node.inputs[2])
            if c is None or c.size not in (1, weight.shape[0]):
                return None
            scaled = c.reshape(-1) * np.asarray(_attr(node, "beta", 1.0), c.dtype)
            bias = np.broadcast_to(scaled, weight.shape[:1]).copy()
        nodes.append(node)
        return weight.astype(w.dtype), bias, node.outputs[0]
    return None


def _next(value: ir.Value, op_type: str, nodes: list[ir.Node]) -> ir.Value | None:
    use = _only_use(value)
    if not use or use[0].op_type != op_type:
        return None
    nodes.append(use[0])
    return use[0].outputs[0]


def _match_gate(value: ir.Value, nodes: list[ir.Node]) -> tuple[str, dict, ir.Value] | None:
    """The gate reading ``value``: Sigmoid, HardSigmoid, or SiLU as ``value * Sigmoid(value)``."""
    uses = list(value.uses())
    if value.is_graph_output() or not 1 <= len(uses) <= 2:
        return None
    if len(uses) == 1:
        node = uses[0].node
        if node.op_type == "Sigmoid":
            nodes.append(node)
            return "sigmoid", {}, node.outputs[0]
        if node.op_type == "HardSigmoid":
            nodes.append(node)
            return "hardsigmoid", {"alpha": _attr(node, "alpha", 0.2), "beta": _attr(node, "beta", 0.5)}, node.outputs[0]
        return None
    sigmoid = next((u.node for u in uses if u.node.op_type == "Sigmoid"), None)
    mul = next((u.node for u in uses if u.node.op_type == "Mul"), None)
    if sigmoid is None or mul is None or _only_use(sigmoid.outputs[0]) is None:
        return None
    if _only_use(sigmoid.outputs[0])[0] is not mul or {id(v) for v in mul.inputs} != {id(value), id(sigmoid.outputs[0])}:
        return None
    nodes += [sigmoid, mul]
    return "silu", {}, mul.outputs[0]


def _match(pool: ir.Node) -> _Match | None:
    """The SE block starting at ``pool``, or None when the structure around it is not an SE block."""
    if not _is_global_pool(pool):
        return None
    x, nodes, pre, post = pool.inputs[0], [pool], [pool.outputs[0]], []
    value = _follow(pool.outputs[0], _PRE_VIEWS, nodes, pre)
    if (fc1 := _match_fc(value, nodes)) is None:
        return None
    conv = nodes[-1].op_type == "Conv"
    w1, b1, value = fc1
    if (value := _next(value, "Relu", nodes)) is None or (fc2 := _match_fc(value, nodes)) is None:
        return None
    if (nodes[-1].op_type == "Conv") != conv:
        return None
    w2, b2, value = fc2
    if (gate := _match_gate(value, nodes)) is None:
        return None
    gate_name, gate_attrs, value = gate
    value = _follow(value, _POST_VIEWS, nodes, post)
    use = _only_use(value)
    if not use or use[0].op_type != "Mul" or use[0].inputs[1 - use[1]] is not x:
        return None
    if w2.shape != w1.shape[::-1]:
        return None
    nodes.append(use[0])
    return _Match(x, nodes, w1, b1, w2, b2, gate_name, gate_attrs, conv, pre, post or [value])


def _helpers(match: _Match) -> list[ir.Node]:
    """Nodes outside the data path that compute its shape/axes/weight inputs (traced back to a Shape)."""
    path = set(map(id, match.nodes))
    found = {}
    stack = [v for n in match.nodes for v in list(n.inputs)[1:] if v is not None and v is not match.x]
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in path or id(producer) in found:
            continue
        found[id(producer)] = producer
        if producer.op_type not in _SHAPE_SOURCES:
            stack.extend(v for v in producer.inputs if v is not None and v is not match.x)
    return list(found.values())


def _dims(value: ir.Value) -> list | None:
    return None if value.shape is None else list(value.shape)


def _shape_problem(match: _Match) -> str | None:
    """Why the inferred shapes do not fit an SE block over ``channels`` (None when they do)."""
    channels = match.w1.shape[1]
    x = _dims(match.x)
    if x is None or len(x) != 4 or x[1] != channels:
        return f"input {x} is not (N, {channels}, H, W)"
    for value in match.pre:
        dims = _dims(value)
        if dims is None or dims[1:] not in ([channels], [channels, 1, 1]):
            return f"pooled value {value.name} has shape {dims}, not (N, {channels}[, 1, 1])"
    reads = [channels, 1, 1] if match.conv else [channels]
    if _dims(match.pre[-1])[1:] != reads:
        return f"first FC reads shape {_dims(match.pre[-1])}, not (N, {', '.join(map(str, reads))})"
    for value in match.post:
        dims = _dims(value)
        expanded = value.producer() is not None and value.producer().op_type == "Expand"
        if dims is None or len(dims) != 4 or dims[1] != channels or (not expanded and dims[2:] != [1, 1]):
            return f"scale {value.name} has shape {dims}, not (N, {channels}, 1, 1)"
    return None


def _is_clean(match: _Match, helpers: list[ir.Node]) -> bool:
    ops = tuple(n.op_type for n in match.nodes)
    if ops != canonical(match.gate) or helpers:
        return False
    flatten, gemm1, gemm2, unsqueeze = (match.nodes[i] for i in (1, 2, 4, -2))
    gemms_ok = all(_attr(g, "transB", 0) == 1 and not _attr(g, "transA", 0) and _attr(g, "alpha", 1.0) == 1.0
                   and _attr(g, "beta", 1.0) == 1.0 for g in (gemm1, gemm2))
    return gemms_ok and _attr(flatten, "axis", 1) == 1 and sorted(a % 4 for a in (_axes(unsqueeze) or [])) == [2, 3]


def _scope(nodes: list[ir.Node], index: int) -> str:
    """A readable name prefix: the exporter's module path shared by the block's nodes, else ``se<index>``."""
    prefix = os.path.commonprefix([n.name or "" for n in nodes])
    prefix = prefix[: prefix.rfind("/")] if "/" in prefix else ""
    if not prefix.strip("/"):
        return f"se{index}"
    return prefix if prefix.endswith("/se") else f"{prefix}/se"


class _Names:
    """Unique value/node names within one graph."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None and v.name}
        self.taken |= set(graph.initializers) | {v.name for v in graph.inputs}
        self.taken |= {n.name for n in graph if n.name}

    def __call__(self, name: str) -> str:
        unique, k = name, 1
        while unique in self.taken:
            unique, k = f"{name}_{k}", k + 1
        self.taken.add(unique)
        return unique


def _initializer(graph: ir.Graph, names: _Names, name: str, array: np.ndarray) -> ir.Value:
    name = names(name)
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, match: _Match, scope: str, opset: int, names: _Names) -> None:
    """Replace the matched block's data path with canonical(match.gate)."""

    def add(op, inputs, attributes=None):
        node = ir.node(op, inputs, attributes, name=names(f"{scope}/{op}"))
        node.outputs[0].name = names(f"{scope}/{op}_output_0")
        node.outputs[0].type = match.x.type
        new.append(node)
        return node.outputs[0]

    new: list[ir.Node] = []
    x = match.x
    value = add("Flatten", [add("GlobalAveragePool", [x])], {"axis": 1})
    for i, (w, b) in enumerate(((match.w1, match.b1), (match.w2, match.b2)), 1):
        inputs = [value, _initializer(graph, names, f"{scope}/fc{i}.weight", w)]
        if b is not None:
            inputs.append(_initializer(graph, names, f"{scope}/fc{i}.bias", b))
        value = add("Gemm", inputs, {"transB": 1})
        if i == 1:
            value = add("Relu", [value])
    if match.gate == "silu":
        value = add("Mul", [value, add("Sigmoid", [value])])
    else:
        value = add("HardSigmoid" if match.gate == "hardsigmoid" else "Sigmoid", [value], match.gate_attrs or None)
    if opset >= 13:
        axes = _initializer(graph, names, f"{scope}/unsqueeze_axes", np.array([2, 3], np.int64))
        value = add("Unsqueeze", [value, axes])
    else:
        value = add("Unsqueeze", [value], {"axes": [2, 3]})
    out = add("Mul", [x, value])
    ir.convenience.replace_nodes_and_values(
        graph, match.mul, match.nodes, new, old_values=[match.mul.outputs[0]], new_values=[out]
    )


def _scan(model: ir.Model) -> list[tuple[_Match, SEBlock]]:
    ShapeInferencePass(strict_mode=False)(model)
    found = []
    for node in list(model.graph):
        match = _match(node)
        if match is None:
            continue
        helpers = _helpers(match)
        block = SEBlock(
            name=_scope(match.nodes, len(found)), channels=int(match.w1.shape[1]), hidden=int(match.w1.shape[0]),
            ops=[n.op_type for n in match.nodes], helper_ops=[n.op_type for n in helpers],
            clean=_is_clean(match, helpers), problem=_shape_problem(match), gate=match.gate,
            bias=match.b1 is not None or match.b2 is not None,
        )
        found.append((match, block))
    return found


def find_se_blocks(model: onnx.ModelProto) -> list[SEBlock]:
    """Every SE block in ``model`` with its op chain, whatever form it is in (the model is not changed)."""
    return [block for _, block in _scan(ir.from_proto(model))]


def clean_se_blocks(model: onnx.ModelProto) -> tuple[onnx.ModelProto, SERewrite]:
    """Rewrite every SE block to canonical(gate); returns the new model and what was found and rewritten.

    Blocks already in canonical form are left as they are; blocks whose shapes cannot be proven to
    fit are left as they are and reported with the reason (``SERewrite.skipped``).
    """
    graph_model = ir.from_proto(model)
    graph = graph_model.graph
    opset = graph_model.opset_imports.get("", 17)
    report, names = SERewrite(), _Names(graph)
    for match, block in _scan(graph_model):
        report.blocks.append(block)
        if block.clean or block.problem:
            continue
        _rewrite(graph, match, block.name, opset, names)
        report.rewritten += 1
    if report.rewritten:
        RemoveUnusedNodesPass()(graph_model)  # the Shape/Gather/Concat chains that fed the old Reshapes
        TopologicalSortPass()(graph_model)
    return ir.to_proto(graph_model), report
