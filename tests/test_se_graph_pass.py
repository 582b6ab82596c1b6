"""The SE rewrite: every exporter/simplifier form of an SE block becomes exactly the canonical chain,
with identical outputs, wherever the blocks sit and whatever the batch axis."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

from se_deploy.export.se_graph_pass import FORBIDDEN, clean_se_blocks, find_se_blocks
from conftest import ref_input
from export_helpers import SE_BLOCKS, assert_canonical, tiny_model

IMGSZ = 64


def _torch_export(model, dynamic: bool, dynamo: bool, opset: int = 17) -> onnx.ModelProto:
    import torch

    model.model[-1].export = True
    x = torch.rand(2 if dynamic else 1, 3, IMGSZ, IMGSZ)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model(x)
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=max(opset, 18), verbose=False,
                                        input_names=["images"], output_names=["output0"], dynamic_shapes=shapes)
            return program.model_proto
        axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
        torch.onnx.export(model, x, buffer, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def exports():
    """Raw exports of one tiny model (SE in backbone and head) in all four exporter/batch forms."""
    model = tiny_model()
    return {(dynamo, dynamic): _torch_export(model, dynamic, dynamo)
            for dynamo in (False, True) for dynamic in (False, True)}


def _simplified(model: onnx.ModelProto, tool: str) -> onnx.ModelProto:
    from se_deploy.export import simplify

    if tool == "onnxsim":
        return simplify._onnxsim(model)
    if tool == "onnxslim":
        return simplify._onnxslim(model)
    return model


@pytest.mark.parametrize("tool", ["none", "onnxsim", "onnxslim"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_every_form_becomes_canonical_with_same_outputs(exports, dynamo, dynamic, tool):
    before = _simplified(exports[dynamo, dynamic], tool)
    unclean = find_se_blocks(before)
    assert len(unclean) == SE_BLOCKS and not any(b.clean for b in unclean)
    assert all(FORBIDDEN & set(b.all_ops) for b in unclean)  # the forms the exporters really leave

    after, report = clean_se_blocks(before)

    assert (report.found, report.rewritten) == (SE_BLOCKS, SE_BLOCKS)
    assert_canonical(after, SE_BLOCKS)
    onnx.checker.check_model(after, full_check=True)
    x = np.random.default_rng(0).random((3 if dynamic else 1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-5, atol=1e-4)


def test_dynamic_batch_leaves_no_shape_ops_after_simplification(exports):
    """onnxsim keeps Shape -> Expand for each SE block of a dynamic-batch export; after the pass none is left."""
    before = _simplified(exports[False, True], "onnxsim")
    assert {"Shape", "Expand"} <= {n.op_type for n in before.graph.node}
    after, _ = clean_se_blocks(before)
    assert not {"Shape", "Gather", "Expand", "ReduceMean"} & {n.op_type for n in after.graph.node}
    assert len(after.graph.node) < len(before.graph.node)


def test_pass_is_idempotent(exports):
    once, _ = clean_se_blocks(exports[False, False])
    twice, report = clean_se_blocks(once)
    assert (report.found, report.rewritten) == (SE_BLOCKS, 0)
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]


def test_opset_below_13_gets_unsqueeze_axes_attribute():
    model = _torch_export(tiny_model(), dynamic=False, dynamo=False, opset=12)
    after, report = clean_se_blocks(model)
    assert report.rewritten == SE_BLOCKS
    unsqueezes = [n for n in after.graph.node if n.op_type == "Unsqueeze"]
    assert [list(a.ints) for n in unsqueezes for a in n.attribute if a.name == "axes"] == [[2, 3]] * SE_BLOCKS
    x = np.random.default_rng(1).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    np.testing.assert_allclose(_run(after, x), _run(model, x), rtol=1e-5, atol=1e-4)


def test_look_alikes_are_not_rewritten():
    """Pool-FC-ReLU-FC-Sigmoid that rescales a different tensor, or rescales spatially, is no SE block."""
    import torch
    from torch import nn

    class NotSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(8, 2, bias=False), nn.ReLU(), nn.Linear(2, 8, bias=False), nn.Sigmoid())
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.conv(x)
            scale = self.fc(x.mean((2, 3))).view(-1, 8, 1, 1)
            return y * scale  # rescales y, not the pooled x

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(NotSE().eval(), torch.rand(1, 8, 4, 4), buffer, dynamo=False, opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    after, report = clean_se_blocks(model)
    assert report.found == 0
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in model.graph.node]


def test_fixture_upstream_onnx_is_cleaned(fixtures):
    path = fixtures / "onnx" / "upstream-export-320.onnx"
    model = onnx.load(path)
    (block,) = find_se_blocks(model)
    assert block.ops == ["GlobalAveragePool", "Reshape", "MatMul", "Relu", "MatMul", "Sigmoid", "Reshape", "Expand",
                         "Mul"]
    assert (block.channels, block.hidden) == (256, 16)

    after, report = clean_se_blocks(model)

    assert (report.found, report.rewritten) == (1, 1)
    assert_canonical(after, 1)
    assert len(after.graph.node) == len(model.graph.node) - 1
    x = ref_input("input_val3")[:1]
    np.testing.assert_array_equal(_run(after, x), _run(model, x))


# --- every fork's SE form, exported with the fork's own classes (as upstream export.py would) -----------
def _fork_forms():
    from torch import nn

    from fork_se import C3SE, ConvSE, LiteSEModule, MobileSELayer

    return {  # name: (module on 32 channels, SE blocks in it, gate, bias)
        "conv1x1-bias-functional": (lambda: ConvSE(32, 4), 1, "sigmoid", True),
        "linear-bias-hardsigmoid": (lambda: MobileSELayer(32), 1, "hardsigmoid", True),
        "conv1x1-bias-silu": (lambda: LiteSEModule(32, 4, nn.SiLU), 1, "silu", True),
        "c3se-two-bottlenecks": (lambda: C3SE(32, 32, 2), 2, "sigmoid", False),
    }


FORK_FORMS = _fork_forms()


def _after_conv(block):
    """A conv in front of the block, so the pooled tensor is an inner value, as in a network."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), block).eval()


def _export_module(module, dynamic: bool, dynamo: bool) -> onnx.ModelProto:
    import torch

    x = torch.rand(2 if dynamic else 1, 32, 8, 8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
            return torch.onnx.export(module, (x,), dynamo=True, opset_version=18, verbose=False,
                                     dynamic_shapes=shapes).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, x, buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("exporter, tool", [("legacy", "none"), ("legacy", "onnxsim"), ("legacy", "onnxslim"),
                                            ("dynamo", "none")])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("form", FORK_FORMS)
def test_every_fork_se_form_becomes_canonical_with_same_outputs(form, dynamic, exporter, tool):
    make, blocks, gate, bias = FORK_FORMS[form]
    before = _simplified(_export_module(_after_conv(make()), dynamic, exporter == "dynamo"), tool)
    found = find_se_blocks(before)
    assert [(b.gate, b.bias, b.clean) for b in found] == [(gate, bias, False)] * blocks

    after, report = clean_se_blocks(before)

    assert (report.found, report.rewritten) == (blocks, blocks)
    assert_canonical(after, blocks, gate=gate, bias=bias)
    assert not {"Conv"} & {op for b in find_se_blocks(after) for op in b.ops}  # the 1x1 Convs became Gemms
    onnx.checker.check_model(after, full_check=True)
    x = np.random.default_rng(0).random((3 if dynamic else 1, 32, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-5, atol=1e-5)

    again, second = clean_se_blocks(after)  # clean blocks of every gate are left as they are
    assert (second.found, second.rewritten) == (blocks, 0)
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in after.graph.node]


def test_convs_that_are_not_fully_connected_are_no_se_block():
    """A grouped 'FC' conv on the pooled map, or a SiLU-like gate mixing in another tensor, is left alone."""
    import torch
    from torch import nn

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Conv2d(8, 4, 1, groups=2), nn.Conv2d(4, 8, 1, groups=2)

        def forward(self, x):
            return x * torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))

    class OtherGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up, self.other = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            scale = self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True))))
            return x * (scale * torch.sigmoid(self.other(x.mean((2, 3), keepdim=True))))

    for module in (Grouped(), OtherGate()):
        model = _export_module(nn.Sequential(nn.Conv2d(32, 8, 1), module).eval(), dynamic=False, dynamo=False)
        after, report = clean_se_blocks(model)
        assert report.found == 0, type(module).__name__
        assert [n.op_type for n in after.graph.node] == [n.op_type for n in model.graph.node]
