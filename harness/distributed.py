"""torch.distributed when started by torchrun; a world of one otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Set in the ranks that a job of trainer.ranks_per_job > 1 starts itself (harness/launch/job_ranks.py).
JOB_RANKS_ENV = "HARNESS_JOB_RANKS"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def started_by_harness() -> bool:
    """A rank of a job that trainer.ranks_per_job made several, not one that the user's torchrun started."""
    return launched_by_torchrun() and os.environ.get(JOB_RANKS_ENV) == os.environ["WORLD_SIZE"]


def world_from_env() -> World:
    if not launched_by_torchrun():
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: torch.device) -> None:
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def all_reduce_sum(values: list[int], device: torch.device) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_to_main(obj, world: World) -> list:
    """Every rank's `obj`, as a list on rank 0 (and [obj] in a world of one)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj, world: World):
    """Rank 0's `obj` on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def all_reduce_float(values: list[torch.Tensor]) -> list[float]:
    t = torch.stack([v.to(torch.float64) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def min_tensor(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t
