"""How fast the light commands start: `shnet --help`, `shnet inspect --help`, `shnet verify CACHE` and
`shnet inspect CACHE` against `python -c "import torch"`, each run alternately in fresh processes.

Prints the median wall time of each and a last line ``help_over_import_torch=`` (goal: under 0.25).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shnet = [shutil.which("shnet") or sys.exit("shnet is not on PATH: pip install -c constraints.txt -e .")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([*shnet, "extract", "--sample", "--profile", "smoke", "--stages", "saliency", "-o", "cache", "--workers", "1"],
                       cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        commands = {
            "import torch": [sys.executable, "-c", "import torch"],
            "shnet --help": [*shnet, "--help"],
            "shnet inspect --help": [*shnet, "inspect", "--help"],
            "shnet verify CACHE": [*shnet, "verify", "cache"],
            "shnet inspect CACHE": [*shnet, "inspect", "cache"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(wall(command, folder))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:<22} {seconds * 1000:7.0f} ms (median of {args.repeats})")
    print(f"help_over_import_torch={medians['shnet --help'] / medians['import torch']:.3f}")


if __name__ == "__main__":
    main()
