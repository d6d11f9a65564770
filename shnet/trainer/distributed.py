"""Training over several processes (``torchrun``, ``srun``): the world, and the pieces that make N
ranks with B/N samples each compute what one process computes with the whole batch of B.

- :func:`gather_rows`: every rank's embeddings, concatenated in rank order, with gradients: the
  backward pass sums the gradient of the global loss over the ranks and hands each rank its rows.
- :func:`batch_norm_rows`: BatchNorm statistics (and running-statistic updates) over the global
  batch, used by the image encoder's BatchNorms when the world has more than one rank.
- :class:`BatchAlignedDropout`: every rank draws the dropout mask of the whole global batch from
  the same random stream (every rank is seeded alike) and keeps its own rows, so the masks are the
  ones one process would draw.

Written by hand because what torch offers does not do this on CPU: ``nn.SyncBatchNorm`` runs on
GPUs only and cannot skip padded rows, and ``torch.distributed.nn``'s differentiable gather needs
reduce-scatter or all-to-all in its backward pass, which the gloo backend lacks. These use all-gather
and all-reduce only, which both nccl and gloo have.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ShnetError

TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one per GPU, or per CPU process)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone validates and writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


#: how long a rank other than 0 waits for the launcher to stop it after an error every rank found
LEAVE_TO_RANK_ZERO_SECONDS = 30


def leave_to_rank_zero() -> None:
    """On an error every rank finds alike (e.g. a batch that does not split), rank 0 says why and the
    other ranks exit quietly. They first wait for the launcher to stop them: a rank that exited at once
    could make torchrun stop rank 0 before its message is printed. Bounded, for launchers that do not
    stop the others (srun without ``--kill-on-bad-exit``)."""
    time.sleep(LEAVE_TO_RANK_ZERO_SECONDS)
    sys.exit(1)


def world_from_environment(env: Mapping[str, str] = os.environ) -> World:
    """The world torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or a SLURM job step (SLURM_PROCID,
    SLURM_LOCALID, SLURM_STEP_NUM_TASKS) describes; one process otherwise."""
    if "WORLD_SIZE" in env:
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        keys = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS")
    else:
        return World()
    try:
        rank, local_rank, size = (int(env.get(key, "0")) for key in keys)
    except ValueError as exc:
        raise ShnetError(f"the launcher's environment ({', '.join(f'{k}={env.get(k)}' for k in keys)}) is not a world of processes") from exc
    if size > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        raise ShnetError(
            f"{size} training processes, but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun, or under SLURM "
            "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT=29500 before srun"
        )
    return World(rank=rank, local_rank=local_rank, size=size)


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (nccl on GPUs, gloo on CPU); returns this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank if world.distributed else (device.index or 0))
        torch.cuda.set_device(device)
    if world.distributed and not dist.is_initialized():
        _import_dynamo_before_the_process_group()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    return device


def _import_dynamo_before_the_process_group() -> None:
    """``DistributedDataParallel`` imports TorchDynamo; imported after the process group exists,
    TorchDynamo keeps a reference to it (torch 2.13), so ``destroy_process_group`` frees nothing and
    gloo's threads run on into interpreter teardown, where they can abort the process (SIGABRT,
    "terminate called without an active exception") after the training itself succeeded."""
    import torch._dynamo  # noqa: F401


def stop() -> None:
    """Leave the process group and free it, so that its threads (gloo's, nccl's) end here and not in
    interpreter teardown: what the run left in reference cycles is collected first (rank 0's
    ``DistributedDataParallel`` wrapper is among it after a run, and holds the group)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        ctx.count = rows.shape[0]
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.count
        return grad[start : start + ctx.count]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """[N * b, ...]: the rows of every rank (each holds b), with gradients; ``rows`` itself in one process.

    Every rank then computes the same global loss; the backward pass sums its gradient over the ranks
    (N times the gradient of the loss), and DistributedDataParallel's average divides by N again."""
    return _GatherRows.apply(rows) if active() else rows


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks, with gradients (the backward pass sums the ranks' gradients)."""
    return _AllReduceSum.apply(values) if active() else values


def batch_norm_rows(bn: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor) -> torch.Tensor:
    """Train-mode BatchNorm of ``rows`` [R, C] with the statistics of the rows of every rank (the
    global batch), updating ``bn``'s running statistics as one process with every row would.
    For a world of several ranks (:func:`active`); one process uses the module itself."""
    stats = all_reduce_sum(torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])]))
    count = stats[-1]
    mean = stats[:-1] / count
    centred = rows - mean
    var = all_reduce_sum((centred * centred).sum(0)) / count
    if bn.track_running_stats:
        with torch.no_grad():
            momentum = _momentum(bn)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var.detach() * count / (count - 1).clamp(min=1), alpha=momentum)
    out = centred * torch.rsqrt(var + bn.eps)
    return out * bn.weight + bn.bias if bn.affine else out


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor of this step (counting the step, as ``nn.BatchNorm1d`` does)."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


class BatchAlignedDropout(nn.Dropout):
    """Dropout over a batch-leading tensor whose mask is the global batch's mask, sliced to this rank's rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        ranks, rank = (dist.get_world_size(), dist.get_rank()) if active() else (1, 0)
        keep = torch.empty((ranks * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep[rank * x.shape[0] : (rank + 1) * x.shape[0]] / (1 - self.p)
