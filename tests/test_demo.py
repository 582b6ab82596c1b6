"""`se-deploy demo` with no arguments: export -> check -> infer on the bundled checkpoint and clip."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import cv2
from conftest import FIXTURES, run_cli

from se_deploy import demo
from se_deploy.export import onnx_export as export
from se_deploy.artifacts import DEMO_VIDEO
from se_deploy.model_select import tensorrt_usable


def test_demo_with_no_arguments_runs_the_chain_and_says_where(tmp_path):
    proc = run_cli("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    demo = tmp_path / "runs" / "demo"
    onnx = tmp_path / "engines" / "se-yolov5n-shapes.onnx"  # the workspace, where build-trt and infer look
    video, jsonl = demo / "synth_shapes_60f.avi", demo / "detections.jsonl"
    assert onnx.is_file() and video.is_file() and jsonl.is_file()
    out = " ".join(proc.stdout.split())  # the table may wrap long paths
    assert "PASS" in out and "runs/demo" in out and "synth_shapes_60f.avi" in out
    if not tensorrt_usable():
        assert "TensorRT is not usable here" in out
        assert not list((tmp_path / "engines").glob("*.engine"))
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == int(cv2.VideoCapture(str(DEMO_VIDEO)).get(cv2.CAP_PROP_FRAME_COUNT))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 60 and sum(len(r["detections"]) for r in records) > 100


def test_demo_builds_checks_and_uses_the_engine_when_tensorrt_is_usable(fixtures, tmp_path, monkeypatch):
    """The TensorRT branch's flow, with the GPU steps stood in for (this test runs where TensorRT is not)."""
    onnx = tmp_path / "model.onnx"
    shutil.copy(FIXTURES / "onnx" / "upstream-export-320.onnx", onnx)
    passing = SimpleNamespace(passed=True)
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: SimpleNamespace(onnx=onnx, parity=passing))
    engine_check = SimpleNamespace(passed=False)
    built = []

    def fake_build(onnx_path, out_dir, say):
        built.append(onnx_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        stand_in = out_dir / "stand-in-for-engine.onnx"  # runs under ONNX Runtime here
        shutil.copy(onnx_path, stand_in)
        return stand_in, engine_check

    monkeypatch.setattr(demo, "build_checked_engine", fake_build)
    failed = demo.run_demo(tmp_path / "a", tensorrt=True, engines_dir=tmp_path / "a")
    assert built == [onnx] and not failed.passed and failed.infer is None  # a failed check stops the chain

    engine_check.passed = True
    report = demo.run_demo(tmp_path / "b", tensorrt=True, engines_dir=tmp_path / "b")
    assert report.passed and "stand-in-for-engine.onnx" in report.infer.model and report.infer.frames == 60
