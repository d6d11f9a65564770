"""The goals of `shnet demo` with its defaults: total wall time (target: under 5 minutes on 2 CPU
cores) and the hybrid's text-to-image R@1 on the test split as a multiple of chance (target: 5x).

Runs the demo exactly as a user does (`shnet demo -o DIR`, a fresh DIR) and prints the per-step
seconds, the CPU seconds of this process tree (a fair figure on a shared machine), the metric
table, and a last line ``t2i_r1_over_chance=``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help="--images for shnet demo (default: the demo's default)")
    parser.add_argument("--epochs", type=int, help="--epochs for shnet demo (default: the demo's default)")
    parser.add_argument("--keep", type=Path, help="Run in this directory and keep it (default: a temporary one).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        output = args.keep or Path(tmp) / "demo"
        command = [sys.executable, "-m", "shnet", "demo", "-o", str(output), "--no-progress"]
        command += ["--images", str(args.images)] if args.images else []
        command += ["--epochs", str(args.epochs)] if args.epochs else []
        print("$ " + " ".join(command[2:]).replace("-m shnet", "shnet"), flush=True)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        metrics = json.loads((output / "metrics.json").read_text())

    n_test = metrics["n_test_images"]
    chance = 100.0 / n_test
    print(f"steps: {', '.join(f'{k} {v:.0f}s' for k, v in metrics['seconds'].items())}")
    print(f"wall {wall:.0f}s, CPU {cpu:.0f}s (process tree; CPU / 2 is the wall time on 2 idle cores for the parallel parts)")
    for model in ("region", "grid", "hybrid"):
        full = metrics[model]["full"]
        print(f"{model:<7} t2i R@1 {full['t2i']['r1']:5.1f}  R@5 {full['t2i']['r5']:5.1f}  i2t R@1 {full['i2t']['r1']:5.1f}  rSum {full['rsum']:6.1f}")
    r1 = metrics["hybrid"]["full"]["t2i"]["r1"]
    print(f"{n_test} test images: chance t2i R@1 {chance:.2f}%")
    print(f"demo_wall_seconds={wall:.0f}")
    print(f"t2i_r1_over_chance={r1 / chance:.2f}")


if __name__ == "__main__":
    main()
