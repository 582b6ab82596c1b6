"""Build planning for TensorRT: profiles, DLA, workspace, timing cache, source selection.

Everything here is decided before TensorRT is touched, so it runs without a GPU; ``configure`` is
checked against a recording stand-in for the builder config. No test builds an engine.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

from se_deploy.tensorrt import builder as tb
from se_deploy.tensorrt.engine_manifest import Environment
from se_deploy.errors import SeDeployError

ENV = Environment(tensorrt="10.3.0", cuda_runtime="12.6", cuda_driver="12.6", gpu_name="NVIDIA GeForce RTX 4090",
                  compute_capability="8.9")


@pytest.fixture
def static_onnx(fixtures, tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copyfile(fixtures / "onnx" / "upstream-export-320.onnx", path)
    return path


def _with_input_dims(src: Path, dst: Path, dims: list, props: dict | None = None) -> Path:
    model = onnx.load(str(src))
    shape = model.graph.input[0].type.tensor_type.shape
    for dim, value in zip(shape.dim, dims):
        dim.Clear()
        if isinstance(value, int):
            dim.dim_value = value
        else:
            dim.dim_param = value
    for key, value in (props or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, dst)
    return dst


@pytest.fixture
def dynamic_onnx(static_onnx, tmp_path) -> Path:
    return _with_input_dims(static_onnx, tmp_path / "dyn.onnx", ["batch", 3, 320, 320])


def plan(path, precision="fp32", **options):
    return tb.plan_build(path, ENV, precision=precision, directory=path.parent / "engines", **options)


# --- defaults ------------------------------------------------------------------------------------------
def test_static_model_plan(static_onnx):
    p = plan(static_onnx)
    assert p.input_name == "images" and p.input_shape == (1, 3, 320, 320) and p.imgsz == (320, 320)
    assert p.profile is None  # a static batch needs no optimization profile
    assert p.engine == static_onnx.parent / "engines" / "model.engine"
    assert p.timing_cache == static_onnx.parent / "engines" / "timing-nvidia-geforce-rtx-4090-sm89-trt10.3.0.cache"
    assert p.flags == () and p.cleared_flags == ("TF32",)  # FP32 engines compute in FP32
    assert p.workspace_bytes is None and p.dla_core is None


def test_quantized_models_keep_tf32_allowed(static_onnx):
    assert plan(static_onnx, "fp16").cleared_flags == ()


def test_dynamic_batch_default_profile(dynamic_onnx):
    p = plan(dynamic_onnx)
    assert p.input_shape == (None, 3, 320, 320)
    assert p.profile == tb.BatchProfile(1, 1, 8)
    assert p.shapes() == ((1, 3, 320, 320), (1, 3, 320, 320), (8, 3, 320, 320))


@pytest.mark.parametrize("options, profile", [
    ({"batch": 4}, (4, 4, 4)),
    ({"max_batch": 16}, (1, 1, 16)),
    ({"min_batch": 2, "opt_batch": 4, "max_batch": 32}, (2, 4, 32)),
    ({"opt_batch": 12}, (1, 12, 12)),
    ({"min_batch": 10}, (10, 10, 10)),
])
def test_batch_options_make_the_profile(dynamic_onnx, options, profile):
    assert plan(dynamic_onnx, **options).profile == tb.BatchProfile(*profile)


@pytest.mark.parametrize("options, message", [
    ({"batch": 4, "max_batch": 8}, "exclude each other"),
    ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, "need --min-batch <= --opt-batch <= --max-batch"),
    ({"max_batch": 0}, "at least 1"),
    ({"batch": -1}, "at least 1"),
])
def test_bad_batch_options_are_refused(dynamic_onnx, options, message):
    with pytest.raises(SeDeployError, match=message):
        plan(dynamic_onnx, **options)


@pytest.mark.parametrize("options", [{"batch": 4}, {"max_batch": 8}, {"min_batch": 2}])
def test_static_batch_model_refuses_other_batches(static_onnx, options):
    with pytest.raises(SeDeployError, match="has a fixed batch of 1; export it with --dynamic"):
        plan(static_onnx, **options)


def test_static_batch_model_accepts_its_own_batch(static_onnx):
    assert plan(static_onnx, batch=1).profile is None


# --- input size ----------------------------------------------------------------------------------------
def test_dynamic_size_needs_imgsz(static_onnx, tmp_path):
    model = _with_input_dims(static_onnx, tmp_path / "anysize.onnx", ["batch", 3, "height", "width"])
    with pytest.raises(SeDeployError, match="dynamic input size: pass --imgsz"):
        plan(model)
    p = plan(model, imgsz=640)
    assert p.imgsz == (640, 640) and p.shapes()[2] == (8, 3, 640, 640)
    assert "--imgsz 640" in p.rebuild_command()


def test_dynamic_size_falls_back_to_metadata(static_onnx, tmp_path):
    model = _with_input_dims(static_onnx, tmp_path / "anysize.onnx", [1, 3, "height", "width"], {"imgsz": "[256, 320]"})
    assert plan(model).imgsz == (256, 320)


def test_dynamic_size_gets_a_size_profile(static_onnx, tmp_path):
    model = _with_input_dims(static_onnx, tmp_path / "anysize.onnx", ["batch", 3, "height", "width"],
                             {"imgsz": "[320, 320]", "stride": "32"})
    p = plan(model)  # default: any size from one stride up to the export size
    assert p.size_profile == ((32, 32), (320, 320), (320, 320))
    assert p.shapes() == ((1, 3, 32, 32), (1, 3, 320, 320), (8, 3, 320, 320))
    p = plan(model, imgsz=(384, 640), min_imgsz=256, max_imgsz=(640, 1280), batch=1)
    assert p.shapes() == ((1, 3, 256, 256), (1, 3, 384, 640), (1, 3, 640, 1280))
    assert "--imgsz 384,640 --min-imgsz 256,256 --max-imgsz 640,1280" in p.rebuild_command()
    log = []
    tb.configure(FAKE_TRT, Recorder(log, "builder"), Recorder(log, "config"), p)
    assert ("profile.set_shape", ("images", *p.shapes())) in log  # one profile carries batch and size


@pytest.mark.parametrize("options, message", [
    ({"imgsz": 320, "min_imgsz": 416}, "need --min-imgsz <= --imgsz <= --max-imgsz"),
    ({"imgsz": 320, "max_imgsz": 256}, "need --min-imgsz <= --imgsz <= --max-imgsz"),
    ({"imgsz": 330}, "--imgsz 330,330: sides must be multiples of the stride 32"),
])
def test_bad_size_profiles_are_refused(static_onnx, tmp_path, options, message):
    model = _with_input_dims(static_onnx, tmp_path / "anysize.onnx", ["batch", 3, "height", "width"])
    with pytest.raises(SeDeployError, match=message):
        plan(model, **options)


def test_fixed_size_model_refuses_a_size_range(static_onnx):
    with pytest.raises(SeDeployError, match="has a fixed 320x320 input; export it with --dynamic-size"):
        plan(static_onnx, max_imgsz=640)


def test_imgsz_must_match_a_fixed_size(static_onnx):
    with pytest.raises(SeDeployError, match="--imgsz 640: model.onnx has a fixed 320x320 input"):
        plan(static_onnx, imgsz=640)


# --- DLA, workspace, outputs ---------------------------------------------------------------------------
def test_dla_sets_gpu_fallback(static_onnx):
    p = plan(static_onnx, "int8", dla_core=1)
    assert p.dla_core == 1 and p.flags == ("GPU_FALLBACK",)
    assert "--dla-core 1" in p.rebuild_command()


def test_dla_refuses_fp32(static_onnx):
    with pytest.raises(SeDeployError, match="DLA runs FP16 and INT8 layers only; add --fp16 or --int8"):
        plan(static_onnx, dla_core=0)


def test_negative_dla_core_is_refused(static_onnx):
    with pytest.raises(SeDeployError, match="--dla-core -1"):
        plan(static_onnx, "fp16", dla_core=-1)


def test_workspace_in_gigabytes(static_onnx):
    p = plan(static_onnx, workspace_gb=1.5)
    assert p.workspace_bytes == 1536 * 2**20
    assert "--workspace 1.5" in p.rebuild_command()
    with pytest.raises(SeDeployError, match="--workspace 0"):
        plan(static_onnx, workspace_gb=0)


def test_engine_suffix_and_explicit_paths(static_onnx, tmp_path):
    p = tb.plan_build(static_onnx, ENV, tmp_path / "x.plan", precision="fp16", timing_cache=tmp_path / "t.cache")
    assert p.engine == tmp_path / "x.plan" and p.timing_cache == tmp_path / "t.cache"
    assert p.rebuild_command() == f"se-deploy build-trt {static_onnx} -o {tmp_path / 'x.plan'}"
    with pytest.raises(SeDeployError, match="must end in .engine or .plan"):
        tb.plan_build(static_onnx, ENV, tmp_path / "x.onnx", precision="fp16")


def test_rebuild_command_repeats_the_profile(dynamic_onnx):
    command = plan(dynamic_onnx, min_batch=2, opt_batch=4, max_batch=8).rebuild_command()
    assert "--min-batch 2 --opt-batch 4 --max-batch 8" in command


# --- applying a plan to TensorRT's builder config ------------------------------------------------------
class Recorder:
    """Records attribute writes and method calls made on it (a stand-in for builder/config/profile)."""

    def __init__(self, log, name):
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_name", name)

    def __getattr__(self, method):
        def call(*args):
            self._log.append((f"{self._name}.{method}", args))
            return Recorder(self._log, "profile") if method == "create_optimization_profile" else None
        return call

    def __setattr__(self, key, value):
        self._log.append((f"{self._name}.{key}=", value))


FAKE_TRT = SimpleNamespace(
    MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    DeviceType=SimpleNamespace(DLA="DLA", GPU="GPU"),
    BuilderFlag=SimpleNamespace(GPU_FALLBACK="GPU_FALLBACK", TF32="TF32"),
)


def test_configure_applies_profile_workspace_and_dla(dynamic_onnx):
    log = []
    p = plan(dynamic_onnx, "fp16", max_batch=4, workspace_gb=2, dla_core=0)
    tb.configure(FAKE_TRT, Recorder(log, "builder"), Recorder(log, "config"), p)
    assert [entry[0] for entry in log] == [
        "config.set_memory_pool_limit", "builder.create_optimization_profile", "profile.set_shape",
        "config.add_optimization_profile", "config.default_device_type=", "config.DLA_core=", "config.set_flag",
    ]
    assert log[0][1] == ("WORKSPACE", 2 * 2**30)
    assert log[2][1] == ("images", (1, 3, 320, 320), (1, 3, 320, 320), (4, 3, 320, 320))
    assert (log[4][1], log[5][1], log[6][1]) == ("DLA", 0, ("GPU_FALLBACK",))


def test_configure_static_fp32(static_onnx):
    log = []
    tb.configure(FAKE_TRT, Recorder(log, "builder"), Recorder(log, "config"), plan(static_onnx))
    assert log == [("config.clear_flag", ("TF32",))]


@pytest.mark.parametrize("flag, expected", [(1, 2), (0, 1), (None, 0)])
def test_network_is_created_strongly_typed(flag, expected):
    creation = SimpleNamespace() if flag is None else SimpleNamespace(STRONGLY_TYPED=flag)
    assert tb.network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=creation)) == expected


# --- which ONNX gets built -----------------------------------------------------------------------------
def _mark(path: Path, props: dict) -> Path:
    model = onnx.load(str(path))
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def test_newest_fp32_onnx_skips_quantized_ones(static_onnx, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    older = shutil.copyfile(static_onnx, engines / "a.onnx")
    newer = _mark(Path(shutil.copyfile(static_onnx, engines / "a.fp16.onnx")), {"precision": "fp16"})
    os.utime(older, (1, 1))
    assert newer.stat().st_mtime > older.stat().st_mtime
    assert tb.newest_fp32_onnx(engines) == older


def test_no_fp32_onnx_is_one_line(tmp_path):
    with pytest.raises(SeDeployError, match="holds no FP32 ONNX: run `se-deploy export WEIGHTS.pt` first"):
        tb.newest_fp32_onnx(tmp_path)


def test_model_already_at_the_precision_is_built_as_is(static_onnx):
    assert tb.source_for(static_onnx, "fp32") == (static_onnx, None)


def test_existing_quantized_version_is_reused(static_onnx, tmp_path):
    from se_deploy.artifacts import sha256_file

    engines = tmp_path / "engines"
    engines.mkdir()
    done = _mark(Path(shutil.copyfile(static_onnx, engines / "model.fp16.onnx")),
                 {"precision": "fp16", "quantized_from_sha256": sha256_file(static_onnx)})
    assert tb.source_for(static_onnx, "fp16", directory=engines) == (done, None)


def test_stale_quantized_version_is_not_reused(static_onnx, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    _mark(Path(shutil.copyfile(static_onnx, engines / "model.int8.onnx")),
          {"precision": "int8", "quantized_from_sha256": "0" * 64})
    with pytest.raises(SeDeployError, match="INT8 needs calibration images"):  # so it would quantize again
        tb.source_for(static_onnx, "int8", directory=engines)


def test_quantized_model_cannot_become_another_precision(static_onnx, tmp_path):
    model = _mark(Path(shutil.copyfile(static_onnx, tmp_path / "m.fp16.onnx")), {"precision": "fp16"})
    with pytest.raises(SeDeployError, match="m.fp16.onnx is already fp16; give its FP32 ONNX to build int8"):
        tb.source_for(model, "int8")


def test_build_engine_checks_tensorrt_before_anything(static_onnx, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(SeDeployError, match="TensorRT is not installed"):
        tb.build_engine(static_onnx, precision="int8", directory=tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_cli_fp16_and_int8_exclude_each_other(static_onnx, tmp_path):
    from tests.conftest import run_cli

    result = run_cli("build-trt", static_onnx, "--fp16", "--int8", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --fp16 and --int8 exclude each other\n"
