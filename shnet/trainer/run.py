"""A training run directory: the names of its files, which checkpoint stands for the run, its
metrics. Torch-free, so that whatever looks at a run (evaluate, encode, show, the demo) agrees on
one layout::

    RUN/options.json    the recipe and the model config (written when training starts)
    RUN/last.pth        the checkpoint of the last finished epoch (what --resume continues)
    RUN/best.pth        the checkpoint of the best validation rSum (what the run stands for)
    RUN/metrics.jsonl   one JSON line per finished epoch
    RUN/curves.png      training loss and validation recalls per epoch
    RUN/tensorboard/    TensorBoard events, when TensorBoard is installed
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ShnetError
from ..fileio import atomic_write_text, reading

LAST, BEST, METRICS, OPTIONS, CURVES, TENSORBOARD = "last.pth", "best.pth", "metrics.jsonl", "options.json", "curves.png", "tensorboard"
CHECKPOINT_PREFERENCE = (BEST, LAST)


class RunDir:
    """The files of one run directory (nothing is read or created by constructing it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.last = self.root / LAST
        self.best = self.root / BEST
        self.metrics = self.root / METRICS
        self.options = self.root / OPTIONS
        self.curves = self.root / CURVES
        self.tensorboard = self.root / TENSORBOARD

    def has_run(self) -> bool:
        """Whether a run has finished at least one epoch here (there is something to resume)."""
        return self.last.exists()

    def checkpoint(self) -> Path:
        """The checkpoint that stands for the run: its best, else its last."""
        for name in CHECKPOINT_PREFERENCE:
            if (self.root / name).exists():
                return self.root / name
        raise ShnetError(f"{self.root} holds no checkpoint ({' or '.join(CHECKPOINT_PREFERENCE)}); is it a `shnet train` run directory?")

    def read_metrics(self) -> list[dict]:
        """Every epoch's record from ``metrics.jsonl`` (none before the first epoch)."""
        if not self.metrics.exists():
            return []
        with reading(self.metrics, "the run's metrics", f"delete it and resume the run with `shnet train --resume -o {self.root}`"):
            return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_metrics(self, records: list[dict]) -> None:
        """``metrics.jsonl`` holding exactly ``records`` (replaced whole, never half written)."""
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint (else its last); a file is taken as it is."""
    path = Path(path).expanduser()
    if path.is_dir():
        return RunDir(path).checkpoint()
    if not path.exists():
        raise ShnetError(f"no run directory or checkpoint at {path}")
    return path
