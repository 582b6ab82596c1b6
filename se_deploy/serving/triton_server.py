"""A local ``tritonserver`` from the nvidia-pytriton wheel (Triton 2.51, python backend only).

The server runs in a Python environment of its own choosing (``python_env``, default: this one), which
must hold nvidia-pytriton and what the repository's python models import, with numpy < 2: Triton 2.51's
python backend answers with empty tensors under numpy 2. The backend's stub is the wheel's build for that
environment's Python X.Y; the environment's bin/ goes first on PATH, which is how the stub finds it.
The server runs in a process group of its own, so stopping it also stops its python-model processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from se_deploy.errors import SeDeployError

# Run by the environment's own interpreter: where its pieces are, without importing any of them.
_PROBE = """
import importlib.metadata as md, importlib.util as u, json, sys, sysconfig
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
spec = u.find_spec("pytriton")
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "libdir": sysconfig.get_config_var("LIBDIR") or "",
    "pytriton": spec.submodule_search_locations[0] if spec else None,
    "numpy": version("numpy"),
    "cv2": u.find_spec("cv2") is not None,
    "onnxruntime": u.find_spec("onnxruntime") is not None,
}))
"""
READY_TIMEOUT_S = 120  # loading several python models on a busy 2-core machine takes a while
STOP_TIMEOUT_S = 15


@dataclass(frozen=True)
class ServerEnvironment:
    """A Python environment that holds nvidia-pytriton's server and runs the python-backend models."""

    path: Path
    python: str  # 'X.Y'
    libdir: str  # where its libpython lives (the stub links it)
    pytriton: Path
    numpy: str | None
    cv2: bool
    onnxruntime: bool

    @property
    def tritonserver(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    def check(self, configs: dict) -> None:
        """Refuse (one line) an environment that cannot run the repository's python models."""
        python_models = [c for c in configs.values() if c.backend == "python"]
        if not python_models:
            return
        from se_deploy.serving.model_repository import python_packages

        if self.numpy is None or int(self.numpy.split(".")[0]) >= 2:
            raise SeDeployError(f"{self.path}: its numpy is {self.numpy or 'missing'}; Triton 2.51's python backend "
                                "needs numpy < 2 (with numpy 2 it answers with empty tensors): pip install 'numpy<2' "
                                "there, or use an environment made with pip install 'se-deploy[triton]'")
        missing = [p for p in python_packages(configs) if not (self.cv2 if p.startswith("opencv") else self.onnxruntime)]
        if missing:
            raise SeDeployError(f"{self.path}: the repository's python models need {', '.join(missing)}, which this "
                                f"environment lacks: {self.path}/bin/pip install {' '.join(map(shlex.quote, missing))}")


def find_environment(python_env: str | Path | None = None) -> ServerEnvironment:
    """The server environment ``python_env`` (a venv or prefix; default: the one se-deploy runs in)."""
    path = Path(python_env).absolute() if python_env else Path(sys.prefix)
    python = path / "bin" / "python"
    if not python.exists():
        raise SeDeployError(f"--python-env {path}: not a Python environment (no bin/python)")
    try:
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60)
        found = json.loads(probe.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        raise SeDeployError(f"--python-env {path}: its Python does not run") from None
    if not found["pytriton"]:
        raise SeDeployError(f"{path}: nvidia-pytriton (the tritonserver `serve` runs) is not installed there: "
                            "pip install 'se-deploy[triton]' in it, or pass --python-env with an environment that "
                            "has it (scripts/setup.sh makes .venv-triton)")
    env = ServerEnvironment(path, found["python"], found["libdir"], Path(found["pytriton"]), found["numpy"],
                            found["cv2"], found["onnxruntime"])
    if not env.tritonserver.is_file():
        raise SeDeployError(f"{env.pytriton}: nvidia-pytriton holds no tritonserver (a wheel for another platform?)")
    return env


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on at ``host`` (all held open until all are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


class TritonServer:
    """``tritonserver`` on ``repository``: ``start()`` returns once it is ready, ``stop()`` ends it and its models."""

    def __init__(self, repository: str | Path, environment: ServerEnvironment, *, address: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 model_control: str = "none", log=None):
        self.repository = Path(repository).absolute()
        self.environment = environment
        self.address = address
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_control = model_control
        self.log = log  # a file to write the server's log to; None: this process's stderr
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def host(self) -> str:
        """Where a client on this machine reaches the server."""
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    def url(self, scheme: str, model: str | None = None) -> str:
        port = {"grpc": self.grpc_port, "http": self.http_port, "metrics": self.metrics_port}[scheme]
        return f"{'http' if scheme == 'metrics' else scheme}://{self.host}:{port}" + (
            "/metrics" if scheme == "metrics" else f"/{model}" if model else "")

    def _backends(self) -> Path:
        """A backend folder with the wheel's python backend and the stub built for the environment's Python."""
        source = self.environment.pytriton / "tritonserver"
        stub = source / "python_backend_stubs" / self.environment.python / "triton_python_backend_stub"
        if not stub.is_file():
            raise SeDeployError(f"nvidia-pytriton has no python backend stub for Python {self.environment.python} "
                                f"(it ships {', '.join(sorted(p.name for p in stub.parents[1].iterdir()))})")
        self._workdir = Path(tempfile.mkdtemp(prefix="se-deploy-triton-"))
        backend = self._workdir / "backends" / "python"
        shutil.copytree(source / "backends" / "python", backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backend / "triton_python_backend_stub")
        return backend.parent

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.environment.tritonserver), f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={self.environment.pytriton / 'tritonserver' / 'caches'}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
        ]

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [self.environment.libdir, str(self.environment.pytriton.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        env["PATH"] = os.pathsep.join([str(self.environment.path / "bin"), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        return env

    def start(self, timeout: float = READY_TIMEOUT_S) -> TritonServer:
        """Start the server and wait until it is ready; a server that exits or never gets ready is one line."""
        backends = self._backends()
        try:
            self.process = subprocess.Popen(self.command(backends), env=self._environ(), stdin=subprocess.DEVNULL,
                                            stdout=self.log or sys.stderr, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        except OSError as e:
            self.stop()
            raise SeDeployError(f"{self.environment.tritonserver}: cannot start ({e.strerror or e})") from None
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise SeDeployError(f"tritonserver exited during start-up (exit code {code}): "
                                    f"{self.failure() or 'see its log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise SeDeployError(f"tritonserver was not ready after {timeout:.0f} s: {self.failure() or 'see its log'}")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/v2/health/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def failure(self) -> str | None:
        """The last error line of the server's log (when it goes to a file)."""
        name = getattr(self.log, "name", None)
        if not isinstance(name, str) or not os.path.isfile(name):
            return None
        with open(name, encoding="utf-8", errors="replace") as f:
            errors = [line.strip() for line in f if line.startswith("E") or line.startswith("error:")]
        errors = [e for e in errors if "CudaDriverHelper" not in e]  # every CPU-only start logs this one
        return errors[-1][:400] if errors else None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server and its python-model processes."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the server to stop (SIGTERM), kill what is left after ``timeout``; remove its working folder."""
        if self.process is not None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # models' processes that outlived the server
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
