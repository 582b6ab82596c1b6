"""``triton`` (a Triton model repository from a detector) and ``serve`` (a local tritonserver on a repository)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from se_deploy.cli import app
from se_deploy.cli.options import MAX_BATCH, ConfOpt, IouOpt, JsonFlag, MaxDetOpt
from se_deploy.cli.output import err, finish, out
from se_deploy.errors import SeDeployError

EXIT_INTERRUPTED = 130


@app.command()
def triton(
    model: Path = typer.Argument(..., help="Detector to serve: .onnx (dynamic batch) or .engine/.plan with its manifest",
                                 show_default=False),
    output: Path = typer.Option(Path("model_repository"), "-o", "--output",
                                help="Model repository folder (a new one, or one to add the models to)"),
    name: str = typer.Option(None, "--name", help="Model name [default: the file's stem]", show_default=False),
    max_batch: int = typer.Option(None, "--max-batch", min=1, max=MAX_BATCH, show_default=False,
                                  help="Largest batch Triton forms [default: 8 for ONNX, the engine's profile]"),
    instances: int = typer.Option(1, "--instances", min=1, max=64, help="Model instances (per GPU, or on the CPU)"),
    e2e: bool = typer.Option(False, "--e2e", help="Also <name>_e2e: image bytes in, detections out (python pre/post)"),
    cpu: bool = typer.Option(False, "--cpu", help="Run the ONNX on ONNX Runtime's CPU provider (python backend)"),
    trt_accelerator: str = typer.Option(None, "--trt-accelerator", show_default=False,
                                        help="ONNX on the GPU: Triton's ONNX Runtime with its TensorRT provider, fp16 or fp32"),
    conf: float = ConfOpt,
    iou: float = IouOpt,
    max_det: int = MaxDetOpt,
    as_json: bool = JsonFlag,
) -> None:
    """Write a Triton Inference Server model repository for an ONNX model or a TensorRT engine."""
    from se_deploy.serving.model_repository import docker_command, python_packages, read_repository, write_repository

    report = write_repository(model, output, name=name, max_batch=max_batch, instances=instances, e2e=e2e, cpu=cpu,
                              trt_accelerator=trt_accelerator, conf=conf, iou=iou, max_det=max_det)
    configs = read_repository(report.repository)
    ours = {m["name"]: configs[m["name"]] for m in report.models}
    python_only = all(c.backend == "python" or c.platform == "ensemble" for c in ours.values())
    serve_with = (f"se-deploy serve {report.repository}" if python_only else docker_command(report.repository, ours))
    for note in report.notes:
        err.print(f"note: {note}")
    finish({**report.summary(), "serve": serve_with, "python_packages": python_packages(ours)}, as_json, None,
           lambda: _print_repository(report, serve_with))


def _print_repository(report, serve_with: str) -> None:
    def tensors(items):
        return ", ".join(f"{t['name']} {t['datatype']}{t['dims']}" for t in items)

    table = Table("model", "runs on", "max batch", "inputs", "outputs", title=f"Triton repository {report.repository}")
    for m in report.models:
        table.add_row(m["name"], m["platform"], str(m["max_batch_size"]), tensors(m["inputs"]), tensors(m["outputs"]))
    out.print(table)
    out.print(f"serve it with: {serve_with}")


@app.command()
def serve(
    repo: Path = typer.Argument(Path("model_repository"), help="Model repository (from `se-deploy triton`)"),
    http_port: int = typer.Option(8000, "--http-port", min=1, max=65535, help="HTTP/REST port"),
    grpc_port: int = typer.Option(8001, "--grpc-port", min=1, max=65535, help="gRPC port"),
    metrics_port: int = typer.Option(8002, "--metrics-port", min=1, max=65535, help="Prometheus metrics port"),
    address: str = typer.Option("127.0.0.1", "--address", help="Address to listen on (0.0.0.0: every interface)"),
    python_env: Path = typer.Option(None, "--python-env", envvar="SE_DEPLOY_TRITON_ENV", show_default=False,
                                    help="Environment with nvidia-pytriton and numpy<2 that runs the server and its "
                                         "python models [default: this one]"),
    as_json: bool = typer.Option(False, "--json", help="Print the endpoints as JSON on stdout once the server is ready"),
) -> None:
    """Start a local Triton server (nvidia-pytriton's, python backend) on a repository, until Ctrl-C or SIGTERM."""
    from se_deploy.serving.model_repository import docker_command, read_repository
    from se_deploy.serving.triton_server import TritonServer, find_environment

    if len({http_port, grpc_port, metrics_port}) != 3:
        raise SeDeployError("--http-port, --grpc-port and --metrics-port must differ")
    configs = read_repository(repo)
    others = {n: c.platform or c.backend for n, c in configs.items() if c.backend != "python" and c.platform != "ensemble"}
    if others:
        listed = ", ".join(f"{n} ({kind})" for n, kind in sorted(others.items()))
        raise SeDeployError(f"{repo}: {listed} need backends that only NVIDIA's tritonserver container carries (this "
                            f"server has the python backend only); serve it with: {docker_command(repo, configs)}")
    environment = find_environment(python_env)
    environment.check(configs)
    server = TritonServer(repo, environment, address=address, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port)
    try:
        err.print(f"starting tritonserver on {repo} ({len(configs)} models) ...")
        server.start()
        endpoints = {"grpc": server.url("grpc"), "http": server.url("http"), "metrics": server.url("metrics"),
                     "models": {name: {"grpc": server.url("grpc", name), "http": server.url("http", name)}
                                for name in configs}}
        if as_json:
            print(json.dumps(endpoints, indent=2), flush=True)
        else:
            out.print(f"ready: gRPC {endpoints['grpc']}, HTTP {endpoints['http']}, metrics {endpoints['metrics']}")
            for name, urls in endpoints["models"].items():
                out.print(f"  {name}: --model {urls['grpc']}")
            out.print("Ctrl-C stops it")
        while server.process.poll() is None:
            time.sleep(0.5)
        raise SeDeployError(f"tritonserver exited by itself (exit code {server.process.returncode})")
    except KeyboardInterrupt:  # SIGTERM raises cli.signals.Terminated: the same cleanup, then exit 143
        err.print("stopping tritonserver")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        server.stop()
