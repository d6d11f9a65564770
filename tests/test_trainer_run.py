"""A run directory's layout (shnet.trainer.run): which checkpoint stands for a run, its metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shnet.errors import ShnetError
from shnet.fileio import UnreadableFileError
from shnet.trainer.run import RunDir, resolve_checkpoint


def test_a_run_means_its_best_checkpoint_else_its_last(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    with pytest.raises(ShnetError, match=r"holds no checkpoint \(best.pth or last.pth\); is it a `shnet train` run directory"):
        resolve_checkpoint(run.root)
    assert not run.has_run()
    run.last.write_bytes(b"last")
    assert run.has_run() and resolve_checkpoint(run.root) == run.last
    run.best.write_bytes(b"best")
    assert resolve_checkpoint(run.root) == run.best
    assert resolve_checkpoint(run.last) == run.last
    with pytest.raises(ShnetError, match="no run directory or checkpoint at"):
        resolve_checkpoint(tmp_path / "absent")


def test_metrics_written_whole_and_read_back(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    records = [{"epoch": 0, "val": {"rsum": 1.5}}, {"epoch": 1, "val": {"rsum": 2.5}}]
    run.write_metrics(records)
    assert run.read_metrics() == records
    assert run.metrics.read_text().splitlines() == [json.dumps(r) for r in records]
    run.write_metrics(records[:1])
    assert run.read_metrics() == records[:1] and not list(tmp_path.glob("*.tmp-*"))


def test_a_damaged_metrics_file_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text('{"epoch": 0}\n{"epoch": 1, "va')
    with pytest.raises(UnreadableFileError, match=rf"cannot read the run's metrics {run.metrics}: .*shnet train --resume"):
        run.read_metrics()


def test_the_layout_is_torch_free():
    code = "import sys, shnet.trainer.run; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
