"""Test hooks: make a chosen (stage, shard) task fail or wait, so that the tests of retries, killed
runs and lost workers are deterministic instead of racing the clock.

Read from the environment of the process that runs the task (Dask workers inherit the extract's):

``SHNET_FAULT_FAIL=STAGE:SHARD:N``
    the first N attempts of that task raise, as a flaky file system would.
``SHNET_FAULT_HOLD=STAGE:SHARD:PATH``
    before each attempt of that task, write ``PATH.waiting`` (the pid of the process holding it) and
    wait until ``PATH`` exists: a test can kill that process, or the whole run, at a known point.
``SHNET_FAULT_BUILT=DIR``
    after a process builds a stage's model, write ``DIR/STAGE.PID`` (how many times): a test sees when
    and where models are built.

Unset, as in every real run, each costs one environment lookup per attempt.
"""

from __future__ import annotations

import os
import time

from ..fileio import atomic_write_text

FAIL = "SHNET_FAULT_FAIL"
HOLD = "SHNET_FAULT_HOLD"
BUILT = "SHNET_FAULT_BUILT"


class InjectedFault(RuntimeError):
    """The failure that ``SHNET_FAULT_FAIL`` asked for."""


def before_attempt(stage: str, shard: int, attempt: int) -> None:
    failing = _target(FAIL, stage, shard)
    if failing is not None and attempt <= int(failing):
        raise InjectedFault(f"{FAIL}: attempt {attempt} of {stage} shard {shard} fails on purpose")
    release = _target(HOLD, stage, shard)
    if release is not None:
        _hold_until(release)


def _target(variable: str, stage: str, shard: int) -> str | None:
    """The value part of ``variable`` when it names this (stage, shard), else None."""
    value = os.environ.get(variable)
    if not value:
        return None
    name, number, rest = value.split(":", 2)
    return rest if (name, int(number)) == (stage, shard) else None


def _hold_until(release: str) -> None:
    atomic_write_text(f"{release}.waiting", str(os.getpid()))
    while not os.path.exists(release):
        time.sleep(0.02)


def model_built(stage: str) -> None:
    folder = os.environ.get(BUILT)
    if folder:
        path = os.path.join(folder, f"{stage}.{os.getpid()}")
        count = int(open(path).read()) if os.path.exists(path) else 0
        atomic_write_text(path, str(count + 1))
