"""``export``: the fixture checkpoint's ONNX reproduces upstream's references, carries YOLOv5-readable
metadata, has canonical SE blocks, runs at any batch when dynamic; bad inputs fail in one line."""

from __future__ import annotations

import ast
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CHECKPOINT, CLIP, REFS, ref_input, run_cli
from export_helpers import SE_BLOCKS, assert_canonical, run_main, save_tiny_checkpoint, tiny_model

from se_deploy import __version__
from se_deploy.artifacts import sha256_file
from se_deploy.errors import SeDeployError
from se_deploy.export.onnx_export import export_onnx
from se_deploy.inference.postprocess import non_max_suppression

REF_INPUTS = ("input_val3", "input_rand_seed0", "input_video_f0_f30")


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_each(session, x: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def static_export(fixtures, tmp_path_factory):
    return export_onnx(CHECKPOINT, tmp_path_factory.mktemp("static") / "fixture.onnx", imgsz=320)


@pytest.fixture(scope="module")
def dynamic_export(fixtures, tmp_path_factory):
    return export_onnx(CHECKPOINT, tmp_path_factory.mktemp("dynamic") / "fixture.onnx", imgsz=320, dynamic=True,
                       check=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-se.pt")


def test_fixture_onnx_reproduces_upstream_references(static_export):
    session = _session(static_export.onnx)
    for name in REF_INPUTS:
        pred = _run_each(session, ref_input(name))
        ref = np.load(REFS / "se-yolov5n-shapes" / f"raw_{name}.npy")
        assert pred.shape == ref.shape == (len(ref), 6300, 8)
        assert np.abs(pred[..., :4] - ref[..., :4]).max() <= 1e-2, name  # boxes, input pixels
        assert np.abs(pred[..., 4:] - ref[..., 4:]).max() <= 1e-3, name  # objectness and class scores


def test_fixture_export_passes_check_with_full_agreement(static_export):
    parity = static_export.parity
    assert parity.passed and parity.failures == []
    assert parity.precision == "fp32" and parity.backend == "onnxruntime"
    assert parity.detection_agreement == 1.0
    assert parity.detections["reference"] == parity.detections["model"] > 0
    assert parity.max_abs_error["boxes"] <= 1e-2 and parity.max_abs_error["scores"] <= 1e-3


def test_fixture_export_graph_report_and_metadata(static_export):
    model = onnx.load(static_export.onnx)
    assert_canonical(model, 1)
    assert (static_export.se.found, static_export.se.rewritten) == (1, 1)
    nodes = static_export.nodes
    assert nodes["final"] == len(model.graph.node) <= nodes["simplified"] < nodes["exported"]
    assert static_export.simplifier == "onnxsim" and static_export.notices == []
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, 320, 320]
    assert out.name == "output0" and [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 6300, 8]
    assert model.opset_import[0].version == 17

    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) == {"stride", "names", "imgsz", "nc", "batch", "dynamic", "se_blocks", "source_sha256",
                         "se_deploy_version"}  # what a user or tool reads, nothing a simplifier adds about itself
    # what YOLOv5's DetectMultiBackend does with them
    assert int(meta["stride"]) == 32
    assert ast.literal_eval(meta["names"]) == {0: "circle", 1: "rectangle", 2: "triangle"}
    assert meta["names"] == "{0: 'circle', 1: 'rectangle', 2: 'triangle'}"
    assert {k: meta[k] for k in ("imgsz", "nc", "batch", "dynamic", "se_blocks")} == {
        "imgsz": "[320, 320]", "nc": "3", "batch": "1", "dynamic": "False", "se_blocks": "1"}
    assert meta["source_sha256"] == sha256_file(CHECKPOINT)
    assert meta["se_deploy_version"] == __version__


def test_dynamic_batch_gives_identical_results_at_batch_1_3_8(dynamic_export):
    model = onnx.load(dynamic_export.onnx)
    assert_canonical(model, 1)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert dynamic_export.metadata["dynamic"] == "True"
    x = np.concatenate([ref_input(name) for name in REF_INPUTS])
    x = np.concatenate([x, x[::-1]])[:8]
    session = _session(dynamic_export.onnx)
    by_batch = {size: np.concatenate([session.run(None, {"images": x[i : i + size]})[0] for i in range(0, 8, size)])
                for size in (1, 3, 8)}
    for size in (3, 8):
        np.testing.assert_allclose(by_batch[size], by_batch[1], rtol=0, atol=1e-4)
        for a, b in zip(non_max_suppression(by_batch[size]), non_max_suppression(by_batch[1])):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    ref = np.load(REFS / "se-yolov5n-shapes" / "raw_input_val3.npy")
    np.testing.assert_allclose(by_batch[8][:3], ref, rtol=0, atol=1e-2)


@pytest.fixture(scope="module")
def any_size_export(fixtures, tmp_path_factory):
    return export_onnx(CHECKPOINT, tmp_path_factory.mktemp("any-size") / "fixture.onnx", imgsz=320, dynamic_size=True,
                       check=False)


def test_dynamic_size_runs_any_letterbox_like_pytorch(any_size_export, fixture_model):
    """--dynamic-size frees batch, height and width (YOLOv5's --dynamic): any multiple of the stride runs,
    with the SE block still canonical and the same outputs as PyTorch at that size."""
    import torch

    model = onnx.load(any_size_export.onnx)
    assert_canonical(model, 1)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"] and any_size_export.input_shape == dims
    assert any_size_export.output_shape == ["batch", "anchors", 8]
    session = _session(any_size_export.onnx)
    rng = np.random.default_rng(0)
    for h, w in ((256, 320), (416, 416), (320, 640), (64, 96)):
        x = rng.random((2, 3, h, w), dtype=np.float32)
        with torch.no_grad():
            ref = fixture_model.model(torch.from_numpy(x))[0].numpy()
        out = session.run(None, {"images": x})[0]
        assert out.shape == ref.shape == (2, 3 * sum((h // s) * (w // s) for s in (8, 16, 32)), 8)
        assert np.abs(out[..., :4] - ref[..., :4]).max() <= 1e-2 and np.abs(out[..., 4:] - ref[..., 4:]).max() <= 1e-3


def test_infer_on_a_dynamic_size_export_letterboxes_like_detect_py(any_size_export, tmp_path):
    """detect.py --imgsz 416 on a 640x480 clip feeds 320x416: so does infer on a --dynamic-size export."""
    proc = run_cli("infer", CLIP, "-m", any_size_export.onnx, "--imgsz", "416", "--no-video", "--json",
                   "--out-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["input_hw"] == [320, 416] and summary["frames"] == 60


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_tiny_checkpoint_with_se_in_backbone_and_head(tiny_checkpoint, tmp_path, dynamic):
    report = export_onnx(tiny_checkpoint, tmp_path / "tiny.onnx", imgsz=64, dynamic=dynamic)
    assert (report.se.found, report.se.rewritten) == (SE_BLOCKS, SE_BLOCKS)
    assert_canonical(onnx.load(report.onnx), SE_BLOCKS)
    assert report.parity.passed
    assert report.metadata["se_blocks"] == str(SE_BLOCKS) and report.metadata["names"] == "{0: 'shape0', 1: 'shape1'}"


def test_no_simplify_still_cleans_se_blocks(tiny_checkpoint, tmp_path):
    report = export_onnx(tiny_checkpoint, tmp_path / "raw.onnx", imgsz=64, dynamic=True, simplify=False, check=False)
    assert report.simplifier is None and report.nodes["simplified"] is None
    assert_canonical(onnx.load(report.onnx), SE_BLOCKS)


def test_cli_rounds_imgsz_up_and_prints_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    code = run_main("export", tiny_checkpoint, "-o", out, "--imgsz", 70, "--no-check", "--json")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "--imgsz 70 is not a multiple of the largest stride 32; using 96" in captured.err
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 96, 96]
    data = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert data["imgsz"] == [96, 96] and data["se_blocks"]["found"] == 3 and data["parity"] is None
    assert set(data["nodes"]) == {"exported", "simplified", "final"}


def test_cli_default_output_goes_to_engines(tiny_checkpoint, tmp_path):
    result = run_cli("export", tiny_checkpoint, "--imgsz", "64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "engines" / "tiny-se.onnx").is_file()
    assert "parity (onnxruntime fp32" in result.stdout and "PASS" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--opset", "11"], "'--opset': Input should be greater than or equal to 13"),
    (["--opset", "21"], "'--opset': Input should be less than or equal to 20"),
    (["--batch", "2", "--dynamic"], "exclude each other"),
    (["--imgsz", "0"], "each side must be 32-4096 px"),
    (["-o", "{tmp}/a-file/out.onnx"], "cannot write here"),
    (["-o", "{tmp}/out.txt"], "must end in .onnx"),
    (["--weights-missing"], "checkpoint not found"),
], ids=["opset-low", "opset-high", "batch-and-dynamic", "imgsz-zero", "unwritable", "suffix", "no-weights"])
def test_bad_inputs_fail_in_one_line_without_output(tiny_checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    weights = tmp_path / "missing.pt" if args == ["--weights-missing"] else tiny_checkpoint
    args = [] if args == ["--weights-missing"] else [a.format(tmp=tmp_path) for a in args]
    if "-o" not in args:
        args += ["-o", tmp_path / "out.onnx"]
    code = run_main("export", weights, *args, "--no-check")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no ONNX, no partial file


@pytest.fixture(scope="module")
def tiny_raw_onnx():
    import io
    import warnings

    import torch

    model = tiny_model()
    model.model[-1].export = True
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 64, 64), buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def test_simplify_falls_back_to_onnxslim_and_says_so(tiny_raw_onnx, monkeypatch):
    from se_deploy.export import simplify

    def broken(model):
        raise RuntimeError("boom")

    monkeypatch.setattr(simplify, "_onnxsim", broken)
    result = simplify.simplify(tiny_raw_onnx)
    assert result.tool == "onnxslim"
    assert result.notices == ["onnxsim failed (boom); simplifying with onnxslim instead"]
    assert len(result.model.graph.node) < len(tiny_raw_onnx.graph.node)


def test_simplify_without_onnxsim_uses_onnxslim(tiny_raw_onnx, monkeypatch):
    from se_deploy.export import simplify

    monkeypatch.setitem(sys.modules, "onnxsim", None)  # import onnxsim -> ImportError
    result = simplify.simplify(tiny_raw_onnx)
    assert result.tool == "onnxslim"
    assert result.notices == ["onnxsim is not installed; simplifying with onnxslim instead"]


def test_simplify_without_any_simplifier_is_an_error(tiny_raw_onnx, monkeypatch):
    from se_deploy.export import simplify

    monkeypatch.setitem(sys.modules, "onnxsim", None)
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    with pytest.raises(SeDeployError, match="--no-simplify"):
        simplify.simplify(tiny_raw_onnx)
