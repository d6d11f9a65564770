"""`shnet train` under torchrun on CPU (gloo): two processes with half the batch each compute what one
process computes with the whole batch (gradients, BatchNorm statistics, losses, parameters), resume
after a kill with any number of processes, and refuse a batch the processes cannot share.

Each torchrun launch costs three interpreters importing torch, so the single-process references run
inside pytest (one torch thread, as ``OMP_NUM_THREADS=1`` gives the ranks) and one two-process run,
killed midway and resumed on two processes, is both the "two processes train what one trains" and
the "resume after a kill" evidence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shnet.trainer.cli import train_command
from shnet.trainer.synthetic import write_concept_cache

HERE = Path(__file__).resolve().parent
EPOCHS = 4
TRAIN_ARGS = [
    "--embed-size", "32", "--word-dim", "32", "--batch-size", "20", "--lr", "1e-3", "--workers", "0",
    "--no-progress", "--device", "cpu", "--val-images", "4",
]  # 4 training images = 20 captions = one step per epoch, so each epoch's loss is one step's


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]


def shnet_train(*args: str) -> list[str]:
    return ["-m", "shnet", "train", *args]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    captions = write_concept_cache(root / "cache", {"train": 4, "val": 4}, feature_dim=16, num_boxes=6)
    captions.to_csv(root / "captions.csv", index=False)
    return root


def train_args(output: str, epochs: int = EPOCHS) -> list[str]:
    return ["--cache", "cache", "--captions", "captions.csv", "-o", output, "--epochs", str(epochs), *TRAIN_ARGS]


def train_here(data: Path, *args: str) -> None:
    """``shnet train ARGS`` in this process, in ``data`` as the torchrun launches run (relative paths)."""
    cwd = Path.cwd()
    os.chdir(data)
    try:
        result = CliRunner().invoke(train_command, list(args), catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def one_process(data, single_torch_thread) -> Path:
    train_here(data, *train_args("one"))
    return data / "one"


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The final (parameters, BatchNorm running statistics) of a run, in float64."""
    saved = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=False)["state_dict"]
    floats = {k: v.double() for k, v in saved.items() if v.is_floating_point()}
    running = {k: v for k, v in floats.items() if ".running_" in k}
    return {k: v for k, v in floats.items() if k not in running}, running


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm().clamp(min=1e-12)).item()


def assert_same_run(a: Path, b: Path) -> float:
    """Same loss at every step and the same final parameters and running statistics, to float
    tolerance; returns the largest parameter difference. Parameters are compared as one vector: a
    bias whose true gradient is zero (one that feeds a BatchNorm) moves by rounding noise, which
    Adam scales up to a full step."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == EPOCHS
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * abs(x), (la, lb)
    (pa, ra), (pb, rb) = state(a), state(b)
    assert pa.keys() == pb.keys() and ra.keys() == rb.keys() and len(ra) >= 8
    vector_a, vector_b = (torch.cat([p[k].flatten() for k in pa]) for p in (pa, pb))
    assert relative(vector_a, vector_b) <= 1e-4, relative(vector_a, vector_b)
    for name in ra:  # a running mean follows the noise of the bias that feeds its BatchNorm
        assert relative(ra[name], rb[name]) <= 1e-2, (name, relative(ra[name], rb[name]))
    return (vector_a - vector_b).abs().max().item()


def test_one_step_on_two_processes_has_the_gradients_of_one_process(data, single_torch_thread):
    import distributed_step

    distributed_step.main(str(data / "cache"), str(data / "captions.csv"), str(data / "one.pt"), 20)
    args = [str(HERE / "distributed_step.py"), "cache", "captions.csv"]
    pair = run(torchrun(*args, "two.pt", "20"), data)
    assert pair.returncode == 0, pair.stderr
    one, two = (torch.load(data / name, weights_only=False) for name in ("one.pt", "two.pt"))
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * one["loss"] and one["loss"] > 0
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    scale = max(g.norm().item() for g in one["grads"].values())
    worst = 0.0
    for name, grad in one["grads"].items():
        # relative to the gradient's size; a gradient that is zero in exact arithmetic (a bias that
        # feeds a BatchNorm) is rounding noise on both sides and is compared with the largest one
        difference = (two["grads"][name] - grad).norm().item() / max(grad.norm().item(), 1e-3 * scale)
        assert difference <= 1e-3, (name, difference)
        worst = max(worst, difference)
    print(f"largest relative gradient difference, 2 processes vs 1: {worst:.3g}")
    assert one["running"].keys() == two["running"].keys() and len(one["running"]) >= 8
    for name, stats in one["running"].items():
        torch.testing.assert_close(two["running"][name], stats, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def killed(data) -> tuple[Path, int]:
    """A two-process run killed (SIGKILL to the whole job) once it has checkpointed two of its
    epochs, and a copy of it; returns the run and how many epochs it had logged."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = data / "killed"
    process = subprocess.Popen(
        torchrun(*shnet_train(*train_args("killed"))), cwd=data, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 and (run_dir / "last.pth").exists():
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    shutil.copytree(run_dir, data / "killed-alone")
    return run_dir, done


@pytest.fixture(scope="module")
def resumed_on_two(data, killed) -> subprocess.CompletedProcess:
    """The resumed run, each rank checking that ``shnet train`` leaves no gloo thread behind."""
    return run(torchrun(str(HERE / "shnet_in_a_rank.py"), "train", "-o", "killed", "--resume"), data)


def test_two_processes_train_what_one_process_trains(data, one_process, killed, resumed_on_two):
    """Every epoch of the killed-and-resumed run ran on two processes: its losses and final state
    are those of the one-process run."""
    run_dir, done = killed
    assert resumed_on_two.returncode == 0, resumed_on_two.stderr
    assert resumed_on_two.stdout.count("best validation rSum") == 1  # rank 0 speaks for the job
    largest = assert_same_run(one_process, run_dir)
    print(f"largest parameter difference, 2 processes vs 1: {largest:.3g}")
    options = json.loads((run_dir / "options.json").read_text())["options"]
    assert options["world_size"] == 2 and options["batch_size"] == 20
    assert json.loads((one_process / "options.json").read_text())["options"]["world_size"] == 1


def test_resume_after_a_kill_under_torchrun_with_any_number_of_processes(data, one_process, killed, resumed_on_two, single_torch_thread):
    run_dir, done = killed
    assert 2 <= done < EPOCHS, f"the run was to be killed midway; it had {done} epochs"
    assert resumed_on_two.returncode == 0, resumed_on_two.stderr
    assert_same_run(one_process, run_dir)
    train_here(data, "-o", "killed-alone", "--resume")
    assert_same_run(one_process, data / "killed-alone")
    assert json.loads((data / "killed-alone" / "options.json").read_text())["options"]["world_size"] == 1


def test_a_batch_the_processes_cannot_share_is_refused_with_one_message(data):
    result = run(torchrun(*shnet_train(*train_args("odd"), "--batch-size", "7")), data)  # the last --batch-size counts
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("--batch-size 7 is the global batch and does not split evenly over 2 processes") == 1, output
    assert not (data / "odd").exists()
