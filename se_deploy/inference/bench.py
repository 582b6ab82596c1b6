"""Backend latency and throughput: timed inference on a fixed random batch, after warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from se_deploy.errors import SeDeployError
from se_deploy.runners.base import Runner

DEFAULT_IMGSZ = 640  # for models that accept any input size


def benchmark(runner: Runner, batch: int = 1, iters: int = 100, warmup: int = 10,
              imgsz: tuple[int, int] | None = None, on_iter: Callable[[int], None] | None = None) -> dict:
    """Latency percentiles (ms per batch) and throughput (images/s) of ``runner.infer`` (activated).

    The input is a seeded uniform-random batch at the model's own size (or ``imgsz``); inference time
    of these detectors does not depend on the pixel values.
    """
    for name, value, low in (("--batch", batch, 1), ("--iters", iters, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise SeDeployError(f"{name} {value}: must be at least {low}")
    if runner.imgsz:
        if imgsz and tuple(imgsz) != runner.imgsz:
            raise SeDeployError(f"{runner.path.name} is built for {runner.imgsz[0]}x{runner.imgsz[1]} input, not "
                                f"{imgsz[0]}x{imgsz[1]}")
        hw = runner.imgsz
    else:
        hw = tuple(-(-side // runner.stride) * runner.stride for side in (imgsz or (DEFAULT_IMGSZ, DEFAULT_IMGSZ)))
    x = np.random.default_rng(0).random((batch, 3, *hw), dtype=np.float32)
    for _ in range(warmup):
        runner.infer(x)
    latencies = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        runner.infer(x)
        latencies[i] = time.perf_counter() - start
        if on_iter:
            on_iter(i + 1)
    p50, p90, p99 = np.percentile(latencies * 1000, [50, 90, 99])
    return {
        "model": str(runner.path),
        "backend": runner.backend,
        "precision": runner.precision,
        "device": runner.device,
        "batch": batch,
        "imgsz": list(hw),
        "iters": iters,
        "warmup": warmup,
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "mean_ms": round(float(latencies.mean() * 1000), 3),
        "throughput": round(batch * iters / float(latencies.sum()), 2),
    }
