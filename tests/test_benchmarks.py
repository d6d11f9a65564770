"""The GPU check suite keeps working where there is no GPU: its reduced mode runs every part on the
CPU and prints the table. It runs as ``python benchmarks/gpu_suite.py --reduced`` would, but inside
pytest, whose interpreter has already imported torch and shnet."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_gpu_suite_runs_in_reduced_mode_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SUITE), "--reduced"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the suite puts benchmarks/ first
    runpy.run_path(str(SUITE), run_name="__main__")
    stdout = capsys.readouterr().out
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    measures = [line.split(" | ")[0].lstrip("| ") for line in table[1:]]
    assert "train bigru, HDF5" in measures and "train bigru, in memory" in measures
    assert {"regions fp32, batch 1", "regions fp16 vs fp32", "embeddings bigru, bf16 vs fp32"} <= set(measures)
    assert any(m.startswith("panoptic") for m in measures)
    assert "reduced mode" in table[0] and "suite_seconds=" in stdout
