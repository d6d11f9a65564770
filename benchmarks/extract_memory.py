"""Peak resident memory of `shnet extract` over 200 and over 2,000 images (streaming check).

Runs the CLI in a subprocess and samples the resident set size of it and all its descendants (the
LocalCluster workers) every 50 ms; reports each run's peak and their ratio.

    python benchmarks/extract_memory.py [--small 200] [--large 2000] [--workers 2]

Last line: memory_growth=<peak(large) / peak(small)>  (goal <= 1.2)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))

from _images import write_image_set  # noqa: E402


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Run ``command``; return (peak summed RSS of its process tree in bytes, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"extract failed with exit code {proc.returncode}: {' '.join(command)}")
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=100)
    args = parser.parse_args()
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (args.small, args.large):
            folder = write_image_set(Path(tmp) / f"images{count}", count, size=(120, 160))
            command = [
                sys.executable, "-m", "shnet", "extract", str(folder), "-o", str(Path(tmp) / f"cache{count}"),
                "--profile", "smoke", "--set", "grid.input_size=64", "--workers", str(args.workers),
                "--shard-size", str(args.shard_size), "--batch-size", "16",
            ]
            peak, seconds = peak_rss_of(command)
            peaks[count] = peak
            print(f"images={count} peak_rss_mb={peak / 2**20:.1f} seconds={seconds:.1f}")
    print(f"memory_growth={peaks[args.large] / peaks[args.small]:.3f}")


if __name__ == "__main__":
    main()
