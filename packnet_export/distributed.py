"""Running under torchrun: process-group set-up, the DDP wrapper, the per-epoch sampler.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and
training runs in one process.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


def world_from_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_from_env(device: str = "cpu") -> None:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA)."""
    rank, world, local_rank = world_from_env()
    if world <= 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return world_from_env()[0] == 0


def wrap_ddp(module: nn.Module, device: str) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if device.startswith("cuda"):
        return DistributedDataParallel(module, device_ids=[torch.cuda.current_device()])
    return DistributedDataParallel(module)


def epoch_sampler(dataset: Dataset, generator: torch.Generator, epoch: int) -> DistributedSampler:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler
