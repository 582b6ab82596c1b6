"""Helpers for the Triton tests: a stand-in TensorRT engine with its manifest, free loopback ports, and a real
tritonserver (nvidia-pytriton's, from .venv-triton that scripts/setup.sh makes) that is always stopped."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from se_deploy.tensorrt import engine_manifest as em

REPO = Path(__file__).resolve().parents[1]
SERVER_ENV = REPO / ".venv-triton"
NAMES = {0: "circle", 1: "rectangle", 2: "triangle"}
ORIN = em.Environment(tensorrt="10.3.0", cuda_runtime="12.6", cuda_driver="12.6", gpu_name="Orin",
                      compute_capability="8.7", machine="aarch64")


def fake_engine(folder: Path, profile_max: int = 8, stale: bool = False) -> Path:
    """Bytes standing in for a plan (no TensorRT here) and a manifest describing them, as build-trt writes it."""
    engine = folder / "shapes.fp16.engine"
    engine.write_bytes(b"not a real plan, but the manifest's checksum covers it")
    sha = hashlib.sha256(engine.read_bytes()).hexdigest()
    manifest = em.make_manifest(
        ORIN, engine_sha256="0" * 64 if stale else sha, precision="fp16",
        inputs=[{"name": "images", "shape": [-1, 3, 320, 320], "dtype": "float32"}],
        outputs=[{"name": "output0", "shape": [-1, 6300, 8], "dtype": "float32"}],
        batch_profile={"min": 1, "opt": 4, "max": profile_max}, names=NAMES, stride=32, imgsz=(320, 320),
        source_onnx=Path("engines/shapes.fp16.onnx"), source_sha256="cd" * 32, build={"strongly_typed": True},
        rebuild="se-deploy build-trt engines/shapes.fp16.onnx -o engines/shapes.fp16.engine",
    )
    em.manifest_path(engine).write_text(json.dumps(manifest))
    return engine


@contextlib.contextmanager
def running_server(repository: Path, log_path: Path, model_control: str = "none"):
    """A started tritonserver on ``repository`` (loopback, free ports), stopped with its models whatever happens."""
    from se_deploy.serving.triton_server import TritonServer, find_environment, free_ports

    http, grpc, metrics = free_ports(3)
    with open(log_path, "w") as log:
        server = TritonServer(repository, find_environment(SERVER_ENV), http_port=http, grpc_port=grpc,
                              metrics_port=metrics, model_control=model_control, log=log)
        try:
            server.start()
            yield server
        finally:
            server.stop()
