"""FP16 / INT8 at the ONNX level (ModelOpt on CPU), the acceptance check, and calibration pre-processing.

The models are the fixture checkpoint's ONNX; INT8 calibrates on a small train split made with the
fixture's generator (never on the val images).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from se_deploy.errors import SeDeployError
from se_deploy.precision.quantize import (
    QuantizeCheckFailed,
    detect_nodes,
    qdq_report,
    quantize_onnx,
    quantized_path,
    resolve_keep_fp32,
    se_nodes,
)
from tests.conftest import FIXTURES, ref_input, run_cli


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "shapes.onnx"
    shutil.copyfile(FIXTURES / "onnx" / "upstream-export-320.onnx", path)
    return path


@pytest.fixture(scope="module")
def train_images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, str(FIXTURES / "make_synth_data.py"), "dataset", "--out", str(out),
                    "--train", "16", "--val", "0"], check=True, capture_output=True)
    return out / "images" / "train"


@pytest.fixture(scope="module")
def fp16_result(fp32_onnx, tmp_path_factory):
    return quantize_onnx(fp32_onnx, "fp16", out=tmp_path_factory.mktemp("fp16") / "shapes.fp16.onnx")


@pytest.fixture(scope="module")
def int8_result(fp32_onnx, train_images, tmp_path_factory):
    return quantize_onnx(fp32_onnx, "int8", calib=train_images, out=tmp_path_factory.mktemp("int8") / "shapes.int8.onnx")


def _props(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# --- FP16 ----------------------------------------------------------------------------------------------
def test_fp16_passes_its_check_and_keeps_the_model_facts(fp16_result, fp32_onnx):
    assert fp16_result.passed and fp16_result.path.is_file()
    check = fp16_result.check
    assert check.precision == "fp16" and check.thresholds.boxes == 4.0
    assert check.max_abs_error["boxes"] < 1.0 and check.detection_agreement >= 0.95
    props = _props(fp16_result.path)
    assert props["precision"] == "fp16"
    assert props["names"] == "{0: 'circle', 1: 'rectangle', 2: 'triangle'}" and props["stride"] == "32"
    from se_deploy.artifacts import sha256_file

    assert props["quantized_from_sha256"] == sha256_file(fp32_onnx)


def test_fp16_runs_float16_inside_and_float32_at_the_edges(fp16_result):
    model = onnx.load(str(fp16_result.path))
    assert any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_fp16_keeps_the_detect_head_in_fp32(fp16_result, fp32_onnx):
    model = onnx.load(str(fp16_result.path))
    kept = set(detect_nodes(onnx.load(str(fp32_onnx))))
    assert set(fp16_result.kept_fp32) == kept
    fp16 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    head_weights = [i for n in model.graph.node if n.name in kept and n.op_type == "Conv" for i in n.input[1:]]
    assert head_weights and not fp16.intersection(head_weights)


def test_fp16_model_runs_in_onnxruntime_as_fp16(fp16_result):
    from se_deploy.runners import load_runner

    x = ref_input("input_val3")[:1]
    with load_runner(fp16_result.path, device="cpu") as runner:
        assert runner.precision == "fp16" and runner.names[2] == "triangle"
        pred = runner.infer(x)
    ref = np.load(FIXTURES / "refs" / "se-yolov5n-shapes" / "raw_input_val3.npy")[:1]
    assert np.abs(pred[..., 4:] - ref[..., 4:]).max() < 2e-2


# --- INT8 ----------------------------------------------------------------------------------------------
def test_int8_has_symmetric_qdq_and_passes_its_check(int8_result):
    assert int8_result.passed, int8_result.failures
    qdq = int8_result.qdq
    assert qdq["quantize_nodes"] > 50 and qdq["quantized_ops"]["Conv"] >= 57
    assert qdq["nonzero_zero_points"] == []
    assert int8_result.calibration == {"source": str(int8_result.calibration["source"]), "images": 16,
                                       "method": "entropy", "imgsz": [320, 320]}
    assert int8_result.check.precision == "int8" and int8_result.check.thresholds.boxes is None


def test_int8_leaves_the_detect_head_unquantized(int8_result, fp32_onnx):
    model = onnx.load(str(int8_result.path))
    producer = {o: n for n in model.graph.node for o in n.output}
    heads = [n for n in model.graph.node if n.name in set(detect_nodes(onnx.load(str(fp32_onnx)))) and n.op_type == "Conv"]
    assert len(heads) == 3
    for conv in heads:
        assert all(getattr(producer.get(i), "op_type", None) != "DequantizeLinear" for i in conv.input)


def test_int8_model_is_seen_as_int8(int8_result):
    from se_deploy.runners import load_runner

    with load_runner(int8_result.path, device="cpu") as runner:
        assert runner.precision == "int8"
    assert _props(int8_result.path)["calibration"] == "16 images, entropy"


def test_int8_without_calibration_is_refused(fp32_onnx, tmp_path):
    with pytest.raises(SeDeployError, match="INT8 needs calibration images: pass --calib DIR"):
        quantize_onnx(fp32_onnx, "int8", out=tmp_path / "x.onnx")


def test_failed_check_writes_nothing(fp32_onnx, tmp_path):
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(2):  # ranges from all-black images: everything real saturates
        cv2.imwrite(str(blank / f"{i}.png"), np.zeros((320, 320, 3), np.uint8))
    out = tmp_path / "bad.int8.onnx"
    with pytest.raises(QuantizeCheckFailed) as e:
        quantize_onnx(fp32_onnx, "int8", calib=blank, out=out)
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    assert e.value.result.failures and "rejected, nothing written" in str(e.value)


# --- refusals ------------------------------------------------------------------------------------------
def test_quantized_input_is_refused(fp16_result, tmp_path):
    with pytest.raises(SeDeployError, match="already fp16; quantize the FP32 model"):
        quantize_onnx(fp16_result.path, "int8", calib=tmp_path, out=tmp_path / "x.onnx")


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int4"}, "--precision int4: expected one of fp16, int8"),
    ({"precision": "fp16", "keep_fp32": ["neck"]}, "--keep-fp32 neck: neither a group"),
    ({"precision": "fp16", "out": "x.txt"}, "must end in .onnx"),
    ({"precision": "int8", "calib": ".", "calib_method": "percentile"}, "--calib-method percentile"),
])
def test_bad_options_are_refused(fp32_onnx, kwargs, message):
    with pytest.raises(SeDeployError, match=message):
        quantize_onnx(fp32_onnx, **kwargs)


def test_output_may_not_overwrite_the_source(fp32_onnx):
    with pytest.raises(SeDeployError, match="would overwrite the FP32 model"):
        quantize_onnx(fp32_onnx, "fp16", out=fp32_onnx)


def test_not_an_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not protobuf")
    with pytest.raises(SeDeployError, match="not a readable ONNX model"):
        quantize_onnx(bad, "fp16")


def test_default_output_goes_to_engines():
    assert quantized_path("runs/model.onnx", "int8") == Path("engines/model.int8.onnx")


# --- graph facts ---------------------------------------------------------------------------------------
def test_detect_nodes_are_the_head_convs_and_the_decode(fp32_onnx):
    model = onnx.load(str(fp32_onnx))
    nodes = {n.name: n for n in model.graph.node}
    found = detect_nodes(model)
    assert sorted(n for n in found if nodes[n].op_type == "Conv") == [f"/model.25/m.{i}/Conv" for i in range(3)]
    assert len(found) > 3 and all(n.startswith("/model.25/") for n in found)
    assert any(model.graph.output[0].name in nodes[n].output for n in found)


def test_se_nodes_are_the_squeeze_excite_branch(fp32_onnx):
    model = onnx.load(str(fp32_onnx))
    ops = sorted(n.op_type for n in model.graph.node if n.name in set(se_nodes(model)))
    assert ops == ["Expand", "GlobalAveragePool", "MatMul", "MatMul", "Relu", "Reshape", "Reshape", "Sigmoid"]


def test_keep_fp32_mixes_groups_and_node_names(fp32_onnx):
    model = onnx.load(str(fp32_onnx))
    kept = resolve_keep_fp32(model, ["se", "/model.0/conv/Conv", "se"])
    assert kept[-1] == "/model.0/conv/Conv" and len(kept) == len(set(kept)) == len(se_nodes(model)) + 1


def _qdq_model(zero_point: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("Relu", ["dq"], ["y"], name="relu")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def test_qdq_report_flags_asymmetric_quantization():
    assert qdq_report(_qdq_model(3))["nonzero_zero_points"] == ["q", "dq"]
    report = qdq_report(_qdq_model(0))
    assert report["nonzero_zero_points"] == [] and report["quantized_ops"] == {"Relu": 1}


# --- calibration pre-processing ------------------------------------------------------------------------
def test_calibration_batches_are_the_inference_preprocessing(train_images):
    from se_deploy.precision.calibration import LetterboxCalibrationReader, select_images
    from se_deploy.inference.preprocess import letterbox, read_image, to_input

    files = select_images(train_images, 3)
    reader = LetterboxCalibrationReader(files, "images", (256, 256))
    first = reader.get_first()["images"]
    img, _, _ = letterbox(read_image(files[0]), (256, 256))
    np.testing.assert_array_equal(first[0], to_input(img))
    batches = [reader.get_next() for _ in range(4)]
    assert batches[3] is None and np.array_equal(batches[0]["images"], first)
    reader.rewind()
    assert np.array_equal(reader.get_next()["images"], first)


def test_calibration_images_are_spread_over_the_set(train_images):
    from se_deploy.precision.calibration import select_images

    files = sorted(train_images.glob("*.jpg"))
    assert select_images(train_images, 4) == [files[i] for i in (0, 5, 10, 15)]
    assert select_images(train_images, 100) == files
    with pytest.raises(SeDeployError, match="--calib-size 0"):
        select_images(train_images, 0)


def test_static_batch_takes_whole_batches(train_images):
    from se_deploy.precision.calibration import LetterboxCalibrationReader, select_images

    files = select_images(train_images, 5)
    assert len(LetterboxCalibrationReader(files, "images", (64, 64), batch=2)) == 4
    with pytest.raises(SeDeployError, match="at least 8 calibration images"):
        LetterboxCalibrationReader(files, "images", (64, 64), batch=8)


def test_empty_calibration_folder_is_refused(fp32_onnx, tmp_path):
    with pytest.raises(SeDeployError, match="no images found"):
        quantize_onnx(fp32_onnx, "int8", calib=tmp_path, out=tmp_path / "x.onnx")


# --- CLI -----------------------------------------------------------------------------------------------
def test_cli_quantize_fp16_reports_the_check(fp32_onnx, tmp_path):
    result = run_cli("quantize", fp32_onnx, "--precision", "fp16", "-o", tmp_path / "m.fp16.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accepted" in result.stdout and "detections agree 100.0%" in result.stdout
    assert (tmp_path / "m.fp16.onnx").is_file()


def test_cli_int8_without_calib_is_one_line(fp32_onnx, tmp_path):
    result = run_cli("quantize", fp32_onnx, "--precision", "int8", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: INT8 needs calibration images") and result.stderr.count("\n") == 1
