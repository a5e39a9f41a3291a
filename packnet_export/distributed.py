"""Running under torchrun: process-group set-up, the DDP wrapper, the training sampler.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them
everything here is a no-op and training runs in one process.

What keeps every rank in step (docs/distributed.md has the long form):

* The training order is a function of (seed, epoch) alone, and so is each image's
  augmentation (``EpochSampler`` hands out ``(index, seed)`` pairs that
  ``SeededSamples`` turns into per-image random draws). N processes with batch b see
  exactly the images, crops and flips of one process with batch N*b; results change with
  neither the world size nor the number of loader workers.
* DDP all-reduces the gradients inside ``backward()``; the trainer masks ``.grad`` after
  it, so every rank applies the same masked update, and the frozen weights are restored
  bit for bit after each step.
* Pruning decisions (owner masks and pruned weights) are broadcast from rank 0, and batch
  norm buffers are broadcast from rank 0 after every epoch: ranks cannot drift apart.
* Only rank 0 writes files; every rank reads the resume file, and the launch is checked
  for ranks that see different checkpoints, data or resume files.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset

from .errors import PackNetError, ParameterError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun describes them; (0, 1, 0) outside torchrun."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise PackNetError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None


def setup_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> None:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA).

    A no-op in a single process. Checks the launch first, so that a half-set environment or
    more processes than GPUs stop with one clear line instead of a hang or a CUDA error.
    The group is destroyed at interpreter exit.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    rank, world, local_rank = world_from_env()
    if world <= 1:
        return
    if not torch.distributed.is_available():
        raise PackNetError("this PyTorch build has no torch.distributed; run in one process")
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise PackNetError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; "
                           "launch with `torchrun --nproc_per_node N $(which packnet) add-task ...`")
    if not 0 <= rank < world:
        raise PackNetError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); check the launch")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ParameterError("device", "$device cuda was asked for, but PyTorch sees no CUDA GPU here; "
                                 "use $device cpu")
        if device != "cuda" and device != f"cuda:{local_rank}":
            raise ParameterError("device", f"under torchrun pass $device cuda, not {device}: process "
                                 f"LOCAL_RANK={local_rank} uses cuda:{local_rank} (choose GPUs with "
                                 "CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise PackNetError(f"LOCAL_RANK={local_rank} but this node has {count} GPU(s): "
                               f"launch at most --nproc_per_node {count}")
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group (safe to call twice, or without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return world_from_env()[0] == 0


def _comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def agree(value, what: str) -> None:
    """Raise the same ``PackNetError`` on every rank unless all ranks hold the same ``value``."""
    rank, world = rank_world()
    if world <= 1:
        return
    values: list = [None] * world
    torch.distributed.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise PackNetError(f"the processes of this torchrun launch see different {what} (rank 0 differs from "
                           f"rank(s) {', '.join(map(str, differ[:4]))}); give every node the same files")


def check_consistent_launch(identity: dict, resume_path: str | os.PathLike | None, dataset_facts: dict) -> None:
    """All ranks must train the same checkpoint on the same data, and resume from the same file.

    Starts with a barrier, so that a resume file that rank 0 deletes for ``--restart`` is gone
    before the other ranks look for it.
    """
    barrier()
    agree(identity, "checkpoints or settings")
    agree(dataset_facts, "training data")
    digest = None
    if resume_path is not None and Path(resume_path).exists():
        h = hashlib.sha256()
        with open(resume_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    agree(digest, f"resume files ({resume_path}: present on some ranks only, or different)")


def broadcast_from_main(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's values of ``tensors`` on every rank (same devices and dtypes as given)."""
    if rank_world()[1] <= 1:
        return tensors
    comm = _comm_device()
    out = {}
    for k, v in tensors.items():
        t = v.detach().to(comm, copy=True).contiguous()
        torch.distributed.broadcast(t, src=0)
        out[k] = t.to(v.device)
    return out


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last forward of an
    epoch each rank holds statistics updated from its own images only; this makes the
    validation, the best-epoch snapshot and the saved checkpoint the same everywhere.
    """
    if rank_world()[1] <= 1:
        return
    buffers = dict(module.named_buffers())
    synced = broadcast_from_main(buffers)
    for k, b in buffers.items():
        b.copy_(synced[k])


def all_reduce_sum(values: list) -> list:
    """Sum counters (ints stay ints, exact below 2**53) and float totals over the ranks."""
    if rank_world()[1] <= 1:
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return [type(v)(s) for v, s in zip(values, t.tolist())]


def shard(dataset: Dataset) -> Dataset:
    """This rank's share of an evaluation set: every world-th image, no padding, so counts summed
    over the ranks are exact (a DistributedSampler pads with repeats)."""
    rank, world = rank_world()
    if world <= 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world))


def wrap_ddp(module: nn.Module, device: str) -> nn.Module:
    """DistributedDataParallel around ``module``; DDP broadcasts rank 0's parameters and buffers
    here and rank 0's buffers before every forward."""
    from torch.nn.parallel import DistributedDataParallel

    if device.startswith("cuda"):
        return DistributedDataParallel(module, device_ids=[torch.cuda.current_device()])
    return DistributedDataParallel(module)


_CHANNEL_DIMS, _PER_CHANNEL = (0, 2, 3), (1, -1, 1, 1)


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Batch norm over the images of every process, with its backward written out.

    Forward: each process's per-channel mean and variance from PyTorch's own batch-norm
    kernel, combined over the processes by one all-reduce of (count x mean, count x (variance
    + mean^2), count) in float64 (the combination then loses nothing to cancellation), and one
    fused ``addcmul`` (x * scale + shift). Backward: PyTorch's batch-norm backward kernel gives
    the per-channel sums of dy and dy * (x - mean) around the *global* statistics, one
    all-reduce, then two ``addcmul``. This is what ``nn.SyncBatchNorm`` computes, built from
    operations that exist on every device, so it runs with gloo on CPUs as with nccl on GPUs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        channels = x.shape[1]
        count = x.numel() / channels
        _, local_mean, local_invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
        mean64 = local_mean.double()
        local_var = local_invstd.double().pow(-2)  # eps 0: 1/invstd^2 is the variance (0 where invstd is inf)
        sums = torch.cat([mean64 * count, (local_var + mean64 * mean64) * count,
                          torch.full((1,), count, dtype=torch.float64, device=x.device)])
        torch.distributed.all_reduce(sums)
        n = sums[-1]
        mean = sums[:channels] / n
        var = (sums[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        gamma = weight.double() if weight is not None else torch.ones_like(invstd)
        scale = invstd * gamma
        shift = -mean * scale + (bias.double() if bias is not None else 0.0)
        ctx.save_for_backward(x, mean, invstd, gamma, n)
        ctx.eps, ctx.affine = eps, weight is not None
        # the caller updates the running statistics from these; no gradient flows through them
        ctx.mark_non_differentiable(mean, var, n)
        return torch.addcmul(shift.float().view(_PER_CHANNEL), x, scale.float().view(_PER_CHANNEL)), mean, var, n

    @staticmethod
    def backward(ctx, dy, _mean, _var, _n):
        x, mean, invstd, gamma, n = ctx.saved_tensors
        channels = x.shape[1]
        # sum(dy * (x - mean) * invstd) and sum(dy) per channel, in one pass of PyTorch's kernel
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mean.float(), invstd.float(), True, ctx.eps, [False, True, True])
        totals = torch.cat([sum_dy.double(), sum_dy_xhat.double()])
        torch.distributed.all_reduce(totals)
        mean_dy, mean_dy_xhat = totals[:channels] / n, totals[channels:] / n
        # dx = gamma * invstd * (dy - mean_dy - xhat * mean_dy_xhat), with xhat = (x - mean) * invstd,
        # written as dy * a + x * b + c
        a = gamma * invstd
        b = -a * invstd * mean_dy_xhat
        c = -a * mean_dy - b * mean
        dx = torch.addcmul(torch.addcmul(c.float().view(_PER_CHANNEL), x, b.float().view(_PER_CHANNEL)),
                           dy, a.float().view(_PER_CHANNEL))
        # weight and bias: this process's share of their gradient; DDP averages it like every other
        if not ctx.affine:
            return dx, None, None, None
        return dx, sum_dy_xhat.to(x.dtype), sum_dy.to(x.dtype), None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics cover the global batch of every process (``--sync-bn``).

    Without it each process normalizes with the statistics of its own *b* images, so N
    processes with batch *b* train differently from one with batch N*b. ``nn.SyncBatchNorm``
    fixes that on GPUs only; this runs wherever the process group does (gloo on CPUs, nccl on
    GPUs), so the CPU tests check it: one small all-reduce per layer forward and one backward.
    Outside training, or in one process, it is plain ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and rank_world()[1] > 1):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x if x.dtype == torch.float32 else x.float()  # bf16/fp16 under autocast: statistics in fp32
        y, mean, var, n = _GlobalBatchNormFunction.apply(xf, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def use_global_batch_norm(module: nn.Module) -> int:
    """Turn every ``BatchNorm2d`` of ``module`` into a ``GlobalBatchNorm2d``, in place.

    The same parameter and buffer tensors stay in place (optimizers, masks and state-dict
    keys are unaffected). Returns how many layers were changed.
    """
    changed = 0
    for sub in module.modules():
        if type(sub) is nn.BatchNorm2d:
            sub.__class__ = GlobalBatchNorm2d
            changed += 1
    return changed


# ------------------------------------------------------------------------- sampling
def sample_seed(seed: int, index: int) -> int:
    """Seed of one image's augmentation in one epoch."""
    return (seed * 6_364_136_223_846_793_005 + index * 1_442_695_040_888_963_407 + 1) % (2**63)


class EpochSampler(Sampler):
    """This rank's part of a shuffled epoch, as ``(index, epoch seed)`` pairs.

    The permutation depends on the epoch seed only; rank r takes positions r, r+N, r+2N...,
    so batch i of N ranks with batch size b holds exactly the images of batch i of one
    process with batch size N*b. The order is padded with its own beginning to a multiple
    of N, as ``DistributedSampler`` does, so every rank takes the same number of steps
    (DDP needs that).
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.rank, self.world = size, rank, world
        self.seed = 0

    def set_epoch(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        total = len(self) * self.world
        while len(order) < total:
            order += order[: total - len(order)]
        return iter([(i, self.seed) for i in order[self.rank:total:self.world]])


class EpochBatches(Sampler):
    """The batches of an ``EpochSampler``; with ``merge_single`` a last batch of one image joins
    the batch before it (which then holds ``batch_size + 1``).

    Training batch norm normalizes each channel by its batch's statistics: over one image they
    are that image's alone, and where a feature map is 1x1 there is one value per channel and
    torch refuses the step ("Expected more than 1 value per channel when training"). The
    trainer merges while batch norm trains. Every rank has as many images as the others, so
    every rank merges alike and all take the same number of steps.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, merge_single: bool = False) -> None:
        self.sampler, self.batch_size, self.merge_single = sampler, batch_size, merge_single

    def set_epoch(self, seed: int) -> None:
        self.sampler.set_epoch(seed)

    def _merges(self) -> bool:
        n = len(self.sampler)
        return self.merge_single and n > self.batch_size and n % self.batch_size == 1

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size) - self._merges()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        items = list(self.sampler)
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if self._merges():
            last = batches.pop()
            batches[-1] += last
        return iter(batches)


class SeededSamples(Dataset):
    """Wraps a dataset whose transform draws from torch's global generator, so that
    ``dataset[(index, seed)]`` draws from a generator seeded by (seed, index) only.

    The global generator is restored afterwards; loader workers, ranks and the main process
    all produce the same augmented image for the same (index, epoch).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(seed, index))
            return self.dataset[index]


def train_loader(dataset: Dataset, batch_size: int, workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 4, merge_single: bool = False) -> torch.utils.data.DataLoader:
    """The training loader of one phase: made once, ``loader.batch_sampler.set_epoch(seed)`` per epoch.

    With workers they persist across epochs and prefetch ``prefetch_factor`` batches each, so
    a GPU is not left waiting at epoch starts; memory is pinned for asynchronous copies.
    ``merge_single``: no batch of one image (``EpochBatches``), for training batch norm.
    """
    from .data import collate_skipping

    rank, world = rank_world()
    return torch.utils.data.DataLoader(
        SeededSamples(dataset),
        batch_sampler=EpochBatches(EpochSampler(len(dataset), rank, world), batch_size, merge_single),
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
    )
