"""TensorRT runner: a plan file run with ``execute_async_v3`` on one CUDA stream.

Before deserialising, the engine's manifest (``<engine>.json``) is compared with the installed
TensorRT and this GPU, and a mismatch is refused with the command that rebuilds it. Device and
pinned host buffers are allocated once, for the largest batch of the engine's profile, through
cuda-python (no PyTorch needed).
"""

from __future__ import annotations

import ctypes
import hashlib

import numpy as np

from se_deploy.tensorrt.engine_manifest import (
    check_engine,
    cuda_call,
    current_environment,
    quiet_logger,
    read_manifest,
    require_cudart,
    require_tensorrt,
)
from se_deploy.errors import SeDeployError
from se_deploy.runners.base import Runner


def device_index(device: str | int | None) -> int:
    """'cuda', 'cuda:1', 'tensorrt', '1' or None -> CUDA device index; 'cpu' is refused."""
    if device is None or device in ("cuda", "gpu", "tensorrt"):
        return 0
    text = str(device).lower().removeprefix("cuda:")
    if text.isdigit():
        return int(text)
    raise SeDeployError(f"--device {device}: a TensorRT engine runs on a CUDA GPU (cuda or cuda:N); "
                        "use the .onnx model for other devices")


class _Buffer:
    """A device allocation with a pinned host mirror, sized for the engine's largest batch."""

    def __init__(self, cudart, shape: tuple, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.device = cuda_call(cudart, cudart.cudaMalloc(self.nbytes), "cudaMalloc")
        try:
            self._host_ptr = cuda_call(cudart, cudart.cudaMallocHost(self.nbytes), "cudaMallocHost")
        except SeDeployError:
            cudart.cudaFree(self.device)
            raise
        raw = (ctypes.c_byte * self.nbytes).from_address(int(self._host_ptr))
        self.host = np.frombuffer(raw, dtype=self.dtype).reshape(shape)

    def free(self, cudart) -> None:
        cudart.cudaFree(self.device)
        cudart.cudaFreeHost(self._host_ptr)


class TensorRTRunner(Runner):
    """Runs an se-deploy TensorRT engine (any plan file with one image input and one output)."""

    backend = "tensorrt"

    def __init__(self, path, device: str | int | None = None):
        super().__init__(path)
        self._device = device_index(device)
        self.manifest: dict | None = None
        self.max_batch = 1
        self._min_batch = 1
        self._dynamic = False
        self._size_range = ((0, 0), (1 << 30, 1 << 30))

    def _activate(self) -> None:
        trt, cudart = require_tensorrt(), require_cudart()
        env = current_environment(self._device)
        data = self.path.read_bytes()
        self.manifest = read_manifest(self.path)
        if self.manifest is not None:
            check_engine(self.path, self.manifest, env, hashlib.sha256(data).hexdigest())
        cuda_call(cudart, cudart.cudaSetDevice(self._device), "cudaSetDevice")
        self._cudart = cudart
        self._in = self._out = self._stream = None
        try:
            self._load(trt, cudart, data, env)
        except BaseException:  # a half-made activation gives back what it allocated
            self._release()
            raise

    def _load(self, trt, cudart, data: bytes, env) -> None:
        """Deserialise the plan, read its I/O, allocate the buffers and the stream."""
        self._logger = quiet_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            detail = self._logger.errors[-1] if self._logger.errors else "not a TensorRT plan?"
            raise SeDeployError(f"{self.path}: TensorRT {trt.__version__} cannot load it ({detail}); "
                                "rebuild it here with `se-deploy build-trt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise SeDeployError(f"{self.path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        self.input_name, self._output_name = inputs[0], outputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if len(shape) != 4:
            raise SeDeployError(f"{self.path}: input '{self.input_name}' is not (N, 3, H, W): {shape}")
        if -1 in shape:  # dynamic axes: the optimization profile bounds them
            low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        else:
            low = high = shape
        self._min_batch, self.max_batch, max_shape = low[0], high[0], high
        self._dynamic = -1 in shape
        self._size_range = (tuple(low[2:]), tuple(high[2:]))
        # the batch axis stays open; a size the profile pins (min == max) is the model's size
        self.input_shape = (None if shape[0] == -1 else int(shape[0]),
                            *(int(h) if lo == h else None for lo, h in zip(low[1:], high[1:])))
        self.context.set_input_shape(self.input_name, max_shape)
        out_max = tuple(self.context.get_tensor_shape(self._output_name))
        self._in = _Buffer(cudart, max_shape, trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self._out = _Buffer(cudart, out_max, trt.nptype(self.engine.get_tensor_dtype(self._output_name)))
        self.context.set_tensor_address(self.input_name, int(self._in.device))
        self.context.set_tensor_address(self._output_name, int(self._out.device))
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

        meta = self.manifest or {}
        nc = out_max[-1] - 5
        self.names = {int(k): v for k, v in meta.get("names", {}).items()} or {i: f"class{i}" for i in range(nc)}
        self.stride = int(meta.get("stride", 32))
        self.precision = meta.get("precision", "unknown")
        self.device = f"cuda:{self._device} ({env.gpu_name})"
        self.metadata = meta

    def _release(self) -> None:
        """Free the stream and buffers that exist, and drop the engine."""
        cudart = self._cudart
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
            cudart.cudaStreamDestroy(self._stream)
        for buffer in (self._in, self._out):
            if buffer is not None:
                buffer.free(cudart)
        self._in = self._out = self._stream = None
        self.context = self.engine = self._runtime = None

    def _deactivate(self) -> None:
        self._release()

    def check_input(self, batch: np.ndarray) -> None:
        """Besides the base checks: a dynamic-size engine takes the sizes of its profile only."""
        super().check_input(batch)
        (low_h, low_w), (high_h, high_w) = self._size_range
        h, w = batch.shape[2:]
        if not (low_h <= h <= high_h and low_w <= w <= high_w):
            raise SeDeployError(f"{self.path.name}: built for inputs from {low_h}x{low_w} to {high_h}x{high_w}, got "
                                f"{h}x{w} (rebuild with `se-deploy build-trt --min-imgsz/--max-imgsz`)")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One call of at most max_batch images (padded up to the profile's minimum)."""
        cudart, n = self._cudart, len(batch)
        size = max(n, self._min_batch)
        if self._dynamic:
            self.context.set_input_shape(self.input_name, (size, *batch.shape[1:]))
        shape = (size, *batch.shape[1:])  # within the buffer's max shape: a view of its first bytes
        host_in = self._in.host.reshape(-1)[: int(np.prod(shape))].reshape(shape)
        host_in[:n] = batch
        host_in[n:] = 0
        out_shape = tuple(self.context.get_tensor_shape(self._output_name))
        nbytes_out = int(np.prod(out_shape)) * self._out.dtype.itemsize
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._in.device, host_in.ctypes.data, host_in.nbytes, h2d,
                                                 self._stream), "cudaMemcpyAsync")
        if not self.context.execute_async_v3(int(self._stream)):
            raise SeDeployError(f"{self.path.name}: TensorRT execution failed")
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._out.host.ctypes.data, self._out.device, nbytes_out, d2h,
                                                 self._stream), "cudaMemcpyAsync")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return self._out.host.reshape(-1)[: int(np.prod(out_shape))].reshape(out_shape)[:n].astype(np.float32)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) <= self.max_batch:
            return self._run(batch)
        return np.concatenate([self._run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])
