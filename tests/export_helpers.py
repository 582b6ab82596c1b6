"""Helpers for the export/SE-pass/check tests: tiny random-weight SE-YOLOv5 checkpoints built from YAML
dicts and saved like train.py, the canonical-SE assertion, and an in-process CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

from se_deploy.export.se_graph_pass import FORBIDDEN, canonical, find_se_blocks

SE_BLOCKS = 3  # in tiny_yaml
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def tiny_yaml(nc: int = 2, three_levels: bool = True) -> dict:
    """SE twice in the backbone and once in the head; Detect on strides 8/16/32, or on 8/16 with no P5 at all."""
    if not three_levels:
        backbone = [
            [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]],  # 0-2 P3/8
            [-1, 1, "SEAttention", [64, 4]],  # 3
            [-1, 1, "Conv", [64, 3, 2]],  # 4 P4/16
            [-1, 1, "SEAttention", [64, 4]],  # 5
        ]
        head = [[-1, 1, "C3", [64, False]], [-1, 1, "SEAttention", [64, 4]], [[3, 7], 1, "Detect", ["nc", "anchors"]]]
        return {"nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": ANCHORS[:2],
                "backbone": backbone, "head": head}
    backbone = [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 P1/2
        [-1, 1, "Conv", [32, 3, 2]],  # 1 P2/4
        [-1, 1, "C3", [32]],  # 2
        [-1, 1, "Conv", [64, 3, 2]],  # 3 P3/8
        [-1, 1, "SEAttention", [64, 4]],  # 4 SE in the backbone
        [-1, 1, "Conv", [64, 3, 2]],  # 5 P4/16
        [-1, 1, "Conv", [128, 3, 2]],  # 6 P5/32
        [-1, 1, "SEAttention", [128, 8]],  # 7 SE in the backbone
        [-1, 1, "SPPF", [128, 5]],  # 8
    ]
    head = [
        [-1, 1, "Conv", [64, 1, 1]],  # 9
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 10
        [[-1, 5], 1, "Concat", [1]],  # 11
        [-1, 1, "C3", [64, False]],  # 12
        [-1, 1, "SEAttention", [64, 4]],  # 13 SE in the head (P4 output)
        [[4, 13, 8], 1, "Detect", ["nc", "anchors"]],  # 14
    ]
    return {"nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": ANCHORS,
            "backbone": backbone, "head": head}


def tiny_model(nc: int = 2, three_levels: bool = True, seed: int = 0):
    import torch

    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(tiny_yaml(nc, three_levels)).eval()
    model.names = {i: f"shape{i}" for i in range(nc)}
    return model


def save_tiny_checkpoint(path: Path, nc: int = 2, three_levels: bool = True) -> Path:
    """A YOLOv5-style checkpoint dict with an FP16 model, as train.py's strip_optimizer leaves it."""
    import torch

    model = tiny_model(nc, three_levels)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.save({"epoch": -1, "best_fitness": None, "model": model.half(), "ema": None, "updates": None,
                "optimizer": None, "opt": {}, "date": "test"}, path)
    return path


def assert_canonical(model: onnx.ModelProto, expected_blocks: int, gate: str = "sigmoid", bias: bool = False) -> None:
    """Every SE block is exactly canonical(gate): Gemm transB=1 (with a bias only if ``bias``), one Unsqueeze
    on 2,3, x * scale."""
    blocks = find_se_blocks(model)
    assert len(blocks) == expected_blocks
    for block in blocks:
        assert tuple(block.ops) == canonical(gate), block.ops
        assert block.helper_ops == [], block.helper_ops
        assert not FORBIDDEN & set(block.all_ops)
        assert block.clean and block.problem is None and (block.gate, block.bias) == (gate, bias)
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name: i for i in model.graph.initializer}
    muls = [n for n in model.graph.node if n.op_type == "Mul" and producers.get(n.input[1]) is not None
            and producers[n.input[1]].op_type == "Unsqueeze"]
    assert len(muls) == expected_blocks
    for mul in muls:
        unsqueeze = producers[mul.input[1]]
        assert onnx.numpy_helper.to_array(inits[unsqueeze.input[1]]).tolist() == [2, 3]
        gate_out = producers[unsqueeze.input[0]]
        if gate == "silu":  # v * Sigmoid(v)
            sigmoid = producers[gate_out.input[1]]
            assert sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == gate_out.input[0]
        gemm2 = producers[gate_out.input[0]]
        gemm1 = producers[producers[gemm2.input[0]].input[0]]
        flatten = producers[gemm1.input[0]]
        pool = producers[flatten.input[0]]
        assert pool.op_type == "GlobalAveragePool" and pool.input[0] == mul.input[0]  # the same x, broadcast Mul
        for gemm in (gemm1, gemm2):
            assert len(gemm.input) == (3 if bias else 2)
            assert {a.name: a.i for a in gemm.attribute if a.name in ("transA", "transB")} == {"transB": 1}


def run_main(*args) -> int:
    """Run the CLI in this process (``main`` with ``args``) and return its exit code; read output with capsys."""
    from se_deploy.cli import main

    argv, sys.argv = sys.argv, ["se-deploy", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code
