"""Peak memory (RSS) of `se-deploy infer` on clips of different lengths: it must not grow with the length.

Runs `cli.py infer CLIP --model MODEL` once per clip in a child process, samples the child's RSS from
/proc while it runs, and prints the peak (from wait4's ru_maxrss) and the RSS at each quarter of the run.

    python tests/fixtures/make_synth_data.py video --out /tmp/long.mp4 --frames 3000
    python benchmarks/infer_memory.py se_deploy/assets/synth_shapes_60f.mp4 /tmp/long.mp4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(clip: str, model: str, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(REPO / "cli.py"), "infer", clip, "--model", model, "--out-dir", out, *extra]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = rss_mib(proc.pid)
            if rss is not None:
                samples.append(rss)
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        frames = sum(1 for _ in open(Path(out) / "detections.jsonl"))
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"infer failed on {clip}: {proc.stderr.read().decode()[-500:]}")
    quarters = [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in (1, 2, 3, 4)] if samples else []
    print(f"{Path(clip).name}: {frames} frames in {seconds:.1f} s; peak RSS {usage.ru_maxrss / 1024:.1f} MiB; "
          f"RSS at 25/50/75/100% of the run: {', '.join(f'{v:.1f}' for v in quarters)} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="+")
    parser.add_argument("--model", default=str(FIXTURES / "onnx" / "upstream-export-320.onnx"))
    parser.add_argument("--no-video", action="store_true", help="pass --no-video to infer")
    args = parser.parse_args()
    for clip in args.clips:
        measure(clip, args.model, ["--no-video"] if args.no_video else [])


if __name__ == "__main__":
    main()
