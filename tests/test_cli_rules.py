"""The CLI rules of docs/cli.md: one spelling per option across commands, every numeric option checked
against its range before any work, one `error:` line (exit 2) for bad input, old spellings still working."""

from __future__ import annotations

import ctypes.util
import json
import zipfile
from pathlib import Path

import pytest
import typer
from conftest import CHECKPOINT, CLIP, FIXTURES, run_cli
from export_helpers import run_main, save_tiny_checkpoint

from se_deploy.cli import app
from se_deploy.cli.options import parse_device

UPSTREAM_ONNX = FIXTURES / "onnx" / "upstream-export-320.onnx"
ARTIFACT_COMMANDS = {"export", "quantize", "build-trt", "triton"}  # the commands that make one artifact (-o)
RUN_COMMANDS = {"infer", "bench", "val", "check"}  # the commands that run a model (-m)


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _options(command) -> dict[str, object]:
    """Every option of a command by each of its names (--json, -o, ...); hidden old spellings left out."""
    return {name: param for param in command.params if not getattr(param, "hidden", False)
            for name in (*param.opts, *param.secondary_opts)}


# one spelling per option ---------------------------------------------------------------------------
def test_every_command_spells_the_shared_options_the_same_way():
    for name, command in _commands().items():
        options = _options(command)
        if "--json" in options:
            assert options["--json"].is_flag, f"{name}: --json must be a flag"
        if "--model" in options:
            assert "-m" in options["--model"].opts and name in RUN_COMMANDS, name
        if "-o" in options:
            assert name in ARTIFACT_COMMANDS and "--output" in options["-o"].opts, f"{name}: -o is for artifacts"
        if "--out-dir" in options:
            assert name not in ARTIFACT_COMMANDS, name
        if "--device" in options:
            assert options["--device"].callback.__wrapped__ is parse_device, f"{name}: --device is parsed one way"
        if "--imgsz" in options:
            assert options["--imgsz"].metavar == "H[,W]", f"{name}: --imgsz is H or H,W"
        if "--calib-size" in options:
            assert options["--calib-size"].default == 512, name
    assert {name for name, c in _commands().items() if "--model" in _options(c)} == RUN_COMMANDS


def test_help_of_every_command_follows_the_rules():
    for name in _commands():
        proc = run_cli(name, "--help")
        assert proc.returncode == 0, proc.stderr
        if name in RUN_COMMANDS:
            assert "--model" in proc.stdout and "-m" in proc.stdout, name


@pytest.mark.parametrize("text, expected", [("cpu", "cpu"), ("CUDA", "cuda"), ("0", "cuda:0"), ("cuda:1", "cuda:1"),
                                            ("tensorrt", "tensorrt")])
def test_device_spellings(text, expected):
    assert parse_device(text) == expected


def test_a_device_number_reaches_onnx_runtime_as_the_device_id():
    from se_deploy.runners.onnxruntime_runner import candidate_providers

    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert candidate_providers("cuda:1", available) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                        "CPUExecutionProvider"]
    assert candidate_providers("cpu", available) == ["CPUExecutionProvider"]


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is present here")
@pytest.mark.parametrize("model, device, expected", [
    (UPSTREAM_ONNX, "0", "--device cuda:0: ONNX Runtime could not use CUDAExecutionProvider here"),
    (UPSTREAM_ONNX, "tensorrt", "--device tensorrt: ONNX Runtime could not use TensorrtExecutionProvider here"),
    (CHECKPOINT, "tensorrt", "--device tensorrt: a .pt checkpoint runs on PyTorch, on cpu or cuda[:N]"),
    (CHECKPOINT, "cuda:0", "--device cuda:0: PyTorch sees no CUDA GPU"),
])
def test_a_device_this_machine_lacks_is_one_line_and_stdout_stays_clean(model, device, expected):
    proc = run_cli("bench", "-m", model, "--device", device, "--iters", "1", "--json")
    _refused(proc, expected)
    assert proc.stdout == ""  # ONNX Runtime's "EP Error ... Falling back" text never reaches stdout


# bad numeric options: one line, exit 2, nothing written ------------------------------------------------
def _refused(proc, *expected: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("args, expected", [
    (["infer", CLIP, "--conf", "2"], ["--conf", "less than or equal to 1"]),
    (["infer", CLIP, "--conf", "-1"], ["--conf"]),
    (["infer", CLIP, "--iou", "5"], ["--iou"]),
    (["infer", CLIP, "--max-det", "0"], ["--max-det"]),
    (["infer", CLIP, "--batch", "0"], ["--batch"]),
    (["infer", CLIP, "--imgsz", "0"], ["--imgsz", "32-4096"]),
    (["infer", CLIP, "--classes", "a"], ["--classes"]),
    (["infer", CLIP, "--device", "gpu7"], ["--device", "cpu, cuda, cuda:N, N or tensorrt"]),
    (["bench", "-m", UPSTREAM_ONNX, "--warmup", "-3"], ["--warmup"]),
    (["bench", "-m", UPSTREAM_ONNX, "--iters", "0"], ["--iters"]),
    (["val", "-m", UPSTREAM_ONNX, "--data", "x.yaml", "--conf", "1.5"], ["--conf"]),
    (["val", "-m", UPSTREAM_ONNX, "--data", "x.yaml", "--max-det", "0"], ["--max-det"]),
    (["export", CHECKPOINT, "--imgsz", "100000"], ["--imgsz", "32-4096"]),
    (["export", CHECKPOINT, "--opset", "12"], ["--opset"]),
    (["export", CHECKPOINT, "--batch", "0"], ["--batch"]),
    (["quantize", UPSTREAM_ONNX, "--precision", "int8", "--calib-size", "0"], ["--calib-size"]),
    (["build-trt", UPSTREAM_ONNX, "--workspace", "0"], ["--workspace"]),
    (["build-trt", UPSTREAM_ONNX, "--dla-core", "-1"], ["--dla-core"]),
    (["build-trt", UPSTREAM_ONNX, "--device", "cpu"], ["--device cpu", "runs on a CUDA GPU"]),
    (["report", CHECKPOINT, "--data", "x.yaml", "--iters", "0"], ["--iters"]),
    (["report", CHECKPOINT, "--data", "x.yaml", "--max-map-drop", "-1"], ["--max-map-drop"]),
])
def test_out_of_range_options_are_refused_before_any_work(tmp_path, args, expected):
    proc = run_cli(*args, cwd=tmp_path)
    _refused(proc, *expected)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a folder


def test_classes_the_model_does_not_have_are_refused(tmp_path):
    proc = run_cli("infer", CLIP, "-m", UPSTREAM_ONNX, "--classes", "0,99", "--out-dir", tmp_path / "out")
    _refused(proc, "--classes 99", "has 3 classes", "circle, rectangle, triangle")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


# no tracebacks, no misleading messages ------------------------------------------------------------------
def test_export_to_a_directory_is_refused_before_the_work(tmp_path):
    (tmp_path / "model.onnx").mkdir()
    proc = run_cli("export", CHECKPOINT, "-o", tmp_path / "model.onnx", "--no-check")
    _refused(proc, "model.onnx: is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and not any((tmp_path / "model.onnx").iterdir())


def test_an_onnx_given_as_weights_is_bad_input_not_a_failed_check(tmp_path):
    proc = run_cli("check", "-m", UPSTREAM_ONNX, "-w", UPSTREAM_ONNX)
    _refused(proc, "this is an ONNX model; give a PyTorch checkpoint (.pt) here")


@pytest.mark.parametrize("kind, expected", [
    ("directory", "is a directory, not a checkpoint file"),
    ("random", "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"),
    ("zip", "a zip archive without data.pkl, not a PyTorch checkpoint"),
    ("truncated", "truncated or damaged zip archive"),
])
def test_what_is_wrong_with_a_checkpoint_is_said_plainly(tmp_path, kind, expected):
    path = tmp_path / "weights.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "random":
        path.write_bytes(bytes(range(7, 256)) * 20)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(CHECKPOINT.read_bytes()[:3000])
    proc = run_cli("inspect", path)
    _refused(proc, expected)
    assert "(" not in proc.stderr.split(expected)[-1]  # no library text in parentheses after the reason


def test_build_trt_names_a_missing_file_before_tensorrt(tmp_path):
    proc = run_cli("build-trt", tmp_path / "missing.onnx", "--fp16")
    _refused(proc, "missing.onnx: model not found")


def test_usage_errors_are_one_line_with_the_help_command(tmp_path):
    for args, expected in ((["export"], "Missing argument"), (["infer", CLIP, "--bogus"], "No such option"),
                           (["frobnicate"], "No such command")):
        proc = run_cli(*args, cwd=tmp_path)
        _refused(proc, expected, "--help)")


# old spellings still work -------------------------------------------------------------------------------
def test_old_json_file_spelling_writes_the_file_and_the_report(tmp_path):
    weights = save_tiny_checkpoint(tmp_path / "tiny-se.pt")
    report = tmp_path / "export.json"
    proc = run_cli("export", weights, "-o", tmp_path / "tiny.onnx", "--imgsz", "64", "--no-check", "--json", report)
    assert proc.returncode == 0, proc.stderr
    assert f"deprecated: --json {report} still works but is now --json > {report}" in proc.stderr
    assert "SE blocks: 3 found, 3 rewritten" in proc.stdout
    assert json.loads(report.read_text())["se_blocks"]["found"] == 3


def test_old_positional_model_of_check_still_works(capsys):
    code = run_main("check", UPSTREAM_ONNX, "--weights", CHECKPOINT, "--json")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "deprecated: check MODEL still works but is now check -m MODEL" in captured.err
    assert json.loads(captured.out)["passed"] is True


def test_export_json_flag_no_longer_needs_a_file(tmp_path):
    weights = save_tiny_checkpoint(tmp_path / "tiny-se.pt")
    proc = run_cli("export", weights, "--json", "-o", tmp_path / "tiny.onnx", "--imgsz", "64", "--no-check")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["onnx"] == str(tmp_path / "tiny.onnx")
    assert Path(tmp_path / "tiny.onnx").is_file()


def test_a_damaged_jpeg_that_still_decodes_stays_quiet(tmp_path, capfd):
    """val, check and calibration read images with read_image: libjpeg's warnings must not reach stderr."""
    from se_deploy.inference.preprocess import read_image

    damaged = tmp_path / "damaged.jpg"
    data = (FIXTURES / "dataset" / "images" / "val" / "val_000000.jpg").read_bytes()
    damaged.write_bytes(data[: len(data) * 2 // 3])  # a truncated JPEG: libjpeg warns, then fills in grey
    image = read_image(damaged)
    assert image.shape == (320, 320, 3)
    assert capfd.readouterr().err == ""
