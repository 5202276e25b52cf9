"""Data-parallel training with PyTorch's own engine: `torchrun` starts the processes, this module
joins them into a process group (NCCL on GPUs, gloo on CPUs) and offers the few collectives the
training loop needs. Without torchrun (no WORLD_SIZE in the environment) everything is a no-op.

    torchrun --nproc-per-node 4 -m mt train CONFIG
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m mt train CONFIG
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mt.device import pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, metrics and progress bars, and validates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_name: str = "auto") -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment; pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and "RANK" not in os.environ:  # not started by torchrun
        return World(), pick_device(device_name)
    # a 1-process torchrun joins a process group too (so the backend is exercised), but with one
    # rank nothing is wrapped in DDP and no collective runs (World.distributed is False)
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    log.info("rank %d of %d (local rank %d) on %s, backend %s", world.rank, size, world.local_rank, device, backend)
    return world, device


def shutdown(world: World) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def sum_over_ranks(world: World, values: torch.Tensor) -> torch.Tensor:
    """`values` summed element-wise across ranks, in place (one collective for the whole tensor)."""
    if world.distributed:
        dist.all_reduce(values)
    return values


def sum_values(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` across ranks."""
    if not world.distributed:
        return values
    return sum_over_ranks(world, torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def check_replicas(world: World, model: nn.Module, device: torch.device) -> float:
    """Largest difference between any rank's parameters and rank 0's; raises if they diverged."""
    if not world.distributed:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).to(device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    difference = torch.tensor([(flat - reference).abs().max().item()], device=device)
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    if difference.item() > 0:
        raise RuntimeError(f"data-parallel replicas diverged: parameters differ by up to {difference.item():.3g}")
    return difference.item()


def gather_objects(world: World, obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank (e.g. their random-number-generator states)."""
    if not world.distributed:
        return [obj]
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered
