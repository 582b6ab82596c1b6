"""``val``: agreement with YOLOv5's val.py on the fixture set, the COCO scoring, and val.py's input geometry."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CHECKPOINT, FIXTURES, run_cli

from se_deploy.evaluation.dataset import Dataset
from se_deploy.errors import SeDeployError
from se_deploy.evaluation.evaluate import coco_map, evaluate, fit_image, plan_batches

DATA = FIXTURES / "dataset" / "synth_shapes.yaml"
UPSTREAM_ONNX = FIXTURES / "onnx" / "upstream-export-320.onnx"
POINT = 0.01  # one mAP point


def reference(name: str) -> dict:
    return json.loads((FIXTURES / "val" / f"se-yolov5n-shapes_{name}.json").read_text())


def assert_agrees(result: dict, ref: dict) -> None:
    assert abs(result["map50"] - ref["mAP50"]) < POINT, (result["map50"], ref["mAP50"])
    assert abs(result["map50_95"] - ref["mAP50-95"]) < POINT, (result["map50_95"], ref["mAP50-95"])
    for c in result["per_class"]:
        assert abs(c["map50_95"] - ref["per_class_mAP50-95_from_return"][c["name"]]) < POINT, c
        assert c["instances"] == ref["table_from_log"][c["name"]]["instances"]


def test_onnx_320_matches_yolov5_val(fixtures):
    result = evaluate(UPSTREAM_ONNX, DATA)
    assert result["images"] == 60 and result["instances"] == 199
    assert result["input_shapes"] == [[320, 320]] and result["rect"] is False
    assert_agrees(result, reference("onnx_static"))


def test_pt_uses_rect_batches_and_matches_yolov5_val(fixtures):
    result = evaluate(CHECKPOINT, DATA, imgsz=320)
    assert result["input_shapes"] == [[352, 352]]  # what val.py ran the .pt at (rect, pad 0.5)
    assert result["backend"] == "pytorch" and result["model"] == str(CHECKPOINT)
    assert_agrees(result, reference("pt_b16"))


def test_cli_json_and_table(fixtures, tmp_path):
    yaml_path = tmp_path / "four.yaml"  # a .txt list of four images
    images = sorted((FIXTURES / "dataset" / "images" / "val").glob("*.jpg"))[:4]
    (tmp_path / "list.txt").write_text("\n".join(map(str, images)))
    yaml_path.write_text("path: .\nval: list.txt\nnc: 3\nnames: [circle, rectangle, triangle]\n")
    r = run_cli("val", "--model", UPSTREAM_ONNX, "--data", yaml_path, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"map50", "map50_95", "per_class", "images", "model"} <= result.keys()
    assert result["images"] == 4 and result["model"] == str(UPSTREAM_ONNX) and result["precision"] == "fp32"
    assert 0 < result["map50_95"] <= result["map50"] <= 1
    r = run_cli("val", "--model", UPSTREAM_ONNX, "--data", yaml_path)
    assert r.returncode == 0 and "mAP@0.5:0.95" in r.stdout and "triangle" in r.stdout


def test_fixed_size_model_refuses_another_imgsz_and_wrong_class_count(fixtures, tmp_path):
    with pytest.raises(SeDeployError, match="built for 320x320"):
        evaluate(UPSTREAM_ONNX, DATA, imgsz=640)
    two_classes = tmp_path / "two.yaml"
    two_classes.write_text(f"path: {FIXTURES / 'dataset'}\nval: images/val\nnames: [a, b, c, d]\n")
    with pytest.raises(SeDeployError, match="predicts 3 classes but .* has nc 4"):
        evaluate(UPSTREAM_ONNX, two_classes)


def toy_dataset(labels: list[np.ndarray]) -> Dataset:
    return Dataset(Path("toy.yaml"), "val", Path("."), {0: "a", 1: "b", 2: "c"},
                   [Path(f"{i}.jpg") for i in range(len(labels))], labels)


def test_coco_map_scores_perfect_partial_and_missing_detections():
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.4], [1, 0.25, 0.25, 0.1, 0.1]], np.float32),
              np.array([[0, 0.3, 0.6, 0.2, 0.2]], np.float32)]
    hw = [(100, 200), (50, 50)]
    truth = []
    for (h, w), lb in zip(hw, labels):
        cx, cy, bw, bh = lb[:, 1] * w, lb[:, 2] * h, lb[:, 3] * w, lb[:, 4] * h
        truth.append(np.column_stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, np.full(len(lb), 0.9),
                                      lb[:, 0])).astype(np.float32))
    ds = toy_dataset(labels)
    perfect = coco_map(ds, hw, truth, 300)
    assert perfect["map50"] == pytest.approx(1.0) and perfect["map50_95"] == pytest.approx(1.0)
    assert perfect["per_class"][2] == {"class": 2, "name": "c", "instances": 0, "map50": None, "map50_95": None}

    shifted = [d.copy() for d in truth]
    shifted[1][:, [0, 2]] += 0.2 * (shifted[1][0, 2] - shifted[1][0, 0])  # IoU 0.67: counts at 0.5..0.65 only
    result = coco_map(ds, hw, shifted, 300)
    assert result["per_class"][1]["map50_95"] == pytest.approx(1.0)
    assert result["per_class"][0]["map50"] == pytest.approx(1.0)
    assert result["per_class"][0]["map50_95"] < 0.9

    nothing = coco_map(ds, hw, [np.zeros((0, 6), np.float32)] * 2, 300)
    assert nothing["map50"] == 0 and nothing["per_class"][0]["map50"] == 0


def test_rect_batches_and_letterbox_follow_val_py(tmp_path):
    sizes = [(480, 640), (320, 320), (640, 480), (300, 400)]  # (h, w)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), np.full((h, w, 3), 50, np.uint8))
    ds = Dataset(Path("x.yaml"), "val", tmp_path, {0: "a"}, paths, [np.zeros((0, 5), np.float32)] * 4)
    batches = plan_batches(ds, 320, 2, rect=True, stride=32)
    assert [b.indices for b in batches] == [[0, 3], [1, 2]]  # sorted by h/w: 0.75, 0.75, 1.0, 1.33
    assert [b.shape for b in batches] == [(256, 352), (352, 352)]
    assert [b.shape for b in plan_batches(ds, 320, 3, rect=False, stride=32)] == [(320, 320)] * 2

    img, info = fit_image(cv2.imread(str(paths[0])), 320, (256, 352))
    assert img.shape == (256, 352, 3)
    assert info.ratio == pytest.approx(0.5) and info.pad == (16, 8) and info.orig_hw == (480, 640)
