"""`se-deploy bench`: latency percentiles and throughput per backend (checked for consistency, not speed)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CHECKPOINT, FIXTURES, run_cli

from se_deploy.inference.bench import benchmark
from se_deploy.errors import SeDeployError
from se_deploy.model_select import newest_of_each_kind, select_model
from se_deploy.runners import load_runner

UPSTREAM_ONNX = FIXTURES / "onnx" / "upstream-export-320.onnx"
KEYS = {"model", "backend", "precision", "device", "batch", "imgsz", "iters", "warmup", "p50_ms", "p90_ms",
        "p99_ms", "mean_ms", "throughput"}


def test_benchmark_reports_ordered_percentiles_and_matching_throughput(fixtures):
    with load_runner(UPSTREAM_ONNX) as runner:
        result = benchmark(runner, batch=2, iters=6, warmup=1)
    assert set(result) == KEYS
    assert (result["backend"], result["batch"], result["imgsz"], result["iters"]) == ("onnxruntime", 2, [320, 320], 6)
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    # throughput is images per second over the timed iterations: batch / mean latency
    assert result["throughput"] == pytest.approx(2 * 1000 / result["mean_ms"], rel=0.01)


def test_benchmark_refuses_a_size_the_model_was_not_built_for(fixtures):
    with load_runner(UPSTREAM_ONNX) as runner, pytest.raises(SeDeployError, match="320x320"):
        benchmark(runner, imgsz=(640, 640), iters=1)


def test_cli_bench_json_one_model_is_an_object(fixtures):
    proc = run_cli("bench", "--model", UPSTREAM_ONNX, "--iters", "3", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"p50_ms", "p90_ms", "p99_ms", "throughput"} <= set(result) and result["throughput"] > 0


def test_cli_bench_without_model_times_each_backend_in_engines(fixtures, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    shutil.copy(UPSTREAM_ONNX, engines / "a.onnx")
    shutil.copy(CHECKPOINT, engines / "a.pt")
    proc = run_cli("bench", "--iters", "2", "--warmup", "1", "--imgsz", "320", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["backend"] for r in results] == ["onnxruntime", "pytorch"]
    assert all(r["imgsz"] == [320, 320] for r in results)
    table = run_cli("bench", "--iters", "2", "--warmup", "0", "--model", engines / "a.onnx", cwd=tmp_path)
    assert table.returncode == 0 and "p99 ms" in table.stdout and "a.onnx" in table.stdout


def test_cli_bench_errors(fixtures, tmp_path):
    empty = run_cli("bench", cwd=tmp_path)
    assert empty.returncode == 2 and empty.stderr.startswith("error: no --model given")
    bad = run_cli("bench", "--model", UPSTREAM_ONNX, "--iters", "0")
    assert bad.returncode == 2 and "--iters" in bad.stderr


def test_model_selection_prefers_engine_then_onnx_then_checkpoint(tmp_path):
    import os

    def touch(name, age):
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (1e9 - age, 1e9 - age))
        return path

    touch("old.pt", 0)
    assert select_model(tmp_path, trt_usable=True).path.name == "old.pt"
    touch("a.onnx", 30)
    newer = touch("b.onnx", 20)
    touch(".b.x1.partial.onnx", 0)  # a half-written export is never picked
    assert select_model(tmp_path, trt_usable=True).path == newer
    engine = touch("model.engine", 50)
    assert select_model(tmp_path, trt_usable=True).path == engine
    choice = select_model(tmp_path, trt_usable=False)
    assert choice.path == newer and "model.engine skipped" in choice.reason
    assert [p.name for p in newest_of_each_kind(tmp_path, trt_usable=False)] == ["b.onnx", "old.pt"]
    with pytest.raises(SeDeployError, match="no --model given"):
        select_model(tmp_path / "nothing")
