"""`shnet import` and `shnet export` of a SCAN/3SHNet precomputed set: MB/s and peak memory for a
small and a 4x larger set (streaming check: the peak must not grow with the set).

Writes a set of N images ([N,36,2048] float32 features, [N,133,7,7] float32, [N,64,64] and [N,133]
maps, 5 captions per image) chunk by chunk, runs the CLI in a subprocess and samples its anonymous
resident memory (RssAnon: memory-mapped file pages, which the kernel drops at will, excluded) every
20 ms; checks that the export is byte-identical to the set.

    python benchmarks/npy_sets_streaming.py [--small 200] [--large 800]

Last line: memory_growth=<peak(large) / peak(small)>  (goal <= 1.2)
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"ims": ((36, 2048), np.float32), "segmentations": ((133, 7, 7), np.float32), "seg_maps": ((64, 64), np.uint8), "cat_onehots": ((133,), np.uint8)}


def write_set(folder: Path, n: int, chunk: int = 64) -> int:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (shape, dtype) in SHAPES.items():
        target = np.lib.format.open_memmap(folder / f"test_{name}.npy", mode="w+", dtype=dtype, shape=(n, *shape))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            target[start:stop] = (rng.random((stop - start, *shape)) * 100).astype(dtype)
        target.flush()
        del target
    (folder / "test_caps.txt").write_text("".join(f"a caption {j} of picture {i}\n" for i in range(n) for j in range(5)))
    (folder / "test_ids.txt").write_text("".join(f"{i}\n" for i in range(n)))
    return sum(p.stat().st_size for p in folder.iterdir())


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def run(command: list[str]) -> tuple[float, int]:
    """(seconds, peak RssAnon in bytes) of ``command``."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon(proc.pid))
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode}")
    return time.perf_counter() - start, peak


def measure(root: Path, n: int) -> dict:
    size = write_set(root / f"set{n}", n)
    shnet = [sys.executable, "-m", "shnet"]
    import_s, import_peak = run([*shnet, "import", str(root / f"set{n}"), "-o", str(root / f"cache{n}")])
    export_s, export_peak = run([*shnet, "export", str(root / f"cache{n}"), "--split", "test", "-o", str(root / f"out{n}")])
    exact = all(filecmp.cmp(p, root / f"out{n}" / p.name, shallow=False) for p in (root / f"set{n}").iterdir())
    mb = size / 2**20
    print(
        f"{n} images, {mb:.0f} MB: import {import_s:.1f} s ({mb / import_s:.0f} MB/s, peak anon {import_peak / 2**20:.0f} MB), "
        f"export {export_s:.1f} s ({mb / export_s:.0f} MB/s, peak anon {export_peak / 2**20:.0f} MB), bit-exact {exact}"
    )
    if not exact:
        raise SystemExit("the export differs from the imported set")
    return {"peak": max(import_peak, export_peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = measure(Path(tmp), args.small)
        large = measure(Path(tmp), args.large)
    print(f"memory_growth={large['peak'] / small['peak']:.3f}")


if __name__ == "__main__":
    main()
