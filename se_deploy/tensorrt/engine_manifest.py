"""What a TensorRT engine was built for, written beside it, and the guard that refuses a mismatch.

A plan file runs only with the TensorRT version that built it, on the GPU architecture it was tuned
for. ``<engine>.json`` records that (plus I/O, batch profile, classes and provenance) so a runner can
refuse a stale engine with one line naming what differs and the command that rebuilds it, instead
of a TensorRT deserialisation error. The engine itself stays a plain plan file (trtexec, Triton and
DeepStream load it as is).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from se_deploy.errors import SeDeployError, first_line

MANIFEST_FORMAT = "se-deploy-engine"
MANIFEST_VERSION = 1
INSTALL_HINT = "pip install 'se-deploy[trt]' (on Jetson, JetPack ships TensorRT)"
REQUIRED_KEYS = ("tensorrt", "cuda_runtime", "gpu", "precision", "inputs", "outputs", "engine_sha256")


def require_tensorrt():
    """The ``tensorrt`` module, or a one-line SeDeployError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise SeDeployError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    except OSError as e:  # the wheel is there but its libraries (libnvinfer, CUDA) do not load
        raise SeDeployError(f"TensorRT is installed but does not load ({first_line(e)}): {INSTALL_HINT}") from None
    return tensorrt


def require_cudart():
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise SeDeployError(f"cuda-python is not installed (TensorRT needs it here for GPU memory): {INSTALL_HINT}") from None
    return cudart


def quiet_logger(trt):
    """A TensorRT logger that keeps errors (for one-line messages) instead of printing anything."""

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg).strip())

    return Collecting()


def _error_name(cudart, err) -> str:
    name = cudart.cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def cuda_call(cudart, result, what: str):
    """Unpack cuda-python's ``(error, value...)`` tuples; a CUDA error becomes a one-line SeDeployError."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise SeDeployError(f"CUDA {what} failed: {_error_name(cudart, err)}")
    return values[0] if len(values) == 1 else tuple(values)


def _version(code: int) -> str:
    """CUDA's integer version (12060) as '12.6'."""
    return f"{code // 1000}.{code % 1000 // 10}"


@dataclass(frozen=True)
class Environment:
    """The TensorRT + CUDA + GPU combination an engine is built for or loaded on."""

    tensorrt: str
    cuda_runtime: str
    cuda_driver: str
    gpu_name: str
    compute_capability: str  # '8.7'
    machine: str = platform.machine()


def current_environment(device: int = 0) -> Environment:
    """Probe TensorRT, CUDA and GPU ``device``; each missing piece is a one-line SeDeployError."""
    trt = require_tensorrt()
    cudart = require_cudart()
    try:
        err, count = cudart.cudaGetDeviceCount()
    except RuntimeError as e:  # cuda-python 12.x (to 12.8) raises when libcuda.so cannot be loaded: no driver
        raise SeDeployError(f"no CUDA GPU found ({first_line(e)}): TensorRT engines need an NVIDIA GPU and its driver") from None
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        reason = "no device" if err == cudart.cudaError_t.cudaSuccess else _error_name(cudart, err)
        raise SeDeployError(f"no CUDA GPU found ({reason}): TensorRT engines need an NVIDIA GPU and its driver")
    if not 0 <= device < count:
        raise SeDeployError(f"--device cuda:{device}: this machine has {count} CUDA GPU(s)")
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0")[0].decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return Environment(
        tensorrt=trt.__version__,
        cuda_runtime=_version(cuda_call(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
        cuda_driver=_version(cuda_call(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")),
        gpu_name=name.strip(),
        compute_capability=f"{props.major}.{props.minor}",
    )


def manifest_path(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def make_manifest(env: Environment, *, engine_sha256: str, precision: str, inputs: list[dict], outputs: list[dict],
                  batch_profile: dict | None, names: dict[int, str], stride: int, imgsz: tuple[int, int],
                  source_onnx: Path, source_sha256: str, build: dict, rebuild: str,
                  size_profile: list | None = None) -> dict:
    """The manifest as a JSON-ready dict (``build`` holds flags, workspace, DLA, timing cache, time)."""
    from se_deploy import __version__

    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "se_deploy": __version__,
        "tensorrt": env.tensorrt, "cuda_runtime": env.cuda_runtime, "cuda_driver": env.cuda_driver,
        "gpu": {"name": env.gpu_name, "compute_capability": env.compute_capability, "machine": env.machine},
        "precision": precision, "inputs": inputs, "outputs": outputs, "batch_profile": batch_profile,
        "size_profile": size_profile,
        "names": {str(k): v for k, v in names.items()}, "stride": int(stride), "imgsz": [int(v) for v in imgsz],
        "source_onnx": {"path": str(source_onnx), "sha256": source_sha256},
        "engine_sha256": engine_sha256, "build": build, "rebuild": rebuild,
    }


def read_manifest(engine: str | Path) -> dict | None:
    """The manifest beside ``engine``; None when there is none; a SeDeployError when it is not one."""
    path = manifest_path(engine)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SeDeployError(f"{path}: not a readable engine manifest ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in data] if isinstance(data, dict) else list(REQUIRED_KEYS)
    if missing or data.get("format") != MANIFEST_FORMAT:
        raise SeDeployError(f"{path}: not an se-deploy engine manifest (missing {', '.join(missing) or 'format'})")
    return data


def built_for(manifest: dict) -> Environment:
    gpu = manifest["gpu"]
    return Environment(tensorrt=manifest["tensorrt"], cuda_runtime=manifest["cuda_runtime"],
                       cuda_driver=manifest.get("cuda_driver", "?"), gpu_name=gpu.get("name", "?"),
                       compute_capability=gpu.get("compute_capability", "?"), machine=gpu.get("machine", "?"))


def differences(manifest: dict, env: Environment) -> list[str]:
    """What keeps an engine built as ``manifest`` says from loading in ``env`` (empty: compatible).

    TensorRT plans load only in the exact TensorRT version that built them; kernels are chosen for one
    GPU model (TensorRT warns that another model, even of the same architecture, may fail or run slowly);
    a different CUDA major version means a different TensorRT build. Driver versions may differ.
    """
    built = built_for(manifest)
    found = []
    if built.tensorrt != env.tensorrt:
        found.append(f"TensorRT {built.tensorrt} != {env.tensorrt}")
    if built.compute_capability != env.compute_capability or built.gpu_name != env.gpu_name:
        found.append(f"GPU {built.gpu_name} (sm {built.compute_capability}) != {env.gpu_name} (sm {env.compute_capability})")
    if built.cuda_runtime.split(".")[0] != env.cuda_runtime.split(".")[0]:
        found.append(f"CUDA {built.cuda_runtime} != {env.cuda_runtime}")
    return found


def check_engine(engine: str | Path, manifest: dict, env: Environment, engine_sha256: str) -> None:
    """Refuse (one line) an engine whose manifest does not match it or this machine."""
    engine = Path(engine)
    rebuild = manifest.get("rebuild") or "se-deploy build-trt MODEL.onnx"
    if manifest["engine_sha256"] != engine_sha256:
        raise SeDeployError(f"{engine.name}: its manifest {manifest_path(engine).name} describes another engine "
                            f"(sha256 differs); rebuild with `{rebuild}`")
    found = differences(manifest, env)
    if found:
        raise SeDeployError(f"{engine.name} was built for another setup ({'; '.join(found)}); "
                            f"rebuild it here with `{rebuild}`")
