"""``report``: end to end on CPU (PyTorch, ONNX FP32/FP16/INT8), artifact reuse, and its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import CHECKPOINT, FIXTURES, run_cli

from se_deploy.errors import SeDeployError
from se_deploy.evaluation.report import build_report, make_artifacts, markdown, parse_precisions, plot

VAL_IMAGES = 12


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, Path]:
    """A DATA.yaml over the first fixture val images, and the 120 first training images for calibration."""
    root = tmp_path_factory.mktemp("report-data")
    images = sorted((FIXTURES / "dataset" / "images" / "val").glob("*.jpg"))[:VAL_IMAGES]
    (root / "val.txt").write_text("\n".join(map(str, images)) + "\n")
    (root / "data.yaml").write_text("path: .\nval: val.txt\nnc: 3\nnames: [circle, rectangle, triangle]\n")
    subprocess.run([sys.executable, str(FIXTURES / "make_synth_data.py"), "dataset", "--out", str(root / "synth"),
                    "--train", "120", "--val", "0"], check=True, capture_output=True)
    return root / "data.yaml", root / "synth" / "images" / "train"


def test_report_end_to_end_on_cpu(fixtures, small_set, tmp_path):
    data, calib = small_set
    workdir, out = tmp_path / "engines", tmp_path / "out"
    r = run_cli("report", CHECKPOINT, "--data", data, "--calib", calib, "--imgsz", "320", "--iters", "3",
                "--workdir", workdir, "--out-dir", out, "--no-trt")
    report = json.loads((out / "report.json").read_text())
    rows = {(row["backend"], row["precision"]): row for row in report["rows"]}
    assert r.returncode == 0, r.stderr
    assert report["rejected"] == []
    assert list(rows) == [("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8")]
    assert report["images"] == VAL_IMAGES
    for (backend, precision), row in rows.items():
        assert 0 < row["map50_95"] <= row["map50"] <= 1
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["throughput"] > 0
        assert row["size_mb"] > 0 and Path(row["model"]).is_file()
        assert row["parity"] == ("reference" if backend == "pytorch" else "pass"), row["parity_detail"]
        assert row["delta_map50_95"] == pytest.approx((row["map50_95"] - rows["pytorch", "fp32"]["map50_95"]) * 100,
                                                      abs=0.01)
    assert abs(rows["onnxruntime", "fp32"]["delta_map50_95"]) < 0.1  # same model, same input: same mAP
    assert abs(rows["onnxruntime", "fp16"]["delta_map50_95"]) < 1.0
    printed = [[cell.strip() for cell in line.split("│")[1:-1]] for line in r.stdout.splitlines() if "│" in line]
    assert [cells[:2] for cells in printed] == [list(key) for key in rows]  # the table on stdout, a row each
    md = (out / "report.md").read_text()
    assert sum(line.startswith(("| pytorch |", "| onnxruntime |")) for line in md.splitlines()) == len(rows)
    png = cv2.imread(str(out / "report.png"))
    assert png is not None and png.shape[0] > 200 and png.shape[1] > 200

    # a second run finds every artifact current and makes nothing
    before = {p.name: p.stat().st_mtime_ns for p in workdir.glob("*.onnx")}
    assert len(before) == len(rows) - 1
    made = list(rows)[1:]
    artifacts, _ = make_artifacts(CHECKPOINT, [p for _, p in made], 320, 1, workdir, calib, 256, False,
                                  lambda message: pytest.fail(f"rebuilt: {message}"))
    assert [(b, p) for b, p, _ in artifacts] == made
    assert {p.name: p.stat().st_mtime_ns for p in workdir.glob("*.onnx")} == before


def test_bad_options_fail_before_any_work(fixtures, small_set, tmp_path):
    data, _ = small_set
    with pytest.raises(SeDeployError, match="INT8 needs calibration images"):
        build_report(CHECKPOINT, data, "fp32,int8", workdir=tmp_path)
    with pytest.raises(SeDeployError, match="--max-map-drop applies to INT8"):
        build_report(CHECKPOINT, data, "fp32,fp16", max_map_drop=1.0, workdir=tmp_path)
    with pytest.raises(SeDeployError, match="expected a comma-separated subset"):
        parse_precisions("fp32,int4")
    with pytest.raises(SeDeployError, match="multiple of 32"):
        build_report(CHECKPOINT, data, "fp32", imgsz=300, workdir=tmp_path)
    assert not list(tmp_path.iterdir())
    assert parse_precisions(" FP16,fp32,fp16 ") == ["fp16", "fp32"]


def fake_report() -> dict:
    per_class = [{"class": 0, "name": "a", "instances": 3, "map50": 0.5, "map50_95": 0.3},
                 {"class": 1, "name": "b", "instances": 0, "map50": None, "map50_95": None}]
    row = {"backend": "pytorch", "precision": "fp32", "size_mb": 3.6, "map50": 0.5, "map50_95": 0.3,
           "delta_map50_95": 0.0, "p50_ms": 10.0, "p99_ms": 12.5, "throughput": 99.0, "parity": "reference",
           "per_class": per_class}
    int8 = {**row, "backend": "onnxruntime", "precision": "int8", "map50_95": 0.29, "delta_map50_95": -1.0,
            "p50_ms": 5.0, "parity": "FAIL"}
    return {"weights": "w.pt", "data": "d.yaml", "images": 2, "instances": 3, "imgsz": 320, "batch": 1, "iters": 5,
            "rows": [row, int8], "notes": ["a note"]}


def test_markdown_and_plot(tmp_path):
    md = markdown(fake_report())
    assert "| onnxruntime | int8 | 3.60 | 0.5000 | 0.2900 | -1.00 | 5.00 | 12.50 | 99.0 | FAIL |" in md
    assert "| pytorch fp32 | 0.3000 | - |" in md and "- a note" in md
    plot(fake_report(), tmp_path / "r.png")
    assert cv2.imread(str(tmp_path / "r.png")) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temporary file left behind
