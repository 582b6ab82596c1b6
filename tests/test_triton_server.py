"""A real tritonserver (nvidia-pytriton's, python backend, from .venv-triton) on loopback ports, serving the
repositories ``se-deploy triton`` writes: the same raw outputs and detections as the local model, over gRPC
and HTTP, through every command that takes --model; dynamic batching across concurrent clients; a server
lost mid-run; and, for the ONNX / TensorRT backends this server lacks, a refusal for that reason alone."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CHECKPOINT, CLIP, FIXTURES, REPO, run_cli
from triton_helpers import SERVER_ENV, fake_engine, running_server

from se_deploy.artifacts import DEMO_IMAGES
from se_deploy.errors import SeDeployError
from se_deploy.inference.preprocess import Letterboxer, read_image
from se_deploy.runners import load_runner
from se_deploy.serving.model_repository import write_repository
from se_deploy.serving.triton_server import free_ports

IMAGES = sorted(DEMO_IMAGES.glob("*.jpg"))


@pytest.fixture(scope="module")
def served(dynamic_onnx, tmp_path_factory):
    """One server for the module: the --cpu detector 'shapes' and its --e2e ensemble."""
    folder = tmp_path_factory.mktemp("triton")
    write_repository(dynamic_onnx, folder / "repo", name="shapes", cpu=True, e2e=True)
    with running_server(folder / "repo", folder / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The bundled images letterboxed to 320 as one (8, 3, 320, 320) batch."""
    batch, _ = Letterboxer((320, 320), max_batch=len(IMAGES)).prepare([read_image(p) for p in IMAGES])
    return batch.copy()


def metrics(server) -> dict[str, float]:
    """The server's Prometheus counters for the model 'shapes' (summed over other labels, e.g. failure reasons)."""
    with urllib.request.urlopen(server.url("metrics"), timeout=10) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for m in re.finditer(r'^(nv_\w+)\{model="shapes",[^}]*\} (\S+)$', text, re.M):
        found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
    return found


def e2e_detections(server, path: Path) -> tuple[np.ndarray, list[str]]:
    """One encoded image through the ensemble: its detections and their class names."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    image = grpcclient.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[path.read_bytes()]], dtype=object))
    result = client.infer("shapes_e2e", [image])
    count = int(result.as_numpy("count")[0, 0])
    return result.as_numpy("detections")[0, :count], [n.decode() for n in result.as_numpy("names")[0, :count]]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def infer_json(*args) -> dict:
    r = run_cli("infer", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cpu_and_e2e_models_are_ready(served):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert states == dict.fromkeys(["shapes", "shapes_pre", "shapes_post", "shapes_e2e"], "READY")


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_raw_outputs_equal_onnx_runtime(served, dynamic_onnx, images, scheme):
    batch = np.concatenate([images, images[:2]])  # 10 images: more than max_batch_size 8, sent in two requests
    with load_runner(dynamic_onnx, device="cpu") as local, load_runner(served.url(scheme, "shapes")) as remote:
        assert (remote.input_shape, remote.names, remote.stride, remote.max_batch) == ((None, 3, 320, 320),
                                                                                        local.names, 32, 8)
        assert remote.metadata["source_sha256"] == local.metadata["source_sha256"]
        expected, got = local.infer(batch), remote.infer(batch)
    assert got.shape == expected.shape == (10, 6300, 8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_e2e_detections_equal_infer_on_the_same_images(served, dynamic_onnx, tmp_path):
    summary = infer_json(DEMO_IMAGES, "--model", dynamic_onnx, "--no-video", "--out-dir", tmp_path)
    local = {Path(rec["source"]).name: rec["detections"] for rec in read_jsonl(summary["outputs"]["jsonl"])}
    assert len(local) == len(IMAGES) and sum(map(len, local.values())) > 0
    for path in IMAGES:
        dets, names = e2e_detections(served, path)
        expected = local[path.name]
        assert len(dets) == len(expected), path.name
        for row, name, want in zip(dets.tolist(), names, expected):
            np.testing.assert_allclose(row[:4], want["xyxy"], atol=0.006)  # the JSONL keeps 2 decimals
            assert abs(row[4] - want["conf"]) < 6e-5 and int(row[5]) == want["cls"] and name == want["name"]


def test_infer_over_grpc_writes_the_same_jsonl_as_the_local_model(served, dynamic_onnx, tmp_path):
    url = served.url("grpc", "shapes")
    local = infer_json(CLIP, "--model", dynamic_onnx, "--no-video", "--out-dir", tmp_path / "local")
    remote = infer_json(CLIP, "--model", url, "--no-video", "--out-dir", tmp_path / "remote")
    assert remote["model"].startswith("triton fp32 on triton 127.0.0.1") and remote["stop_reason"] == "end"
    assert remote["frames"] == local["frames"] == 60
    assert Path(remote["outputs"]["jsonl"]).read_text() == Path(local["outputs"]["jsonl"]).read_text()


def test_concurrent_clients_all_right_and_batched_by_the_server(served, dynamic_onnx, images):
    with load_runner(dynamic_onnx, device="cpu") as local:
        expected = [local.infer(images[i : i + 1]) for i in range(8)]
    before = metrics(served)

    def client(i: int) -> float:  # 50 requests of one image each; half the clients on gRPC, half on HTTP
        with load_runner(served.url("grpc" if i % 2 else "http", "shapes")) as runner:
            return max(float(np.abs(runner.infer(images[i : i + 1]) - expected[i]).max()) for _ in range(50))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(client, range(8)))
    after = metrics(served)
    assert max(errors) < 1e-5
    requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert requests == 400 and after["nv_inference_request_failure"] == before["nv_inference_request_failure"]
    assert executions < requests, (executions, requests)  # the dynamic batcher joined requests into batches


def test_every_command_takes_a_triton_model(served, dynamic_onnx):
    from se_deploy.evaluation.evaluate import evaluate

    url = served.url("grpc", "shapes")
    r = run_cli("bench", "-m", url, "-m", served.url("http", "shapes"), "--iters", "3", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert [(b["backend"], b["model"]) for b in json.loads(r.stdout)] == [("triton", url),
                                                                           ("triton", served.url("http", "shapes"))]
    r = run_cli("check", url, "--weights", CHECKPOINT)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    data = FIXTURES / "dataset" / "synth_shapes.yaml"
    remote, local = evaluate(url, data), evaluate(dynamic_onnx, data)
    assert remote["model"] == url and remote["images"] == local["images"] == 60
    assert abs(remote["map50_95"] - local["map50_95"]) < 1e-4 and abs(remote["map50"] - local["map50"]) < 1e-4


@pytest.mark.parametrize("model, message", [("shapes_e2e", "an end-to-end model"), ("nothing", "is not ready")])
def test_wrong_model_is_one_line(served, model, message, tmp_path):
    r = run_cli("infer", CLIP, "--model", served.url("grpc", model), "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert not (tmp_path / "out").exists()


def long_clip(path: Path, repeats: int = 5) -> Path:
    """The bundled clip played ``repeats`` times, as one MJPEG video."""
    cap = cv2.VideoCapture(str(CLIP))
    frames = []
    while (ok := cap.read())[0]:
        frames.append(ok[1])
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (w, h))
    for frame in frames * repeats:
        writer.write(frame)
    writer.release()
    return path


def test_server_killed_mid_run_ends_infer_with_one_line_and_closed_outputs(dynamic_onnx, tmp_path):
    write_repository(dynamic_onnx, tmp_path / "repo", name="shapes", cpu=True)
    source, out = long_clip(tmp_path / "long.avi"), tmp_path / "out"
    with running_server(tmp_path / "repo", tmp_path / "server.log") as server:
        client = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "infer", str(source), "--model",
                                   server.url("grpc", "shapes"), "--out-dir", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while client.poll() is None and time.monotonic() < deadline:  # until 20 frames are written
                partial = list(out.glob(".detections.*"))
                if partial and partial[0].read_text().count("\n") >= 20:
                    break
                time.sleep(0.05)
            server.signal(signal.SIGKILL)  # the server and its models, without warning
            stdout, stderr = client.communicate(timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
    assert client.returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: model server lost: grpc://127.0.0.1:") and "frames written" in line
    frames = len(read_jsonl(out / "detections.jsonl"))
    assert 20 <= frames < 300
    video = cv2.VideoCapture(str(out / "long.avi"))  # closed properly: the header counts the frames written
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    assert "model server lost" in stdout  # the summary says why it stopped


def test_onnx_and_tensorrt_models_fail_only_for_their_missing_backends(dynamic_onnx, tmp_path):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    write_repository(dynamic_onnx, repo, name="on_cpu", cpu=True)
    write_repository(dynamic_onnx, repo, name="gpu_onnx", trt_accelerator="fp16")
    write_repository(fake_engine(tmp_path), repo, name="gpu_trt")
    with running_server(repo, tmp_path / "server.log", model_control="explicit") as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        client.load_model("on_cpu")  # the same server loads a valid python model from this repository
        assert client.is_model_ready("on_cpu")
        for name, backend in (("gpu_onnx", "onnxruntime"), ("gpu_trt", "tensorrt")):
            with pytest.raises(InferenceServerException) as refused:
                client.load_model(name)
            assert f"unable to find backend library for backend '{backend}'" in str(refused.value), str(refused.value)


def test_serve_prints_endpoints_and_stops_on_sigterm(dynamic_onnx, tmp_path):
    write_repository(dynamic_onnx, tmp_path / "repo", name="shapes", cpu=True)
    http, grpc, metrics_port = free_ports(3)
    command = [sys.executable, str(REPO / "cli.py"), "serve", str(tmp_path / "repo"), "--python-env", str(SERVER_ENV),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics_port), "--json"]
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            endpoints = json.loads(_read_json(serve.stdout))
            url = endpoints["models"]["shapes"]["grpc"]
            assert url == f"grpc://127.0.0.1:{grpc}/shapes" and endpoints["metrics"].endswith(f":{metrics_port}/metrics")
            with load_runner(url) as runner:
                assert runner.infer(np.zeros((1, 3, 320, 320), np.float32)).shape == (1, 6300, 8)
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(60) == 143
        finally:
            if serve.poll() is None:  # let serve stop its server, then make sure
                serve.send_signal(signal.SIGINT)
                try:
                    serve.wait(30)
                except subprocess.TimeoutExpired:
                    serve.kill()
    with pytest.raises(SeDeployError, match="no Triton server answers"):
        load_runner(url).activate()  # the server went with it


def _read_json(stream) -> str:
    """Lines of ``stream`` up to the end of the first JSON object."""
    lines = []
    for line in stream:
        lines.append(line)
        if line.rstrip() == "}":
            break
    return "".join(lines)
