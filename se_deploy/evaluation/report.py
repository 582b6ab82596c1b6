"""``report``: what each precision costs in accuracy and buys in speed, on the user's own labelled images.

For one checkpoint it makes what is missing (ONNX FP32 export, FP16 and INT8 ONNX, TensorRT engines
where TensorRT is usable), then measures every artifact the same way: mAP on the val split (square
input of the export size for all rows, PyTorch included, so deltas are due to precision alone),
latency and throughput (``bench``), and parity with the checkpoint. Artifacts are reused when their
recorded source checkpoint and input size match. Output: rows as dicts, ``report.json``,
``report.md`` and ``report.png`` (mAP@0.5:0.95 against p50 latency).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from se_deploy.artifacts import ENGINES_DIR, atomic_output, sha256_file, write_text_atomic
from se_deploy.evaluation.dataset import Dataset, load_dataset
from se_deploy.errors import SeDeployError

PRECISIONS = ("fp32", "fp16", "int8")
Say = Callable[[str], None]


def parse_precisions(text: str | list[str]) -> list[str]:
    """'fp32,fp16,int8' -> ['fp32', 'fp16', 'int8'] (validated, order kept, duplicates dropped)."""
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise SeDeployError(f"--precisions {text}: expected a comma-separated subset of {','.join(PRECISIONS)}")
    return list(dict.fromkeys(items))


def artifact_path(workdir: Path, weights: Path, imgsz: int, batch: int) -> Path:
    """The FP32 ONNX: engines/<stem>-<imgsz>[-b<batch>].onnx; quantized ones follow ``quantize``'s naming."""
    return workdir / f"{weights.stem}-{imgsz}{f'-b{batch}' if batch > 1 else ''}.onnx"


def onnx_is_current(path: Path, source_sha256: str, imgsz: int, batch: int) -> bool:
    """Whether an existing ONNX file was exported from this checkpoint at this input size and batch."""
    from se_deploy.export.onnx_metadata import read_metadata

    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except SeDeployError:
        return False
    return meta.source_sha256 == source_sha256 and meta.imgsz == (imgsz, imgsz) and (meta.batch or 1) == batch


def engine_is_current(engine: Path, onnx_path: Path) -> bool:
    """Whether ``engine``'s manifest says it was built from this very ONNX file."""
    from se_deploy.tensorrt.engine_manifest import read_manifest

    try:
        manifest = engine.is_file() and read_manifest(engine)
    except SeDeployError:
        return False
    return bool(manifest) and manifest["source_onnx"]["sha256"] == sha256_file(onnx_path)


def make_artifacts(weights: Path, precisions: list[str], imgsz: int, batch: int, workdir: Path, calib,
                   calib_size: int, trt: bool, say: Say) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """(backend, precision, path) of every artifact to measure, making the missing ones; plus the reasons
    quantized models were rejected by their check (those get no row)."""
    from se_deploy.export.onnx_export import export_onnx
    from se_deploy.precision.quantize import QuantizeCheckFailed, quantize_onnx, quantized_from, quantized_path

    rejected: list[str] = []
    fp32 = artifact_path(workdir, weights, imgsz, batch)
    if not onnx_is_current(fp32, sha256_file(weights), imgsz, batch):
        say(f"exporting {fp32}")
        export_onnx(weights, fp32, imgsz=imgsz, batch=batch, check=False)
    onnx_models = {"fp32": fp32}
    for precision in [p for p in precisions if p != "fp32"]:
        path = quantized_path(fp32, precision, workdir)
        if not quantized_from(path, fp32, precision):
            say(f"quantizing {path}")
            try:
                quantize_onnx(fp32, precision, calib=calib, calib_size=calib_size, out=path)
            except QuantizeCheckFailed as e:  # nothing written: say why and leave the row out
                rejected.append(str(e))
                continue
        onnx_models[precision] = path
    artifacts = [("onnxruntime", p, onnx_models[p]) for p in precisions if p in onnx_models]
    if trt:
        for precision in [p for p in precisions if p in onnx_models]:
            engine = onnx_models[precision].with_suffix(".engine")
            if not engine_is_current(engine, onnx_models[precision]):
                say(f"building {engine}")
                build_engine(onnx_models[precision], engine)
            artifacts.append(("tensorrt", precision, engine))
    return artifacts, rejected


def build_engine(onnx_path: Path, engine: Path) -> None:
    from se_deploy.tensorrt.builder import build_engine as build

    build(onnx_path, engine, directory=engine.parent)


def measure(model, dataset: Dataset, weights: Path, imgsz: int, batch: int, iters: int, device: str | None,
            reference: bool = False) -> dict:
    """mAP, latency/throughput and parity of one model file (or the checkpoint when ``reference``)."""
    from se_deploy.inference.bench import benchmark
    from se_deploy.evaluation.evaluate import evaluate
    from se_deploy.evaluation.parity import run_parity_check
    from se_deploy.runners import load_runner

    torch_device = "cpu" if device == "cpu" else None  # PyTorch on its best device; parity runs it on CPU anyway
    with load_runner(model, device=torch_device if reference else device) as runner:
        scores = evaluate(runner, dataset, imgsz=imgsz if runner.imgsz is None else None, batch=batch, rect=False)
        speed = benchmark(runner, batch=batch, iters=iters, warmup=max(1, iters // 10), imgsz=(imgsz, imgsz))
        backend, precision, used = runner.backend, runner.precision, runner.device
    if reference:
        parity = {"verdict": "reference", "detail": "the checkpoint itself"}
    else:
        check = run_parity_check(model, weights, device=device)
        detail = "; ".join(check.failures) or f"detections agree {check.detection_agreement:.1%}"
        parity = {"verdict": "pass" if check.passed else "FAIL", "detail": detail}
    return {
        "backend": backend, "precision": precision, "device": used, "model": str(model),
        "size_mb": round(Path(model).stat().st_size / 2**20, 2),
        "map50": scores["map50"], "map50_95": scores["map50_95"], "per_class": scores["per_class"],
        "p50_ms": speed["p50_ms"], "p99_ms": speed["p99_ms"], "throughput": speed["throughput"],
        "batch": batch, "parity": parity["verdict"], "parity_detail": parity["detail"],
    }


def build_report(weights: str | Path, data: str | Path, precisions: list[str] | str = PRECISIONS, calib=None,
                 calib_size: int = 512, imgsz: int = 640, batch: int = 1, workdir: str | Path = ENGINES_DIR,
                 max_map_drop: float | None = None, iters: int = 100, device: str | None = None,
                 trt: bool | None = None, skip_bad_labels: bool = False, say: Say | None = None,
                 progress=None) -> dict:
    """Make the missing artifacts, measure every one of them, and return the report as a dict."""
    from se_deploy.model_select import tensorrt_usable

    say = say or (lambda message: None)
    weights, workdir = Path(weights), Path(workdir)
    if weights.suffix.lower() != ".pt" or not weights.is_file():
        raise SeDeployError(f"{weights}: expected an existing YOLOv5 checkpoint (.pt)")
    precisions = parse_precisions(precisions)
    if max_map_drop is not None and "int8" not in precisions:
        raise SeDeployError("--max-map-drop applies to INT8: add int8 to --precisions")
    if "int8" in precisions and calib is None:
        raise SeDeployError("INT8 needs calibration images: pass --calib DIR (a few hundred of your training images), "
                            "or leave int8 out of --precisions")
    if imgsz % 32:
        raise SeDeployError(f"--imgsz {imgsz}: must be a multiple of 32")
    dataset = load_dataset(data, "val", skip_bad=skip_bad_labels)
    notes = [f"{len(dataset.missing_labels)} val images have no label file and count as background"] \
        if dataset.missing_labels else []
    notes += [f"left out for a bad label: {problem}" for problem in dataset.problems]
    usable = tensorrt_usable()
    if trt is None:
        trt = usable
        if not usable:
            notes.append("TensorRT is not usable here (no tensorrt package or no CUDA driver): no engines built")
    elif trt and not usable:
        raise SeDeployError("--trt: TensorRT is not usable here (no tensorrt package or no CUDA driver)")

    artifacts, rejected = make_artifacts(weights, precisions, imgsz, batch, workdir, calib, calib_size, trt, say)
    notes += rejected
    say(f"measuring {weights.name} (PyTorch)")
    rows = [measure(weights, dataset, weights, imgsz, batch, iters, device, reference=True)]
    for backend, precision, path in artifacts:
        say(f"measuring {path.name}")
        rows.append(measure(path, dataset, weights, imgsz, batch, iters, device))

    budget = None
    int8_row = next((r for r in rows if r["backend"] == "onnxruntime" and r["precision"] == "int8"), None)
    if max_map_drop is not None and int8_row is not None:
        budget = _fit_budget(rows, weights, dataset, imgsz, batch, workdir, calib, calib_size, max_map_drop,
                             progress, say)
        notes.append(budget.summary())
        if budget.kept_blocks:  # the mixed model gets its own rows, after the all-INT8 ones
            mixed = [("onnxruntime", budget.model)]
            if trt:
                engine = budget.model.with_suffix(".engine")
                if not engine_is_current(engine, budget.model):
                    say(f"building {engine}")
                    build_engine(budget.model, engine)
                mixed.append(("tensorrt", engine))
            for backend, path in mixed:
                say(f"measuring {path.name}")
                row = measure(path, dataset, weights, imgsz, batch, iters, device)
                row.update(precision="int8-mixed", kept_float=budget.kept_blocks)
                last = max(i for i, r in enumerate(rows) if r["backend"] == backend)
                rows.insert(last + 1, row)

    reference = rows[0]
    for row in rows:
        row["delta_map50"] = round((row["map50"] - reference["map50"]) * 100, 2) + 0.0  # + 0.0: no "-0.00"
        row["delta_map50_95"] = round((row["map50_95"] - reference["map50_95"]) * 100, 2) + 0.0
    return {
        "weights": str(weights), "data": str(dataset.yaml_path), "images": len(dataset.images),
        "instances": dataset.instances, "imgsz": imgsz, "batch": batch, "iters": iters,
        "calib": None if calib is None else str(calib), "rows": rows, "rejected": rejected, "notes": notes,
        "budget": None if budget is None else budget.to_dict(),
    }


def _fit_budget(rows, weights, dataset, imgsz, batch, workdir, calib, calib_size, max_drop, progress, say):
    from se_deploy.precision.precision_budget import fit_map_budget, requantizer

    fp32_row = next((r for r in rows if r["backend"] == "onnxruntime" and r["precision"] == "fp32"), None)
    int8_row = next(r for r in rows if r["backend"] == "onnxruntime" and r["precision"] == "int8")
    fp32 = artifact_path(workdir, weights, imgsz, batch)
    say(f"checking INT8 against --max-map-drop {max_drop}")
    out = fp32.with_name(f"{fp32.stem}.int8-mixed.onnx")
    return fit_map_budget(fp32, Path(int8_row["model"]), dataset, max_drop, requantizer(fp32, calib, calib_size), out,
                          progress=progress, fp32_map=fp32_row and fp32_row["map50_95"],
                          int8_map=int8_row["map50_95"], batch=batch)


COLUMNS = [("backend", "backend"), ("precision", "precision"), ("size MB", "size_mb"), ("mAP@0.5", "map50"),
           ("mAP@0.5:0.95", "map50_95"), ("Δ mAP@0.5:0.95 (pts)", "delta_map50_95"), ("p50 ms", "p50_ms"),
           ("p99 ms", "p99_ms"), ("img/s", "throughput"), ("parity", "parity")]


def cells(row: dict) -> list[str]:
    """The table cells of one row, formatted."""
    formats = {"map50": "{:.4f}", "map50_95": "{:.4f}", "delta_map50_95": "{:+.2f}", "size_mb": "{:.2f}",
               "p50_ms": "{:.2f}", "p99_ms": "{:.2f}", "throughput": "{:.1f}"}
    return [formats.get(key, "{}").format(row[key]) for _, key in COLUMNS]


def markdown(report: dict) -> str:
    """report.md: settings, the table, notes and per-class mAP."""
    lines = [f"# se-deploy report: {Path(report['weights']).name}", "",
             f"Data: `{report['data']}` ({report['images']} images, {report['instances']} objects), input "
             f"{report['imgsz']}x{report['imgsz']}, batch {report['batch']}, latency over {report['iters']} runs. "
             "Δ is against PyTorch FP32 at the same input size.", "",
             "| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in report["rows"]]
    lines += ["", *[f"- {note}" for note in report["notes"]]]
    names = [c["name"] for c in report["rows"][0]["per_class"]]
    lines += ["", "## mAP@0.5:0.95 per class", "", "| model | " + " | ".join(names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for row in report["rows"]:
        values = ["-" if c["map50_95"] is None else f"{c['map50_95']:.4f}" for c in row["per_class"]]
        lines.append(f"| {row['backend']} {row['precision']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """mAP@0.5:0.95 against p50 latency, one labelled point per artifact (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = {"pytorch": "s", "onnxruntime": "o", "tensorrt": "^"}
    for i, row in enumerate(report["rows"]):
        ax.scatter(row["p50_ms"], row["map50_95"], marker=markers.get(row["backend"], "o"), s=60)
        ax.annotate(f"{row['backend']} {row['precision']}", (row["p50_ms"], row["map50_95"]),
                    textcoords="offset points", xytext=(6, 5 if i % 2 else -11), fontsize=8)  # alternate: ties stay legible
    ax.margins(x=0.2)
    maps = [row["map50_95"] for row in report["rows"]]
    ax.set_ylim(min(maps) - 0.01, max(maps) + 0.01)  # at least 2 points of range: no offset notation for ties
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel(f"p50 latency, ms per batch of {report['batch']}")
    ax.set_ylabel("mAP@0.5:0.95")
    ax.set_title(f"{Path(report['weights']).name}: accuracy vs latency ({report['imgsz']} px)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "report.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    write_text_atomic(paths["md"], markdown(report))
    plot(report, paths["png"])
    return paths
