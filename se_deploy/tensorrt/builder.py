"""ONNX -> TensorRT engine, strongly typed: the precision is the ONNX's own (see ``quantize``).

``plan_build`` turns the options into a ``BuildPlan`` (pure data, checked without a GPU);
``configure`` applies a plan to a TensorRT builder config; ``build_engine`` does the whole job:
pick or quantize the source ONNX, build with an optimization profile, a persistent timing cache and
a progress monitor, and write the plan file with its manifest (``<engine>.json``) beside it.
The same calls work on TensorRT 10.x (Jetson Orin, JetPack 6) and 11.x.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from se_deploy.artifacts import ENGINES_DIR, atomic_output, sha256_file, write_text_atomic
from se_deploy.tensorrt.engine_manifest import (
    Environment,
    cuda_call,
    current_environment,
    make_manifest,
    manifest_path,
    quiet_logger,
    require_cudart,
    require_tensorrt,
)
from se_deploy.errors import SeDeployError
from se_deploy.precision.quantize import DEFAULT_CALIB_METHOD
from se_deploy.export.onnx_metadata import OnnxMetadata
from se_deploy.precision.quantize import (
    PRECISIONS,
    graph_input,
    load_onnx,
    onnx_precision,
    quantize_onnx,
    quantized_from,
    quantized_path,
)

ENGINE_SUFFIXES = (".engine", ".plan")
DEFAULT_MAX_BATCH = 8  # dynamic-batch models: profile 1 / 1 / 8 unless told otherwise
MIN_TENSORRT = 10  # strongly typed networks, IProgressMonitor, name-based I/O

OnPhase = Callable[[str, str | None, int, int], None]  # (phase, parent phase, steps done, steps total)
Size = int | tuple[int, int]  # a square side, or (h, w)


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build needs, decided before TensorRT is touched."""

    onnx: Path
    engine: Path
    precision: str  # the ONNX's: 'fp32', 'fp16' or 'int8'
    input_name: str
    input_shape: tuple  # (N, 3, H, W), None where the ONNX is dynamic
    imgsz: tuple[int, int]  # the size TensorRT tunes for (the profile's opt size)
    profile: BatchProfile | None  # None: static batch
    workspace_bytes: int | None
    dla_core: int | None
    timing_cache: Path
    size_profile: tuple | None = None  # ((h, w) min, opt, max) for an ONNX with a dynamic height and width
    flags: tuple[str, ...] = field(default=())  # BuilderFlags set (besides the strongly typed network)
    cleared_flags: tuple[str, ...] = field(default=())  # BuilderFlags cleared

    @property
    def needs_profile(self) -> bool:
        """An optimization profile is needed when the batch or the size is dynamic."""
        return self.profile is not None or self.input_shape[2] is None

    def shapes(self) -> tuple[tuple, tuple, tuple]:
        """(min, opt, max) input shapes of the optimization profile."""
        channels = self.input_shape[1] or 3
        batches = (self.profile.min, self.profile.opt, self.profile.max) if self.profile else (self.input_shape[0],) * 3
        sizes = self.size_profile or (self.imgsz,) * 3
        return tuple((b, channels, *hw) for b, hw in zip(batches, sizes))

    def rebuild_command(self) -> str:
        """The ``build-trt`` command line that makes this engine again (recorded in the manifest)."""
        args = ["se-deploy", "build-trt", str(self.onnx)]
        if self.profile:
            args += ["--min-batch", str(self.profile.min), "--opt-batch", str(self.profile.opt),
                     "--max-batch", str(self.profile.max)]
        if self.size_profile:
            low, opt, high = (f"{h},{w}" for h, w in self.size_profile)
            args += ["--imgsz", opt, "--min-imgsz", low, "--max-imgsz", high]
        if self.workspace_bytes:
            args += ["--workspace", f"{self.workspace_bytes / 2**30:g}"]
        if self.dla_core is not None:
            args += ["--dla-core", str(self.dla_core)]
        return " ".join(args + ["-o", str(self.engine)])


def onnx_io(path: Path) -> tuple[str, tuple, dict]:
    """(input name, input dims with None where dynamic, metadata props) read from the ONNX file."""
    model = load_onnx(path)
    return (*graph_input(model, path), {p.key: p.value for p in model.metadata_props})


def batch_profile(path: Path, static_batch: int | None, batch: int | None, min_batch: int | None,
                  opt_batch: int | None, max_batch: int | None) -> BatchProfile | None:
    """The optimization profile for the batch axis, or None for a static-batch model."""
    ranged = [v for v in (min_batch, opt_batch, max_batch) if v is not None]
    if batch is not None and ranged:
        raise SeDeployError("--batch and --min/--opt/--max-batch exclude each other")
    if any(v < 1 for v in [*ranged, *([batch] if batch is not None else [])]):
        raise SeDeployError("batch sizes must be at least 1")
    if static_batch is not None:
        wanted = batch if batch is not None else (max(ranged) if ranged else static_batch)
        if wanted != static_batch or (ranged and min(ranged) != static_batch):
            raise SeDeployError(f"{path.name} has a fixed batch of {static_batch}; export it with --dynamic "
                                "to build an engine for other batch sizes")
        return None
    if batch is not None:
        return BatchProfile(batch, batch, batch)
    low = min_batch or 1
    high = max_batch or max(DEFAULT_MAX_BATCH, low, opt_batch or 0)
    opt = opt_batch or low
    if not low <= opt <= high:
        raise SeDeployError(f"batch profile {low}/{opt}/{high}: need --min-batch <= --opt-batch <= --max-batch")
    return BatchProfile(low, opt, high)


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def image_sizes(path: Path, dims: tuple, meta: OnnxMetadata, imgsz: Size | None, min_imgsz: Size | None,
                max_imgsz: Size | None) -> tuple[tuple[int, int], tuple | None]:
    """(the size TensorRT tunes for, (min, opt, max) sizes or None): a fixed-size ONNX has its own size;
    one with a dynamic height and width gets a profile, by default from one stride up to --imgsz."""
    if dims[2] and dims[3]:
        size = (dims[2], dims[3])
        if imgsz is not None and _hw(imgsz) != size:
            raise SeDeployError(f"--imgsz {imgsz}: {path.name} has a fixed {size[0]}x{size[1]} input")
        if min_imgsz is not None or max_imgsz is not None:
            raise SeDeployError(f"--min-imgsz/--max-imgsz: {path.name} has a fixed {size[0]}x{size[1]} input; "
                                "export it with --dynamic-size for a range of sizes")
        return size, None
    opt = _hw(imgsz) if imgsz is not None else meta.imgsz
    if not opt:
        raise SeDeployError(f"{path.name} has a dynamic input size: pass --imgsz")
    stride = meta.stride or 32
    low = _hw(min_imgsz) if min_imgsz is not None else (stride, stride)
    high = _hw(max_imgsz) if max_imgsz is not None else opt
    for label, hw in (("--min-imgsz", low), ("--imgsz", opt), ("--max-imgsz", high)):
        if hw[0] % stride or hw[1] % stride:
            raise SeDeployError(f"{label} {hw[0]},{hw[1]}: sides must be multiples of the stride {stride}")
    if not all(lo <= o <= hi for lo, o, hi in zip(low, opt, high)):
        raise SeDeployError(f"size profile {low} / {opt} / {high}: need --min-imgsz <= --imgsz <= --max-imgsz on each side")
    return tuple(opt), (tuple(low), tuple(opt), tuple(high))


def timing_cache_name(env: Environment) -> str:
    """One cache per GPU model and TensorRT version (TensorRT rejects a cache from another)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.gpu_name).strip("-").lower() or "gpu"
    return f"timing-{gpu}-sm{env.compute_capability.replace('.', '')}-trt{env.tensorrt}.cache"


def plan_build(onnx_path: str | Path, env: Environment, out: str | Path | None = None, *, precision: str,
               batch: int | None = None, min_batch: int | None = None, opt_batch: int | None = None,
               max_batch: int | None = None, imgsz: Size | None = None, min_imgsz: Size | None = None,
               max_imgsz: Size | None = None, workspace_gb: float | None = None, dla_core: int | None = None,
               timing_cache: str | Path | None = None, directory: str | Path = ENGINES_DIR) -> BuildPlan:
    """Check the options against the ONNX and decide the build (no TensorRT needed)."""
    onnx_path = Path(onnx_path)
    engine = Path(out) if out is not None else Path(directory) / f"{onnx_path.stem}.engine"
    if engine.suffix.lower() not in ENGINE_SUFFIXES:
        raise SeDeployError(f"{engine}: the engine file must end in .engine or .plan")
    name, dims, props = onnx_io(onnx_path)
    size, sizes = image_sizes(onnx_path, dims, OnnxMetadata.from_props(props), imgsz, min_imgsz, max_imgsz)
    if workspace_gb is not None and not workspace_gb > 0:
        raise SeDeployError(f"--workspace {workspace_gb}: must be more than 0 GB")
    flags, cleared = [], []
    if dla_core is not None:
        if dla_core < 0:
            raise SeDeployError(f"--dla-core {dla_core}: must be 0 or more")
        if precision == "fp32":
            raise SeDeployError("--dla-core: DLA runs FP16 and INT8 layers only; add --fp16 or --int8")
        flags.append("GPU_FALLBACK")  # layers DLA cannot run go to the GPU instead of failing the build
    if precision == "fp32":
        cleared.append("TF32")  # an FP32 engine should compute FP32 (TF32 rounds convolution inputs to 10 bits)
    return BuildPlan(
        onnx=onnx_path, engine=engine, precision=precision, input_name=name, input_shape=dims, imgsz=size,
        profile=batch_profile(onnx_path, dims[0], batch, min_batch, opt_batch, max_batch), size_profile=sizes,
        workspace_bytes=None if workspace_gb is None else int(workspace_gb * 2**30), dla_core=dla_core,
        timing_cache=Path(timing_cache) if timing_cache is not None else Path(directory) / timing_cache_name(env),
        flags=tuple(flags), cleared_flags=tuple(cleared),
    )


def network_flags(trt) -> int:
    """Strongly typed network (TensorRT 10); TensorRT 11 types every network strongly and ignores the flag."""
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def configure(trt, builder, config, plan: BuildPlan) -> None:
    """Apply ``plan`` to a TensorRT builder config: workspace, profile, DLA, flags."""
    if plan.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.needs_profile:
        profile = builder.create_optimization_profile()
        profile.set_shape(plan.input_name, *plan.shapes())
        config.add_optimization_profile(profile)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    if "GPU_FALLBACK" in plan.flags:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if "TF32" in plan.cleared_flags:
        config.clear_flag(trt.BuilderFlag.TF32)


def _progress_monitor(trt, on_phase: OnPhase):
    """An IProgressMonitor forwarding TensorRT's build phases to ``on_phase`` (called from builder threads)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.parents: dict[str, str | None] = {}
            self.totals: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.parents[phase_name], self.totals[phase_name] = parent_phase, num_steps
            on_phase(phase_name, parent_phase, 0, num_steps)

        def step_complete(self, phase_name, step):
            on_phase(phase_name, self.parents.get(phase_name), step + 1, self.totals.get(phase_name, 0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            total = self.totals.get(phase_name, 0)
            on_phase(phase_name, self.parents.get(phase_name), total, total)

    return Monitor()


def _tensor_info(trt, tensor) -> dict:
    return {"name": tensor.name, "shape": [int(d) for d in tensor.shape], "dtype": trt.nptype(tensor.dtype).__name__}


@dataclass
class BuildResult:
    engine: Path
    manifest: dict
    source: Path  # the ONNX built from
    quantized: object | None  # se_deploy.precision.quantize.QuantizeResult when build-trt quantized first
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.engine)


def run_build(plan: BuildPlan, env: Environment, on_phase: OnPhase | None = None) -> BuildResult:
    """Build ``plan`` with TensorRT; writes the engine, its manifest and the timing cache."""
    trt = require_tensorrt()
    if int(trt.__version__.split(".")[0]) < MIN_TENSORRT:
        raise SeDeployError(f"TensorRT {trt.__version__} is too old: se-deploy builds strongly typed networks "
                            f"(TensorRT {MIN_TENSORRT} or newer)")
    logger = quiet_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)] or logger.errors
        raise SeDeployError(f"{plan.onnx}: TensorRT's ONNX parser refused it ({errors[0] if errors else 'no detail'})")
    if plan.dla_core is not None and plan.dla_core >= builder.num_DLA_cores:
        raise SeDeployError(f"--dla-core {plan.dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
    config = builder.create_builder_config()
    configure(trt, builder, config, plan)

    notes = []
    cached = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    try:
        cache = config.create_timing_cache(cached)
    except (RuntimeError, TypeError, ValueError):  # a damaged cache file
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):  # False: refuse another GPU's cache
        notes.append(f"{plan.timing_cache} does not fit this GPU/TensorRT; started a new timing cache")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    if on_phase is not None:
        monitor = _progress_monitor(trt, on_phase)
        config.progress_monitor = monitor  # kept referenced by ``monitor`` until the build returns

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise SeDeployError(f"TensorRT could not build {plan.engine.name} "
                            f"({logger.errors[-1] if logger.errors else 'no error reported'})")
    with atomic_output(plan.timing_cache) as tmp:
        tmp.write_bytes(memoryview(cache.serialize()))

    meta = OnnxMetadata.from_props(onnx_io(plan.onnx)[2])
    inputs = [_tensor_info(trt, network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [_tensor_info(trt, network.get_output(i)) for i in range(network.num_outputs)]
    nc = outputs[0]["shape"][-1] - 5 if outputs and outputs[0]["shape"][-1] > 5 else 0
    with atomic_output(plan.engine) as tmp:
        tmp.write_bytes(memoryview(serialized))
        manifest = make_manifest(
            env, engine_sha256=sha256_file(tmp), precision=plan.precision, inputs=inputs, outputs=outputs,
            batch_profile=plan.profile.to_dict() if plan.profile else None,
            size_profile=[list(hw) for hw in plan.size_profile] if plan.size_profile else None,
            names=meta.names or {i: f"class{i}" for i in range(nc)}, stride=meta.stride or 32, imgsz=plan.imgsz,
            source_onnx=plan.onnx, source_sha256=sha256_file(plan.onnx),
            build={"strongly_typed": True, "flags": list(plan.flags), "cleared_flags": list(plan.cleared_flags),
                   "workspace_bytes": plan.workspace_bytes, "dla_core": plan.dla_core,
                   "timing_cache": str(plan.timing_cache), "seconds": round(seconds, 2),
                   "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            rebuild=plan.rebuild_command(),
        )
        write_text_atomic(manifest_path(plan.engine), json.dumps(manifest, indent=2) + "\n")
    return BuildResult(engine=plan.engine, manifest=manifest, source=plan.onnx, quantized=None, seconds=seconds,
                       notes=notes)


def newest_fp32_onnx(directory: str | Path = ENGINES_DIR) -> Path:
    """The most recently written FP32 ONNX in ``directory`` (quantized ones are skipped)."""
    directory = Path(directory)
    found = sorted((p for p in directory.glob("*.onnx") if ".partial" not in p.name),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        if onnx_precision(path) == "fp32":
            return path
    raise SeDeployError(f"no MODEL given and {directory}/ holds no FP32 ONNX: run `se-deploy export WEIGHTS.pt` first")


def source_for(model: Path, want: str, *, calib=None, calib_size: int = 512, calib_method: str = DEFAULT_CALIB_METHOD,
               directory: str | Path = ENGINES_DIR, progress=None):
    """(ONNX to build, QuantizeResult or None): ``model`` itself, or its ``want`` version, quantized now
    unless ``engines/<stem>.<want>.onnx`` already is this model quantized."""
    have = onnx_precision(model)
    if want == have:
        return model, None
    if have != "fp32":
        raise SeDeployError(f"{model.name} is already {have}; give its FP32 ONNX to build {want}")
    target = quantized_path(model, want, directory)
    if quantized_from(target, model, want):
        return target, None
    result = quantize_onnx(model, want, calib=calib, calib_size=calib_size, out=target, calib_method=calib_method,
                           progress=progress)
    return result.path, result


def build_engine(model: str | Path | None = None, out: str | Path | None = None, *, precision: str | None = None,
                 calib: str | Path | None = None, calib_size: int = 512, calib_method: str = DEFAULT_CALIB_METHOD,
                 batch: int | None = None, min_batch: int | None = None, opt_batch: int | None = None,
                 max_batch: int | None = None, imgsz: Size | None = None, min_imgsz: Size | None = None,
                 max_imgsz: Size | None = None, workspace_gb: float | None = None, dla_core: int | None = None,
                 timing_cache: str | Path | None = None, device: int = 0,
                 directory: str | Path = ENGINES_DIR, on_phase: OnPhase | None = None,
                 quantize_progress=None) -> BuildResult:
    """``se-deploy build-trt``: an engine for this GPU from ``model`` (default: the newest FP32 ONNX).

    ``precision`` 'fp16'/'int8' builds that version of an FP32 model, quantizing it first if needed
    (INT8 with ``calib``). The model file, then TensorRT, cuda-python, the GPU and the options are
    checked before any slow step.
    """
    model = Path(model) if model is not None else newest_fp32_onnx(directory)
    if model.suffix.lower() != ".onnx":
        raise SeDeployError(f"{model}: build-trt takes an ONNX model (export a checkpoint with `se-deploy export`)")
    load_onnx(model)  # a missing or unreadable file is named before TensorRT or the GPU
    want = (precision or onnx_precision(model)).lower()
    if want not in ("fp32", *PRECISIONS):
        raise SeDeployError(f"precision {want}: expected fp32, fp16 or int8")
    env = current_environment(device)
    cudart = require_cudart()
    cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
    options = dict(batch=batch, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, imgsz=imgsz,
                   min_imgsz=min_imgsz, max_imgsz=max_imgsz, workspace_gb=workspace_gb, dla_core=dla_core,
                   timing_cache=timing_cache, directory=directory)
    plan_build(model, env, out, precision=want, **options)  # bad options fail here, before quantizing
    source, quantized = source_for(model, want, calib=calib, calib_size=calib_size, calib_method=calib_method,
                                   directory=directory, progress=quantize_progress)
    result = run_build(plan_build(source, env, out, precision=want, **options), env, on_phase)
    result.quantized = quantized
    return result
