"""ONNX Runtime runner: TensorRT EP > CUDA EP > CPU, keeping only providers that actually load."""

from __future__ import annotations

import ast
import contextlib
import ctypes.util
import io

import numpy as np

from se_deploy.errors import SeDeployError, first_line
from se_deploy.runners.base import Runner

_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def _gpu_driver_present() -> bool:
    """Whether a CUDA driver library exists; without one the GPU providers can only fail."""
    return ctypes.util.find_library("cuda") is not None


def candidate_providers(device: str | None, available: list[str]) -> list:
    """Providers to request, best first, for ``device`` ('tensorrt', 'cuda', 'cuda:N', 'cpu' or None = best);
    a device number goes to the GPU providers as their ``device_id``."""
    kind, _, index = (device or "").partition(":")
    if device is None:
        wanted = ["tensorrt", "cuda", "cpu"] if _gpu_driver_present() else ["cpu"]
    elif kind in _PROVIDERS and (not index or (index.isdigit() and kind == "cuda")):
        wanted = [kind, "cpu"] if kind != "cpu" else ["cpu"]
    else:
        raise SeDeployError(f"--device {device}: ONNX Runtime runs on cpu, cuda, cuda:N or tensorrt")
    options = {"device_id": int(index)} if index else None
    return [(_PROVIDERS[w], options) if options and w != "cpu" else _PROVIDERS[w]
            for w in wanted if _PROVIDERS[w] in available]


def model_precision(model_path) -> str:
    """'int8' if the graph holds Q/DQ nodes, 'fp16' if it computes in float16, else 'fp32'."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        return "int8"
    f16 = onnx.TensorProto.FLOAT16
    if any(init.data_type == f16 for init in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in model.graph.node
    ):
        return "fp16"
    return "fp32"


def parse_names(text: str | None, nc: int) -> dict[int, str]:
    """YOLOv5's ``names`` metadata (a Python dict or list literal) as {index: name}."""
    if text:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, dict):
            return {int(k): str(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return dict(enumerate(map(str, value)))
    return {i: f"class{i}" for i in range(nc)}


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model (FP32, FP16 or INT8 Q/DQ) with ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, path, device: str | None = None, threads: int | None = None):
        super().__init__(path)
        self._requested_device = device
        self._threads = threads
        self.session = None

    def _activate(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise SeDeployError(f"{self.path}: model not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # a provider that fails to load is reported by what we return
        ort.set_default_logger_severity(4)  # ...and so is the provider bridge's own multi-line error log
        # Idle worker threads sleep instead of spinning: the video pipeline's decode/encode threads need
        # those cores (on 2 shared cores this doubled CPU throughput; see benchmarks/video_throughput.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._threads:
            options.intra_op_num_threads = self._threads
        providers = candidate_providers(self._requested_device, ort.get_available_providers())
        try:  # a GPU provider that fails falls back to the next, and ORT prints "EP Error ..." on stdout
            with contextlib.redirect_stdout(io.StringIO()):  # what was used is checked (and said) below
                self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types for unreadable or invalid models
            raise SeDeployError(f"{self.path}: ONNX Runtime cannot load it ({first_line(e)})") from None
        used = self.session.get_providers()[0]
        kind = (self._requested_device or "").partition(":")[0]
        if kind not in ("", "cpu") and used != _PROVIDERS[kind]:
            raise SeDeployError(f"--device {self._requested_device}: ONNX Runtime could not use {_PROVIDERS[kind]} here")
        self.device = {v: k for k, v in _PROVIDERS.items()}.get(used, used)

        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        self.input_name, self._output_name = inp.name, out.name
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if len(self.input_shape) != 4 or len(out.shape) != 3:
            raise SeDeployError(f"{self.path}: not a YOLOv5 detector (input {inp.shape}, output {out.shape})")
        meta = self.session.get_modelmeta().custom_metadata_map
        nc = out.shape[2] - 5 if isinstance(out.shape[2], int) else 0
        self.names = parse_names(meta.get("names"), nc)
        self.stride = int(meta.get("stride", 32))
        self.precision = meta.get("precision") or model_precision(self.path)
        self.metadata = dict(meta)

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != self._input_dtype:
            batch = batch.astype(self._input_dtype)
        pred = self.session.run([self._output_name], {self.input_name: batch})[0]
        return pred if pred.dtype == np.float32 else pred.astype(np.float32)
