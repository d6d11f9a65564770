"""Check what README's first command left in DEMO_DIR: report.html and metrics.json exist, and every
model's metrics beat a random ranking (rSum above chance, the hybrid's text-to-image R@1 at least
3x chance). Prints the table it checked; exits 1 with the reason otherwise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = ("region", "grid", "hybrid")


def main(folder: Path) -> None:
    for name in ("report.html", "metrics.json"):
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            sys.exit(f"README's first command left no {folder / name}")
    metrics = json.loads((folder / "metrics.json").read_text())
    chance = metrics["chance"]
    print(f"{'model':<8}{'t2i R@1':>9}{'rSum':>9}   chance: t2i R@1 {chance['t2i']['r1']:.1f}, rSum {chance['rsum']:.1f}")
    failures = []
    for model in MODELS:
        full = metrics[model]["full"]
        print(f"{model:<8}{full['t2i']['r1']:>9.1f}{full['rsum']:>9.1f}")
        if full["rsum"] <= chance["rsum"]:
            failures.append(f"{model} rSum {full['rsum']:.1f} is not above chance {chance['rsum']:.1f}")
    hybrid_r1 = metrics["hybrid"]["full"]["t2i"]["r1"]
    if hybrid_r1 < 3 * chance["t2i"]["r1"]:
        failures.append(f"hybrid t2i R@1 {hybrid_r1:.1f} is under 3x chance ({chance['t2i']['r1']:.1f})")
    if failures:
        sys.exit("demo metrics do not beat chance: " + "; ".join(failures))
    print(f"demo beats chance: hybrid t2i R@1 = {hybrid_r1 / chance['t2i']['r1']:.1f}x chance")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
