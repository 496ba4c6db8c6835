"""Multi-process training under torchrun: this process's place in the job, and the collectives.

`train.run` joins the job (`init_distributed`); `casm.CASM` and `train` average gradients and
BatchNorm statistics with these. Alone (world 1) every collective here is a no-op.

The models are not wrapped in DistributedDataParallel: DDP reduces gradients in hooks that
`.backward()` fires, and CASM takes its masked-out and mapping gradients with
`torch.autograd.grad`, which fires none. So every rank averages its gradients itself (one
all-reduce per optimiser step, `average_gradients`) before the optimisers step, which keeps the
weights identical on every rank, as DDP would.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from casm_deploy.common.devices import resolve_device


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; world 1 is a plain single process."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1  # the processes on this node

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """Read torchrun's RANK, LOCAL_RANK and WORLD_SIZE (absent: a single process)."""
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def is_distributed() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(grads: list[torch.Tensor]) -> None:
    """Replace each rank's gradients, in place, by their mean over the ranks (a no-op alone).

    One flat buffer, so one all-reduce per optimiser step, divided before the sum as DDP does.
    Under fp16 the gradients are still scaled here: an inf on one rank becomes an inf on all, so
    every rank skips the same step.
    """
    if not is_distributed() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) / dist.get_world_size()
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: nn.Module) -> None:
    """Average the BatchNorm running statistics over the ranks (a no-op alone).

    Each rank updates them on its own shard. The running averages are linear in the batch
    statistics, so averaging them only when they are read (a pool snapshot, validation, a
    checkpoint) gives the same as averaging after every step.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a no-op alone)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_lists(items: list[str]) -> list[str]:
    """Every rank's `items`, rank after rank (this rank's own alone)."""
    if not is_distributed():
        return list(items)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part or []]


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job this process belongs to, if any, and pick its device.

    NCCL between GPUs, gloo between CPU processes. Returns the job's shape (world 1 when not
    under torchrun) and this process's device.
    """
    job = distributed_from_env()
    if job.world == 1:
        return job, resolve_device(device_name)
    device = resolve_device(device_name, job.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Validation runs on rank 0 alone while the others wait at a barrier: allow an hour.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=job.rank,
            world_size=job.world,
            timeout=datetime.timedelta(hours=1),
        )
    return job, device


def leave_process_group(joined_before: bool) -> None:
    """Destroy the process group `init_distributed` made (not one the caller had joined)."""
    if not joined_before and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def in_process_group() -> bool:
    """Whether this process has joined a process group already (a caller's own, say)."""
    return dist.is_available() and dist.is_initialized()
