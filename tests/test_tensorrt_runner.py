"""The TensorRT runner's own logic on a stand-in engine: batch padding and chunking, output order,
and freeing every CUDA allocation, also when activation fails half-way.

TensorRT and a GPU are absent here, so ``tensorrt`` and cuda-python's ``cudart`` are replaced by
stand-ins that keep "device" memory in host buffers and run a fake network on it.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from se_deploy.errors import SeDeployError
from se_deploy.runners import tensorrt_runner
from se_deploy.runners.tensorrt_runner import TensorRTRunner

IMGSZ, ANCHORS, NC = 64, 252, 3  # (8*8 + 4*4 + 2*2) * 3 anchors at 64 px
PROFILE = ((2, 3, IMGSZ, IMGSZ), (2, 3, IMGSZ, IMGSZ), (4, 3, IMGSZ, IMGSZ))  # batch 2..4
SIZE_PROFILE = ((1, 3, 32, 32), (1, 3, 64, 64), (2, 3, 128, 128))  # a dynamic-size engine: 32..128 px


def anchors(h: int, w: int) -> int:
    return 3 * sum((h // s) * (w // s) for s in (8, 16, 32))


class FakeCudart:
    """cuda-python's runtime calls the runner makes; memory is ctypes buffers, keyed by address."""

    class cudaError_t:  # noqa: N801 (cuda-python's spelling)
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)  # noqa: N815

    def __init__(self, fail: str | None = None, fail_after: int = 0):
        self.live: dict[int, ctypes.Array] = {}  # address -> buffer still allocated
        self.fail, self.fail_after = fail, fail_after

    def _alloc(self, what, nbytes):
        if what == self.fail:
            if self.fail_after == 0:
                return self.cudaError_t.cudaErrorMemoryAllocation, None
            self.fail_after -= 1
        buffer = ctypes.create_string_buffer(nbytes)
        self.live[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaMalloc(self, nbytes):  # noqa: N802
        return self._alloc("cudaMalloc", nbytes)

    def cudaMallocHost(self, nbytes):  # noqa: N802
        return self._alloc("cudaMallocHost", nbytes)

    def cudaFree(self, ptr):  # noqa: N802
        del self.live[int(ptr)]
        return (0,)

    cudaFreeHost = cudaFree  # noqa: N815

    def cudaStreamCreate(self):  # noqa: N802
        return self._alloc("cudaStreamCreate", 1)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return self.cudaFree(stream)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaSetDevice(self, device):  # noqa: N802
        return (0,)

    def cudaGetErrorName(self, err):  # noqa: N802
        return 0, b"cudaErrorMemoryAllocation"

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        ctypes.memmove(int(dst), int(src), nbytes)
        return (0,)


class FakeContext:
    """An execution context whose 'network' writes each image's mean into column 0 of its rows."""

    def __init__(self):
        self.shape, self.addresses = None, {}
        self.batches_run: list[int] = []
        self.shapes_run: list[tuple] = []

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)

    def get_tensor_shape(self, name):
        return (self.shape[0], anchors(*self.shape[2:]), 5 + NC)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _array(self, name, shape):
        """The float32 'device' memory bound to tensor ``name``, as an array of ``shape``."""
        memory = (ctypes.c_float * int(np.prod(shape))).from_address(self.addresses[name])
        return np.ctypeslib.as_array(memory).reshape(shape)

    def execute_async_v3(self, stream):
        n, _, h, w = self.shape
        images = self._array("images", (n, 3 * h * w))
        out = self._array("output0", (n, anchors(h, w), 5 + NC))
        out[:] = 0
        out[:, :, 0] = images.mean(1)[:, None]
        self.batches_run.append(n)
        self.shapes_run.append(self.shape)
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, input_shape=(-1, 3, IMGSZ, IMGSZ), profile=PROFILE):
        self.context = FakeContext()
        self.input_shape, self.profile = input_shape, profile

    def get_tensor_name(self, i):
        return ("images", "output0")[i]

    def get_tensor_mode(self, name):
        return "in" if name == "images" else "out"

    def get_tensor_shape(self, name):
        return self.input_shape if name == "images" else (-1, -1, 5 + NC)

    def get_tensor_profile_shape(self, name, profile):
        return self.profile

    def get_tensor_dtype(self, name):
        return np.float32

    def create_execution_context(self):
        return self.context


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """A plan file plus stand-in TensorRT; returns (engine path, cudart, engine)."""
    engine = FakeEngine()
    trt = SimpleNamespace(__version__="10.7.0", TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"),
                          nptype=lambda dtype: dtype, Runtime=lambda logger: SimpleNamespace(
                              deserialize_cuda_engine=lambda data: engine))
    cudart = FakeCudart()
    monkeypatch.setattr(tensorrt_runner, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_runner, "require_cudart", lambda: cudart)
    monkeypatch.setattr(tensorrt_runner, "current_environment", lambda device: SimpleNamespace(gpu_name="Stand-in"))
    monkeypatch.setattr(tensorrt_runner, "quiet_logger", lambda trt: SimpleNamespace(errors=[]))
    monkeypatch.setattr(tensorrt_runner, "read_manifest", lambda path: None)
    path = tmp_path / "m.engine"
    path.write_bytes(b"plan")
    return path, cudart, engine


def test_batches_are_padded_chunked_and_returned_in_order(stand_in):
    path, cudart, engine = stand_in
    images = np.random.default_rng(0).random((6, 3, IMGSZ, IMGSZ), np.float32)
    with TensorRTRunner(path) as runner:
        assert runner.static_batch is None and runner.imgsz == (IMGSZ, IMGSZ) and runner.max_batch == 4
        assert runner.device == "cuda:0 (Stand-in)" and runner.nc == NC
        six = runner.infer(images)  # more than the profile's 4: two calls
        one = runner.infer(images[:1])  # fewer than the profile's 2: padded, padding dropped
        assert len(cudart.live) == 5  # input and output, device and pinned host, and the stream
    assert engine.context.batches_run == [4, 2, 2]
    assert six.shape == (6, ANCHORS, 5 + NC) and one.shape == (1, ANCHORS, 5 + NC) and six.dtype == np.float32
    np.testing.assert_allclose(six[:, 0, 0], images.reshape(6, -1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(one[0, :, 0], images[0].mean(), rtol=1e-5)
    assert cudart.live == {}  # deactivation freed everything


@pytest.mark.parametrize("fail, fail_after", [("cudaMalloc", 1), ("cudaMallocHost", 1), ("cudaStreamCreate", 0)])
def test_a_failed_activation_frees_what_it_had_allocated(stand_in, fail, fail_after):
    path, cudart, _ = stand_in
    cudart.fail, cudart.fail_after = fail, fail_after
    runner = TensorRTRunner(path)
    with pytest.raises(SeDeployError, match=f"CUDA {fail} failed: cudaErrorMemoryAllocation"):
        runner.activate()
    assert cudart.live == {} and not runner.is_active


def test_a_dynamic_size_engine_runs_each_size_of_its_profile(stand_in):
    path, cudart, engine = stand_in
    dynamic = FakeEngine(input_shape=(-1, 3, -1, -1), profile=SIZE_PROFILE)
    engine.__dict__.update(dynamic.__dict__)  # the stand-in runtime hands out this engine object
    rng = np.random.default_rng(1)
    with TensorRTRunner(path) as runner:
        assert runner.imgsz is None and runner.static_batch is None and runner.max_batch == 2
        for h, w in ((64, 96), (128, 128), (32, 64)):
            images = rng.random((2, 3, h, w), np.float32)
            out = runner.infer(images)
            assert out.shape == (2, anchors(h, w), 5 + NC)
            np.testing.assert_allclose(out[:, 0, 0], images.reshape(2, -1).mean(1), rtol=1e-5)
        with pytest.raises(SeDeployError, match="built for inputs from 32x32 to 128x128, got 160x128"):
            runner.infer(rng.random((1, 3, 160, 128), np.float32))
    assert engine.context.shapes_run == [(2, 3, 64, 96), (2, 3, 128, 128), (2, 3, 32, 64)]
    assert cudart.live == {}
