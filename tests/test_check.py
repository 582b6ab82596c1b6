"""``check``: a deployed model against its checkpoint on the same letterboxed images; exit 0 pass,
1 fail, 2 when the model belongs to another checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CHECKPOINT, FIXTURES
from export_helpers import run_main, save_tiny_checkpoint

from se_deploy.errors import SeDeployError
from se_deploy.export.onnx_export import export_onnx
from se_deploy.evaluation.parity import THRESHOLDS, run_parity_check

UPSTREAM_ONNX = FIXTURES / "onnx" / "upstream-export-320.onnx"


def test_upstream_onnx_passes_with_full_agreement(fixtures, tmp_path, capsys):
    code = run_main("check", "-m", UPSTREAM_ONNX, "-w", CHECKPOINT, "--json")
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(out)  # stdout holds the JSON and nothing else
    assert {"passed", "max_abs_error", "detection_agreement", "precision"} <= set(data)
    assert data["passed"] is True and data["precision"] == "fp32" and data["detection_agreement"] == 1.0
    assert data["images"] == 8 and data["imgsz"] == [320, 320]
    assert data["max_abs_error"]["boxes"] <= 1e-2 and data["max_abs_error"]["scores"] <= 1e-3
    assert data["detections"]["reference"] == data["detections"]["model"] > 0


def test_images_option_selects_the_images(fixtures):
    report = run_parity_check(UPSTREAM_ONNX, CHECKPOINT, images=FIXTURES / "dataset/images/val/val_00001*.jpg")
    assert report.images == 10 and report.passed


def test_perturbed_model_fails_with_exit_1(fixtures, tmp_path, capsys):
    model = onnx.load(UPSTREAM_ONNX)
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(i for i in model.graph.initializer if i.name == first_conv.input[1])
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * np.float32(1.05), weight.name))
    onnx.save(model, tmp_path / "perturbed.onnx")

    code = run_main("check", "--model", tmp_path / "perturbed.onnx", "--weights", CHECKPOINT)
    assert code == 1
    assert "FAIL" in capsys.readouterr().out

    assert run_main("check", "-m", tmp_path / "perturbed.onnx", "-w", CHECKPOINT, "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False and any("scores" in f for f in data["failures"])


def test_precision_picks_the_limits(fixtures):
    report = run_parity_check(UPSTREAM_ONNX, CHECKPOINT, precision="fp16")
    assert report.precision == "fp16" and report.thresholds == THRESHOLDS["fp16"] and report.passed
    with pytest.raises(SeDeployError, match="--precision bf16"):
        run_parity_check(UPSTREAM_ONNX, CHECKPOINT, precision="bf16")


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """ONNX files of other models: 2 classes; 3 classes but strides 8/16 at 336 px and at 320 px."""
    root = tmp_path_factory.mktemp("others")
    two_classes = save_tiny_checkpoint(root / "nc2.pt", nc=2)
    two_levels = save_tiny_checkpoint(root / "p3p4.pt", nc=3, three_levels=False)
    return {
        "classes": export_onnx(two_classes, root / "nc2.onnx", imgsz=320, check=False).onnx,
        "stride": export_onnx(two_levels, root / "p3p4-336.onnx", imgsz=336, check=False).onnx,
        "anchors": export_onnx(two_levels, root / "p3p4-320.onnx", imgsz=320, check=False).onnx,
    }


@pytest.mark.parametrize("kind, message", [
    ("classes", "nc2.onnx has 2 classes but se-yolov5n-shapes.pt has 3"),
    ("stride", "input 336x336 is not a multiple of se-yolov5n-shapes.pt's stride 32"),
    ("anchors", "p3p4-320.onnx gives 6000 anchors but se-yolov5n-shapes.pt gives 6300"),
])
def test_model_of_another_checkpoint_is_refused(fixtures, other_models, tmp_path, capsys, kind, message):
    code = run_main("check", "-m", other_models[kind], "-w", CHECKPOINT, "--json")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r.json").exists()


def test_checkpoint_given_as_model_is_refused(fixtures, capsys):
    assert run_main("check", "-m", CHECKPOINT, "-w", CHECKPOINT) == 2
    assert "not a checkpoint" in capsys.readouterr().err
