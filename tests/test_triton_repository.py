"""``se-deploy triton``: the model repository it writes (checked offline with Triton's own config schema), how it
adds to an existing one, and the bad input it refuses (one line, exit 2, nothing written). No server here:
tests/test_triton_server.py serves these repositories."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CLIP, FIXTURES, run_cli
from triton_helpers import NAMES, fake_engine

from se_deploy.errors import SeDeployError
from se_deploy.runners import load_runner
from se_deploy.runners.triton_runner import ModelURL, TritonRunner, parse_model_url
from se_deploy.serving import model_config as mc
from se_deploy.serving.model_repository import PROCESSING_MODULES, read_repository, write_repository
from se_deploy.serving.triton_server import free_ports

STATIC_ONNX = FIXTURES / "onnx" / "upstream-export-320.onnx"  # batch fixed at 1


def assert_loadable(repository: Path) -> dict:
    """Every config.pbtxt parses with Triton's schema and breaks none of the rules Triton loads models by."""
    configs = read_repository(repository)
    for config in configs.values():
        assert mc.check_config(config, configs) == [], config.name
    return configs


def test_cpu_e2e_repository(dynamic_onnx, tmp_path):
    repo = tmp_path / "model_repository"
    report = write_repository(dynamic_onnx, repo, name="shapes", cpu=True, e2e=True, instances=2)
    configs = assert_loadable(repo)
    assert set(configs) == {"shapes", "shapes_pre", "shapes_post", "shapes_e2e"} == {m["name"] for m in report.models}
    det = configs["shapes"]
    assert det.backend == "python" and det.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in det.input] == [("images", [3, 320, 320])]
    assert [(t.name, list(t.dims)) for t in det.output] == [("output0", [6300, 8])]
    assert list(det.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert det.instance_group[0].count == 2 and det.instance_group[0].kind == mc.config_pb2().ModelInstanceGroup.KIND_CPU
    assert mc.parameters(det)["names"] == repr(NAMES) and det.model_warmup[0].inputs["images"].zero_data
    assert (repo / "shapes" / "1" / "model.onnx").read_bytes() == dynamic_onnx.read_bytes()
    assert (repo / "shapes" / "labels.txt").read_text().split() == list(NAMES.values())
    steps = [s.model_name for s in configs["shapes_e2e"].ensemble_scheduling.step]
    assert configs["shapes_e2e"].platform == "ensemble" and steps == ["shapes_pre", "shapes", "shapes_post"]
    # the pre/post models carry se-deploy's own processing code, unchanged
    package = Path(mc.__file__).resolve().parents[1]
    for model in ("shapes_pre", "shapes_post"):
        for module in PROCESSING_MODULES:
            assert (repo / model / "1" / "se_deploy" / module).read_bytes() == (package / module).read_bytes()
    warmup = (repo / "shapes_pre" / "warmup" / mc.WARMUP_IMAGE).read_bytes()  # Triton's BYTES element format
    (length,) = struct.unpack("<I", warmup[:4])
    assert length == len(warmup) - 4 and cv2.imdecode(np.frombuffer(warmup[4:], np.uint8), cv2.IMREAD_COLOR) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_onnx_gpu_repository_with_tensorrt_accelerator(dynamic_onnx, tmp_path):
    write_repository(dynamic_onnx, tmp_path / "repo", max_batch=4, trt_accelerator="fp16")
    config = assert_loadable(tmp_path / "repo")["shapes"]
    pb = mc.config_pb2()
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_engine_repository_reads_its_manifest(tmp_path):
    engine = fake_engine(tmp_path)
    report = write_repository(engine, tmp_path / "repo", name="shapes_trt", e2e=True)
    configs = assert_loadable(tmp_path / "repo")
    config = configs["shapes_trt"]
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8  # the profile's max
    assert [list(t.dims) for t in config.output] == [[6300, 8]]
    assert (tmp_path / "repo" / "shapes_trt" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert mc.parameters(config)["precision"] == "fp16" and any("TensorRT" in n for n in report.notes)
    with pytest.raises(SeDeployError, match="batch profile ends at 8"):
        write_repository(engine, tmp_path / "repo2", max_batch=16)


def test_existing_repository_gets_models_added_and_replaced(dynamic_onnx, tmp_path):
    repo = tmp_path / "repo"
    write_repository(dynamic_onnx, repo, name="a", cpu=True)
    report = write_repository(dynamic_onnx, repo, name="b", cpu=True)
    assert report.replaced == [] and set(read_repository(repo)) == {"a", "b"}
    report = write_repository(dynamic_onnx, repo, name="a", cpu=True, instances=3)
    assert report.replaced == ["a"] and "replaced a" in report.notes[0]
    configs = assert_loadable(repo)
    assert set(configs) == {"a", "b"} and configs["a"].instance_group[0].count == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_triton_cli_json(dynamic_onnx, tmp_path):
    r = run_cli("triton", dynamic_onnx, "-o", tmp_path / "repo", "--e2e", "--cpu", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [m["name"] for m in result["models"]] == ["shapes", "shapes_pre", "shapes_post", "shapes_e2e"]
    assert result["serve"] == f"se-deploy serve {tmp_path / 'repo'}"
    assert result["python_packages"] == ["opencv-python-headless<4.12", "onnxruntime"]
    r = run_cli("triton", dynamic_onnx, "-o", tmp_path / "gpu")
    assert r.returncode == 0 and "docker run --gpus all" in r.stdout and "tritonserver" in r.stdout


def _refused(r, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", ["not-a-model", "garbage-onnx", "static-batch", "not-a-repository",
                                  "stale-manifest", "bad-option"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, dynamic_onnx, tmp_path):
    out = tmp_path / "repo"
    model, extra = dynamic_onnx, []
    if case == "not-a-model":
        model = tmp_path / "weights.txt"
        model.write_text("hello")
        fragments = ["not an ONNX model or a TensorRT engine"]
    elif case == "garbage-onnx":
        model = tmp_path / "broken.onnx"
        model.write_bytes(b"\x00\xff" * 100)
        fragments = ["broken.onnx"]
    elif case == "static-batch":
        model, extra = STATIC_ONNX, ["--max-batch", "8"]
        fragments = ["batch is fixed at 1", "se-deploy export", "--dynamic"]
    elif case == "not-a-repository":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        fragments = ["not a Triton model repository"]
    elif case == "stale-manifest":
        model = fake_engine(tmp_path, stale=True)
        fragments = ["describes another engine", "se-deploy build-trt engines/shapes.fp16.onnx"]
    else:
        extra = ["--max-batch", "0"]
        fragments = ["'--max-batch'", "greater than or equal to 1"]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("triton", model, "-o", out, *extra)
    _refused(r, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, no temporary folder
    if case == "not-a-repository":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_config_checker_finds_what_triton_refuses(dynamic_onnx):
    det = mc.read_detector(dynamic_onnx)
    config = mc.detector_config(det, "m", 4, 1, cpu=True)
    assert mc.check_config(config) == []
    config.dynamic_batching.preferred_batch_size.append(16)
    config.input[0].dims[0] = 0
    problems = mc.check_config(config)
    assert any("preferred batch sizes [16]" in p for p in problems) and any("dims [0, 320, 320]" in p for p in problems)
    ensemble = mc.ensemble_config(det, "m_e2e", 8, "m_pre", "m", "m_post")
    assert any("'m_pre' is not in the repository" in p for p in mc.check_config(ensemble, {"m": config}))
    with pytest.raises(SeDeployError, match="would not load in Triton"):
        mc.config_text(config)


def test_model_urls():
    assert parse_model_url("grpc://127.0.0.1:8001/shapes") == ModelURL("grpc", "127.0.0.1", 8001, "shapes")
    assert str(parse_model_url("http://triton.local:8000/shapes/")) == "http://triton.local:8000/shapes"
    for bad in ("grpc://127.0.0.1/shapes", "grpc://127.0.0.1:8001/", "http://h:99999/m", "grpc://h:1/a/b"):
        with pytest.raises(SeDeployError, match="expected grpc://HOST:PORT/NAME"):
            parse_model_url(bad)
    runner = load_runner("grpc://127.0.0.1:8001/shapes")
    assert isinstance(runner, TritonRunner) and runner.path.name == "shapes" and not runner.is_active
    with pytest.raises(SeDeployError, match="--device cuda"):
        load_runner("http://127.0.0.1:8000/shapes", device="cuda")


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_no_server_is_one_line_and_no_output(scheme, tmp_path):
    (port,) = free_ports(1)
    r = run_cli("infer", CLIP, "--model", f"{scheme}://127.0.0.1:{port}/shapes", "--out-dir", tmp_path / "out")
    _refused(r, f"{scheme}://127.0.0.1:{port}/shapes", "no Triton server answers")
    assert not (tmp_path / "out").exists()


def test_serve_sends_onnx_and_tensorrt_repositories_to_nvidias_container(dynamic_onnx, tmp_path):
    write_repository(dynamic_onnx, tmp_path / "repo", name="gpu_onnx", e2e=True)
    write_repository(fake_engine(tmp_path), tmp_path / "repo", name="gpu_trt")
    r = run_cli("serve", tmp_path / "repo")
    _refused(r, "gpu_onnx (onnxruntime_onnx), gpu_trt (tensorrt_plan)", "docker run --gpus all",
             "nvcr.io/nvidia/tritonserver:", "pip install 'opencv-python-headless<4.12' && exec tritonserver")
    _refused(run_cli("serve", tmp_path / "nothing"), "no such model repository")


def test_server_environment_must_fit_the_python_models(dynamic_onnx, tmp_path):
    from se_deploy.serving.triton_server import ServerEnvironment

    write_repository(dynamic_onnx, tmp_path / "repo", name="shapes", cpu=True, e2e=True)
    configs = read_repository(tmp_path / "repo")

    def env(numpy="1.26.4", cv2=True, onnxruntime=True):
        return ServerEnvironment(tmp_path / "env", "3.11", "", tmp_path / "pytriton", numpy, cv2, onnxruntime)

    env().check(configs)
    with pytest.raises(SeDeployError, match="its numpy is 2.1.0; Triton 2.51's python backend needs numpy < 2"):
        env(numpy="2.1.0").check(configs)
    with pytest.raises(SeDeployError, match=r"need opencv-python-headless<4\.12, onnxruntime, which"):
        env(cv2=False, onnxruntime=False).check(configs)
    gpu_only = {"m": mc.detector_config(mc.read_detector(dynamic_onnx), "m", 8, 1)}
    env(numpy="2.1.0", cv2=False).check(gpu_only)  # no python model: nothing to require
