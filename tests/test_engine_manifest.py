"""Engine manifest and the guards around TensorRT: missing packages, no GPU, stale engines.

No test builds or loads an engine: TensorRT and a GPU are absent here. The environment probe is
driven by stand-in ``cudart``/``tensorrt`` modules, the comparison by synthetic manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from se_deploy.tensorrt import engine_manifest as em
from se_deploy.errors import SeDeployError
from tests.conftest import REPO, run_cli

ORIN = em.Environment(tensorrt="10.3.0", cuda_runtime="12.6", cuda_driver="12.6", gpu_name="Orin",
                      compute_capability="8.7", machine="aarch64")


def manifest_for(env: em.Environment, sha: str = "ab" * 32) -> dict:
    return em.make_manifest(
        env, engine_sha256=sha, precision="fp16",
        inputs=[{"name": "images", "shape": [-1, 3, 320, 320], "dtype": "float32"}],
        outputs=[{"name": "output0", "shape": [-1, 6300, 8], "dtype": "float32"}],
        batch_profile={"min": 1, "opt": 1, "max": 8}, names={0: "circle", 1: "rectangle", 2: "triangle"},
        stride=32, imgsz=(320, 320), source_onnx=Path("engines/m.fp16.onnx"), source_sha256="cd" * 32,
        build={"strongly_typed": True, "flags": []},
        rebuild="se-deploy build-trt engines/m.fp16.onnx -o engines/m.fp16.engine",
    )


# --- missing pieces: one line naming what is missing and how to get it ---------------------------------
def test_missing_tensorrt_names_the_pip_extra_and_jetpack(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail as if not installed
    with pytest.raises(SeDeployError) as e:
        em.require_tensorrt()
    assert str(e.value) == "TensorRT is not installed: pip install 'se-deploy[trt]' (on Jetson, JetPack ships TensorRT)"


def test_missing_cuda_python_names_the_pip_extra(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SeDeployError, match=r"cuda-python is not installed.*pip install 'se-deploy\[trt\]'"):
        em.require_cudart()


class FakeCudart:
    """The few cuda-python runtime calls the probe makes, returning (error, value) like cuda-python."""

    class cudaError_t:  # noqa: N801 (cuda-python's spelling)
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    def __init__(self, count=1, error=0, name=b"NVIDIA GeForce RTX 4090\x00\x00", major=8, minor=9):
        self.count, self.error = count, error
        self.props = SimpleNamespace(name=name, major=major, minor=minor)

    def cudaGetErrorName(self, err):  # noqa: N802
        return 0, b"cudaErrorNoDevice"

    def cudaGetDeviceCount(self):  # noqa: N802
        return self.error, self.count

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return 0, self.props

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return 0, 12060

    def cudaDriverGetVersion(self):  # noqa: N802
        return 0, 12080


def _probe(monkeypatch, cudart, device=0):
    monkeypatch.setattr(em, "require_tensorrt", lambda: SimpleNamespace(__version__="10.7.0"))
    monkeypatch.setattr(em, "require_cudart", lambda: cudart)
    return em.current_environment(device)


def test_environment_probe_reads_gpu_name_compute_capability_and_versions(monkeypatch):
    env = _probe(monkeypatch, FakeCudart())
    assert (env.tensorrt, env.cuda_runtime, env.cuda_driver) == ("10.7.0", "12.6", "12.8")
    assert (env.gpu_name, env.compute_capability) == ("NVIDIA GeForce RTX 4090", "8.9")


@pytest.mark.parametrize("cudart", [FakeCudart(count=0), FakeCudart(error=FakeCudart.cudaError_t.cudaErrorNoDevice)])
def test_no_cuda_gpu_is_one_line(monkeypatch, cudart):
    with pytest.raises(SeDeployError, match=r"^no CUDA GPU found \(.*\): TensorRT engines need an NVIDIA GPU"):
        _probe(monkeypatch, cudart)


def test_device_index_beyond_the_gpus_is_refused(monkeypatch):
    with pytest.raises(SeDeployError, match="has 1 CUDA GPU"):
        _probe(monkeypatch, FakeCudart(), device=1)


# --- manifest vs environment ---------------------------------------------------------------------------
def test_same_environment_has_no_differences():
    assert em.differences(manifest_for(ORIN), ORIN) == []


def test_newer_driver_is_compatible():
    assert em.differences(manifest_for(ORIN), em.Environment(**{**ORIN.__dict__, "cuda_driver": "12.8"})) == []


@pytest.mark.parametrize("change, expected", [
    ({"tensorrt": "10.7.0"}, "TensorRT 10.3.0 != 10.7.0"),
    ({"gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"},
     "GPU Orin (sm 8.7) != NVIDIA GeForce RTX 4090 (sm 8.9)"),
    ({"gpu_name": "Orin NX"}, "GPU Orin (sm 8.7) != Orin NX (sm 8.7)"),
    ({"cuda_runtime": "13.0"}, "CUDA 12.6 != 13.0"),
])
def test_each_difference_is_named(change, expected):
    assert em.differences(manifest_for(ORIN), em.Environment(**{**ORIN.__dict__, **change})) == [expected]


def test_mismatch_is_refused_with_what_differs_and_the_rebuild_command():
    here = em.Environment(**{**ORIN.__dict__, "tensorrt": "11.0.0"})
    with pytest.raises(SeDeployError) as e:
        em.check_engine(Path("engines/m.fp16.engine"), manifest_for(ORIN), here, "ab" * 32)
    message = str(e.value)
    assert "\n" not in message
    assert "TensorRT 10.3.0 != 11.0.0" in message
    assert "`se-deploy build-trt engines/m.fp16.onnx -o engines/m.fp16.engine`" in message


def test_manifest_of_another_engine_is_refused():
    with pytest.raises(SeDeployError, match="describes another engine"):
        em.check_engine(Path("m.engine"), manifest_for(ORIN), ORIN, "ef" * 32)


def test_matching_engine_passes():
    em.check_engine(Path("m.engine"), manifest_for(ORIN), ORIN, "ab" * 32)


# --- reading manifests ---------------------------------------------------------------------------------
def test_manifest_sits_beside_the_engine_and_round_trips(tmp_path):
    engine = tmp_path / "m.fp16.engine"
    assert em.manifest_path(engine) == tmp_path / "m.fp16.engine.json"
    em.manifest_path(engine).write_text(json.dumps(manifest_for(ORIN)))
    data = em.read_manifest(engine)
    assert data["gpu"] == {"name": "Orin", "compute_capability": "8.7", "machine": "aarch64"}
    assert data["batch_profile"] == {"min": 1, "opt": 1, "max": 8}
    assert data["names"] == {"0": "circle", "1": "rectangle", "2": "triangle"}
    assert em.built_for(data) == ORIN


def test_engine_without_manifest_has_none(tmp_path):
    assert em.read_manifest(tmp_path / "m.engine") is None


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a readable engine manifest"),
    (json.dumps({"format": "se-deploy-engine", "tensorrt": "10.3.0"}), "missing cuda_runtime"),
    (json.dumps([1, 2]), "not an se-deploy engine manifest"),
])
def test_broken_manifest_is_refused(tmp_path, text, message):
    (tmp_path / "m.engine.json").write_text(text)
    with pytest.raises(SeDeployError, match=message):
        em.read_manifest(tmp_path / "m.engine")


# --- the refusal paths as a user meets them ------------------------------------------------------------
def _fake_packages(tmp_path: Path, gpus: int, driver: bool = True) -> dict:
    """PYTHONPATH with a stand-in ``tensorrt`` (installed, no GPU use) and cuda-python seeing ``gpus`` GPUs;
    without a ``driver``, cudaGetDeviceCount raises as cuda-python 12.x (to 12.8) does when libcuda.so is absent."""
    root = tmp_path / "site"
    (root / "tensorrt").mkdir(parents=True)
    (root / "tensorrt" / "__init__.py").write_text('__version__ = "10.3.0"\n')
    (root / "cuda" / "bindings").mkdir(parents=True)
    (root / "cuda" / "__init__.py").write_text("")
    (root / "cuda" / "bindings" / "__init__.py").write_text("")
    (root / "cuda" / "bindings" / "runtime.py").write_text(
        "class cudaError_t:\n    cudaSuccess = 0\n    cudaErrorNoDevice = 100\n"
        + ("def cudaGetDeviceCount():\n    raise RuntimeError('Failed to dlopen libcuda.so.1')\n" if not driver else
           f"def cudaGetDeviceCount():\n    return (0, {gpus}) if {gpus} else (cudaError_t.cudaErrorNoDevice, 0)\n")
        + "def cudaGetErrorName(err):\n    return 0, b'cudaErrorNoDevice'\n"
    )
    return {"PYTHONPATH": str(root)}


def _absent_tensorrt(tmp_path: Path) -> dict:
    root = tmp_path / "site"
    (root / "tensorrt").mkdir(parents=True)
    (root / "tensorrt" / "__init__.py").write_text("raise ImportError('No module named tensorrt')\n")
    return {"PYTHONPATH": str(root)}


def _one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_build_trt_without_tensorrt(fixtures, tmp_path):
    result = run_cli("build-trt", fixtures / "onnx" / "upstream-export-320.onnx", cwd=tmp_path,
                     env=_absent_tensorrt(tmp_path))
    _one_line_error(result, "TensorRT is not installed: pip install 'se-deploy[trt]' (on Jetson, JetPack ships TensorRT)")


def test_build_trt_without_gpu(fixtures, tmp_path):
    result = run_cli("build-trt", fixtures / "onnx" / "upstream-export-320.onnx", "--fp16", cwd=tmp_path,
                     env=_fake_packages(tmp_path, gpus=0))
    _one_line_error(result, "no CUDA GPU found (cudaErrorNoDevice)")
    assert not (tmp_path / "engines").exists()  # refused before quantizing anything


def test_engine_model_without_tensorrt(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    result = run_cli("bench", "--model", engine, "--iters", "1", cwd=tmp_path, env=_absent_tensorrt(tmp_path))
    _one_line_error(result, "TensorRT is not installed")


def test_cuda_python_without_a_driver_means_no_gpu(fixtures, tmp_path):
    env = _fake_packages(tmp_path, gpus=1, driver=False)
    result = run_cli("build-trt", fixtures / "onnx" / "upstream-export-320.onnx", "--fp16", cwd=tmp_path, env=env)
    _one_line_error(result, "no CUDA GPU found (Failed to dlopen libcuda.so.1)")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    result = run_cli("bench", "--model", engine, "--iters", "1", cwd=tmp_path, env=env)
    _one_line_error(result, "no CUDA GPU found (Failed to dlopen libcuda.so.1)")
    probe = subprocess.run([sys.executable, "-c", "from se_deploy.model_select import tensorrt_usable; "
                            "print(tensorrt_usable())"], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": f"{env['PYTHONPATH']}:{REPO}"})
    assert probe.stdout.strip() == "False", probe.stderr


def test_engine_model_without_gpu(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    result = run_cli("bench", "--model", engine, "--iters", "1", cwd=tmp_path, env=_fake_packages(tmp_path, gpus=0))
    _one_line_error(result, "no CUDA GPU found")


@pytest.mark.parametrize("device", ["cpu", "npu"])
def test_tensorrt_runner_refuses_non_cuda_devices(device):
    from se_deploy.runners.tensorrt_runner import device_index

    with pytest.raises(SeDeployError, match="runs on a CUDA GPU"):
        device_index(device)


@pytest.mark.parametrize("device, index", [(None, 0), ("cuda", 0), ("cuda:1", 1), ("2", 2), ("tensorrt", 0)])
def test_tensorrt_runner_device_names(device, index):
    from se_deploy.runners.tensorrt_runner import device_index

    assert device_index(device) == index
