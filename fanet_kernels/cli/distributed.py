"""Data parallelism under ``torchrun``: process group, samplers, and reductions of metrics.

Without torchrun's environment (RANK / WORLD_SIZE) everything here degrades to one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import checks


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank as torchrun's environment gives it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_arg: str = "auto") -> Dist:
    """Join torchrun's process group if its environment is set (gloo on CPU, nccl on GPU)."""
    world = env_world_size()
    rank = env_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device_arg = checks.device(device_arg)
    if device_arg == "cuda":
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # N processes on one machine: share the cores instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(ctx: Dist, values: list[float]) -> list[float]:
    """Sum ``values`` over the ranks (float64, so counts stay exact)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(ctx: Dist, obj: Any) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: Dist, obj: Any) -> Any:
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


class ShardSampler(Sampler[int]):
    """Rank r evaluates items r, r + W, r + 2W, ...: every item exactly once over the ranks
    (DistributedSampler pads with repeats, which would bias the test error)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
