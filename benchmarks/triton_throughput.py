"""Throughput and latency of a detector served by Triton (nvidia-pytriton's server, the --cpu python model)
against the same ONNX run in-process, for 1, 4 and 8 concurrent clients, and the mean batch the server formed.

Each client sends ``--requests`` single images; a client on Triton is a TritonRunner (gRPC) of its own, a
client in-process is a thread calling one shared ONNX Runtime session. The server's batch size is its own
count: nv_inference_count / nv_inference_exec_count over the run (from its Prometheus metrics).

    python benchmarks/triton_throughput.py                       # the bundled checkpoint, exported at 320
    python benchmarks/triton_throughput.py --model m.onnx --python-env .venv-triton --clients 1 4 8 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from se_deploy.artifacts import DEMO_IMAGES, DEMO_WEIGHTS  # noqa: E402
from se_deploy.inference.preprocess import Letterboxer, read_image  # noqa: E402
from se_deploy.runners import load_runner  # noqa: E402


def counters(url: str, model: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    pattern = rf'^(nv_inference_(?:count|exec_count))\{{model="{re.escape(model)}",[^}}]*\}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def run_clients(make_client, clients: int, requests: int, image: np.ndarray) -> dict:
    """``clients`` threads, each with ``make_client()`` and ``requests`` timed calls; throughput and percentiles."""

    def client(_):
        infer = make_client()
        infer(image)  # untimed: connection and first-call costs
        latencies = []
        for _ in range(requests):
            start = time.perf_counter()
            infer(image)
            latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate([np.array(lat) for lat in pool.map(client, range(clients))]) * 1000
    seconds = time.perf_counter() - start
    return {"images_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="dynamic-batch ONNX [default: the bundled checkpoint at 320]")
    parser.add_argument("--python-env", default=str(REPO / ".venv-triton"), help="the server's environment")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=50, help="timed requests per client")
    parser.add_argument("--instances", type=int, default=1, help="model instances in the server")
    args = parser.parse_args()

    from se_deploy.serving.model_repository import write_repository
    from se_deploy.serving.triton_server import TritonServer, find_environment, free_ports

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from se_deploy.export.onnx_export import export_onnx

            model = export_onnx(DEMO_WEIGHTS, tmp / "shapes.onnx", imgsz=320, dynamic=True, check=False).onnx
        write_repository(model, tmp / "repo", name="shapes", cpu=True, instances=args.instances)
        image, _ = Letterboxer((320, 320)).prepare([read_image(sorted(DEMO_IMAGES.glob("*.jpg"))[0])])
        image = image.copy()
        local = load_runner(model, device="cpu").activate()
        http, grpc, metrics = free_ports(3)
        with open(tmp / "server.log", "w") as log, TritonServer(tmp / "repo", find_environment(args.python_env),
                                                                http_port=http, grpc_port=grpc, metrics_port=metrics,
                                                                log=log) as server:
            print(f"{model.name}: 1x3x320x320 per request, {args.requests} requests per client, ONNX Runtime CPU; "
                  f"Triton: python backend, {args.instances} instance(s), dynamic batching up to 8")
            print(f"{'clients':>7} | {'in-process img/s':>16} {'p50 ms':>7} {'p99 ms':>7} | "
                  f"{'Triton img/s':>12} {'p50 ms':>7} {'p99 ms':>7} {'mean batch':>10}")
            for clients in args.clients:
                inproc = run_clients(lambda: local.infer, clients, args.requests, image)
                before = counters(server.url("metrics"), "shapes")
                remote = run_clients(lambda: load_runner(server.url("grpc", "shapes")).activate().infer, clients,
                                     args.requests, image)
                after = counters(server.url("metrics"), "shapes")
                batch = ((after["nv_inference_count"] - before["nv_inference_count"])
                         / max(after["nv_inference_exec_count"] - before["nv_inference_exec_count"], 1))
                print(f"{clients:>7} | {inproc['images_per_s']:>16.1f} {inproc['p50_ms']:>7.1f} "
                      f"{inproc['p99_ms']:>7.1f} | {remote['images_per_s']:>12.1f} {remote['p50_ms']:>7.1f} "
                      f"{remote['p99_ms']:>7.1f} {batch:>10.2f}")
        local.deactivate()


if __name__ == "__main__":
    main()
