"""Adding a task to a PackNet model: train the free weights, prune, fine-tune, freeze.

The guarantees this module keeps, and the tests check:

* A weight owned by an earlier task never changes, bit for bit: after every optimizer step
  the weights the new task does not own (earlier tasks' and pruned ones) are copied back
  from a reference, bitwise (``_restore_frozen``). That makes the promise independent of the
  optimizer's arithmetic (momentum, weight decay, a NaN), where the official code's gradient
  masking lets weight decay move frozen weights. For SGD, the trainable weights come out
  exactly as with masked gradients.
* Batch norm and biases are trained with task 1 and frozen after it (batch-norm layers run
  in eval mode, so their running statistics do not move), unless the model keeps them per
  task.
* Training is deterministic on a CPU: every epoch reseeds the generators from
  (seed, phase, epoch), so a run resumed from its last finished epoch ends bit-identical to
  an uninterrupted one.
* The best epoch is chosen on a validation split carved from the training images, never on
  the test images. In the fine-tune phase the pruned, not yet fine-tuned weights compete
  too, as in the official code: a fine-tune epoch is kept only if it beats them.
* A finished task owns no weight that is exactly zero (``masks.prune_task``): a zero
  computes nothing, and freed it is capacity for a later task.

How this departs from the official code, and why: ``docs/training.md``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from . import checkpoint, distributed, masks, models, params
from .checkpoint import PackNet, TaskInfo
from .choices import AMP_MODES, RESIZE_MODES
from .data import TaskData, load_split, load_task_data, loader
from .errors import PackNetError, ParameterError

DEFAULT_FIRST_PRUNE = 0.5
DEFAULT_LATER_PRUNE = 0.75
DEFAULT_FINETUNE_EPOCHS = 10


MAX_EPOCHS = 100_000
MAX_LR = 1e6
"""Far above any useful rate (a run that diverges below it is caught and reported); 1e308
overflowed the optimizer's arithmetic."""
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 1024
AMP_CHOICES = ("off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Hyper-parameters of one ``add-task``; the defaults are the paper's."""

    epochs: int = 20
    finetune_epochs: int | None = None
    """Fine-tuning epochs after pruning; None: 10, or 0 with ``prune=0`` (a last task: the
    official scripts stop after training it, with nothing pruned there is nothing to recover)."""
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    lr_decay_every: int = 10
    lr_decay: float = 0.1
    finetune_lr_decay_every: int | None = None
    """Epochs between x ``lr_decay`` drops of the fine-tuning lr; None: constant. The official
    ImageNet pruning (``run_imagenet_pruning.sh``) drops it after 5 of its 10 epochs."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    prune: float | None = None
    """Fraction of the new task's weights to free; None: 0.5 for the first task, 0.75 after."""
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    strict: bool = False
    use_pretrained_head: bool = False
    channels_last: bool = False
    amp: str = "off"
    """Mixed precision: off, bf16 or fp16 (fp16 uses loss scaling, and is for CUDA only)."""
    sync_bn: bool = False
    """Under torchrun: batch-norm statistics over the global batch (first task, or per-task norm)."""
    resize: str = "crop"
    """How the task's images reach the input size (``choices.RESIZE_MODES``); stored with the task."""
    recompute_bn_stats: bool = False
    """Where batch norm trains (task 1, or per-task norm): after fine-tuning, replace its running
    statistics by their exact average over the training images (evaluation transform). For
    networks built with a small batch-norm momentum (torchvision's mobilenet_v3 and efficientnet
    use 0.01) trained for few steps, whose running averages still hold mostly their initial
    values: mobilenet_v3_small, 4 epochs of 3,000 cifar10 images at 32 px, test top-1 10.0%
    (chance) with the averages as trained, 32.3% recomputed. Also before each validation, so the
    best epoch is judged as it is saved (one more pass over the training images per epoch). Off
    by default, as the paper's code."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse, naming the field and its range, any value that would fail or poison training.

        Run at construction, so the Python API and ``packnet add-task`` (which maps each
        field to its flag) refuse the same values before any data is read or file written.
        """
        p = params
        p.integer(self.epochs, "epochs", 0, MAX_EPOCHS)
        if self.finetune_epochs is not None:
            p.integer(self.finetune_epochs, "finetune_epochs", 0, MAX_EPOCHS)
        p.real(self.lr, "lr", 0.0, MAX_LR, low_open=True)
        p.real(self.finetune_lr, "finetune_lr", 0.0, MAX_LR, low_open=True)
        p.integer(self.lr_decay_every, "lr_decay_every", 1, MAX_EPOCHS)
        p.real(self.lr_decay, "lr_decay", 0.0, 1.0, low_open=True)
        if self.finetune_lr_decay_every is not None:
            p.integer(self.finetune_lr_decay_every, "finetune_lr_decay_every", 1, MAX_EPOCHS)
        p.real(self.momentum, "momentum", 0.0, 1.0, high_open=True)
        p.real(self.weight_decay, "weight_decay", 0.0, 1.0, high_open=True)
        p.integer(self.batch_size, "batch_size", 1, MAX_BATCH_SIZE)
        p.fraction(self.prune, "prune", allow_none=True)
        p.fraction(self.val_fraction, "val_fraction")
        p.seed(self.seed, "seed")
        p.device(self.device, "device")
        p.integer(self.workers, "workers", 0, MAX_WORKERS)
        p.choice(self.amp, "amp", AMP_CHOICES)
        from .choices import RESIZE_MODES

        p.choice(self.resize, "resize", RESIZE_MODES)
        for flag in ("strict", "use_pretrained_head", "channels_last", "sync_bn", "recompute_bn_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise params.ParamError(flag, f"{{param}} must be True or False; got "
                                              f"{params.shown_value(getattr(self, flag))}")

    def prune_fraction(self, task: int) -> float:
        if self.prune is not None:
            return self.prune
        return DEFAULT_FIRST_PRUNE if task == 1 else DEFAULT_LATER_PRUNE

    def resolved(self, task: int) -> TrainConfig:
        """The settings with the defaults that depend on the task filled in."""
        if self.finetune_epochs is not None:
            return self
        return replace(self, finetune_epochs=0 if self.prune_fraction(task) == 0 else DEFAULT_FINETUNE_EPOCHS)

    def identity(self) -> dict:
        """The settings that change the result (a resume must match them)."""
        d = asdict(self)
        for k in ("device", "workers", "strict"):
            d.pop(k)
        return d


class Observer:
    """Receives training progress; the command line draws progress bars from it."""

    def phase(self, name: str, epochs: int, steps: int) -> None: ...
    def step(self, loss: float, steps: int = 1) -> None:
        """``steps`` more steps are done; ``loss`` is their mean (nan: none to report)."""
    def epoch(self, record: dict) -> None: ...
    def message(self, text: str) -> None:
        """A notice; ``text`` names parameters as ``$name`` (``errors.name_parameters`` renders them:
        the command line shows its flags, ``--prune``, a Python caller the names, ``prune``)."""
    def end_phase(self) -> None: ...


@dataclass
class _Run:
    """Mutable state of one add-task run, the part a resume file stores."""

    phase: str = "train"
    epoch: int = 0
    """Epochs finished in ``phase``."""
    best_score: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict] = field(default_factory=list)
    after_pruning: dict | None = None
    """Validation accuracy of the pruned weights before fine-tuning, the score to beat."""
    skipped_images: int = 0
    optimizer_state: dict[str, torch.Tensor] | None = None
    """Momentum buffers read from a resume file, applied to the next optimizer made."""


# --------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    module: nn.Module,
    dataset,
    batch_size: int = 128,
    device: str = "cpu",
    workers: int = 0,
    observer: Observer | None = None,
    label: str = "eval",
    sharded: bool = False,
) -> dict:
    """Top-1 and top-5 accuracy (in %) of ``module`` on ``dataset``.

    ``sharded``: every rank of a torchrun launch evaluates its share and the counts are summed.
    """
    from .distributed import all_reduce_sum, shard

    if sharded:
        dataset = shard(dataset)
    module.eval().to(device)
    dl = loader(dataset, batch_size, workers=workers, pin_memory=torch.device(device).type == "cuda")
    if observer:
        observer.phase(label, 1, len(dl))
    # counts stay on the device until the end: no wait for the GPU after every batch
    correct = torch.zeros(2, dtype=torch.int64, device=device)
    total = skipped = 0
    for x, y, bad in dl:
        skipped += bad
        if x is not None:
            logits = module(x.to(device, non_blocking=True)).float()
            y = y.to(device, non_blocking=True)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct[0] += (top[:, 0] == y).sum()
            correct[1] += (top == y[:, None]).any(dim=1).sum()
            total += len(y)
        if observer:
            observer.step(float("nan"))
    if observer:
        observer.end_phase()
    correct1, correct5 = correct.tolist()
    if sharded:
        correct1, correct5, total, skipped = all_reduce_sum([correct1, correct5, total, skipped])
    return {
        "top1": 100.0 * correct1 / total if total else 0.0,
        "top5": 100.0 * correct5 / total if total else 0.0,
        "images": total,
        "skipped_images": skipped,
    }


def evaluate_task(model: PackNet, task: str, data_dir: str | Path, split: str = "test", batch_size: int = 128,
                  device: str = "cpu", workers: int = 0, strict: bool = False,
                  observer: Observer | None = None) -> dict:
    params.eval_options(split, batch_size, device, workers)
    k = model.task_number(task)
    dataset = load_split(data_dir, split, model.image_size, model.mean, model.std, strict,
                         model.tasks[k - 1].resize_mode)
    _check_classes(model.tasks[k - 1].classes, dataset.classes, data_dir)
    result = evaluate(model.task_module(k), dataset, batch_size, device, workers, observer, f"eval {task}")
    return {"task": task, "split": split, **result}


def _check_classes(expected: list[str], found: list[str], data_dir) -> None:
    if expected != found:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        raise PackNetError(
            f"the classes in {data_dir} differ from the task's ({len(found)} found, {len(expected)} expected"
            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "") + ")"
        )


# ----------------------------------------------------------------------- training
def _seed_everything(seed: int, phase: str, epoch: int) -> torch.Generator:
    value = (seed * 1_000_003 + (0 if phase == "train" else 500_009) + epoch) % (2**63)
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


def _set_bn_training(module: nn.Module, train_bn: bool) -> None:
    module.train()
    if not train_bn:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _laid_out_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values with ``param``'s strides (a copy only where they differ)."""
    if tensor.stride() == param.stride():
        return tensor
    return torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)


class _TaskTrainer:
    """Holds the live module and the masks while one task is trained."""

    def __init__(self, model: PackNet, task: int, num_classes: int, config: TrainConfig,
                 observer: Observer) -> None:
        self.model, self.task, self.config, self.observer = model, task, config, observer
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed + task)
        module = models.build(model.arch, num_classes, model.arch_kwargs)
        head_w, head_b = models.head_keys(model.arch)
        state = module.state_dict()
        if config.use_pretrained_head:
            state.update(model.pretrained_head)
        self.owners = masks.assign_free(model.owners, task)
        for k, v in model.shared.items():
            state[k] = v.clone()
        if model.per_task_norm and task > 1:
            # a new task starts from the previous task's own norm/bias values
            for k, v in model.task_tensors[task - 2].items():
                if k not in (head_w, head_b):
                    state[k] = v.clone()
        module.load_state_dict(state)
        if config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module.to(self.device)
        self.train_norm = task == 1 or model.per_task_norm
        self.batch_norm_trains = self.train_norm and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.module.modules())
        """No batch of one image then (``distributed.EpochBatches``)."""
        self.prunable = list(self.owners)
        params = dict(self.module.named_parameters())
        self.norm_bias = [k for k in model.norm_bias_keys() if k in params]
        for k in self.norm_bias:
            params[k].requires_grad_(self.train_norm)
        # the values the new task must leave alone: earlier tasks' weights (_refresh_masks zeroes the rest)
        self.reference = {k: model.shared[k].to(self.device) for k in self.prunable}
        self._refresh_masks()
        self.head_keys = (head_w, head_b)
        self.updated = False
        """Whether a step has changed the weights (a resumed run starts True)."""

    def _refresh_masks(self) -> None:
        """Rebuild what ``_restore_frozen`` needs after the owner masks change.

        Per layer the restore is ``p = (p AND keep) OR reference`` on the weights' bits, with
        ``keep`` all ones where the task trains and all zeros elsewhere, and ``reference``
        holding earlier tasks' weights and 0 elsewhere (free and pruned weights). Bitwise
        operations copy every value exactly (-0.0, NaN and inf included) and run 4x faster than
        ``torch.where`` on a CPU. Masks and references are laid out like their weights
        (channels-last too): elementwise kernels over tensors of different strides are slower.
        """
        params = dict(self.module.named_parameters())
        self._masked = []
        for k in self.prunable:
            param, owner = params[k], self.owners[k].to(self.device)
            trainable = owner == self.task
            earlier = (owner != masks.FREE) & ~trainable
            reference = torch.where(earlier, self.reference[k], torch.zeros_like(self.reference[k]))
            self.reference[k] = _laid_out_like(param, reference)
            if bool(trainable.all()):  # nothing to protect in this layer (a first task before pruning)
                continue
            bits = _SAME_SIZE_INT[param.element_size()]
            keep = _laid_out_like(param, torch.where(trainable, -1, 0).to(bits))
            self._masked.append((param, keep, self.reference[k].view(bits)))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What this task changes: its weights (all prunable, for simplicity), head, norm/bias."""
        state = self.module.state_dict()
        keep = set(self.prunable) | set(self.head_keys)
        if self.train_norm:
            keep |= set(self.model.norm_bias_keys())
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if k in keep}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=False)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Plain SGD over every trainable tensor, weight decay included, as ordinary training.

        The optimizer may move weights the task does not own (their gradients are not masked,
        and weight decay and momentum apply to them); ``_restore_frozen`` puts every one of them
        back, bit for bit, after each step. For SGD this gives exactly the trainable weights
        that masking the gradients (the paper's formulation) gives, at half the extra memory
        traffic: one pass per step instead of two.
        """
        params = dict(self.module.named_parameters())
        prunable = [params[k] for k in self.prunable]
        others = [p for k, p in params.items() if k not in self.owners and p.requires_grad]
        return torch.optim.SGD(
            [{"params": prunable}, {"params": others}],
            lr=lr, momentum=self.config.momentum, weight_decay=self.config.weight_decay,
        )

    def prune(self, fraction: float) -> tuple[int, int]:
        """Free ``fraction`` of the task's weights, and ties and zeros (``masks.prune_task``).

        Returns (weights freed, weights the task owned before).
        """
        owned = sum(int((o == self.task).sum()) for o in self.owners.values())
        params = dict(self.module.named_parameters())
        weights = {k: params[k].detach().cpu().contiguous() for k in self.prunable}  # channels-last too
        new_w, self.owners = masks.prune_task(weights, self.owners, self.task, fraction)
        # under torchrun rank 0 decides, so the owner masks cannot differ between ranks
        new_w, self.owners = distributed.broadcast_from_main(new_w), distributed.broadcast_from_main(self.owners)
        with torch.no_grad():
            for k in self.prunable:
                params[k].copy_(new_w[k].to(self.device))
        self._refresh_masks()
        return owned - sum(int((o == self.task).sum()) for o in self.owners.values()), owned

    @torch.no_grad()
    def _restore_frozen(self) -> None:
        for param, keep, reference in self._masked:
            param.detach().view(keep.dtype).bitwise_and_(keep).bitwise_or_(reference)

    def _forward(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            return forward(x)
        except ValueError as exc:
            # batch norm with one value per channel: a batch of one image at a 1x1 feature map
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            raise ParameterError("batch_size", f"batch norm, which trains with task {self.task}, cannot normalize a "
                                 "batch of one image where a feature map is 1x1 ($batch_size "
                                 f"{self.config.batch_size}): use $batch_size 2 or more, and at least 2 training "
                                 "images") from None

    def run_epoch(self, dl, optimizer, lr: float, ddp_module: nn.Module | None = None,
                  scaler: torch.amp.GradScaler | None = None) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = lr
        _set_bn_training(self.module, self.train_norm)
        forward = ddp_module or self.module
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.amp)
        # Losses stay on the device and are read in batches (_LossLog): reading one after every
        # step would make the CPU wait for the GPU each time and leave the GPU idle while the
        # next step is queued.
        log = _LossLog(self.device, self.observer, lr, check_finite=scaler is None, untrained=not self.updated)
        skipped = 0
        for x, y, bad in dl:
            skipped += bad
            if x is None:
                if ddp_module is not None:  # skipping a step here would leave the other ranks waiting
                    raise ParameterError("strict", "every image of a batch was unreadable, which a torchrun launch "
                                         "cannot skip; remove the bad images ($strict names them)")
                continue
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(self._forward(forward, x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            self._restore_frozen()
            self.updated = True
            log.add(loss.detach(), len(y))
        total_loss, seen = log.finish()
        if ddp_module is not None:  # the epoch's record covers every rank's images
            total_loss, seen, skipped = distributed.all_reduce_sum([total_loss, seen, skipped])
        return {"loss": total_loss / seen if seen else float("nan"), "images": seen, "skipped_images": skipped}


class _LossLog:
    """Step losses of one epoch, kept on the device and read at most every ``interval_s`` on a GPU.

    On a CPU reading a loss costs nothing, so every step is read at once (and a diverged run
    stops at the step that diverged). On a GPU the losses are read together, which costs one
    wait for the GPU per read instead of one per step; a diverged run then stops at the next
    read, before the epoch is finished (nothing of it has been saved yet).
    """

    def __init__(self, device: torch.device, observer: Observer, lr: float, check_finite: bool,
                 interval_s: float = 0.5, untrained: bool = False) -> None:
        self.observer, self.lr, self.check_finite = observer, lr, check_finite
        self.untrained = untrained
        """The first step of the epoch is the run's first: its loss is the starting network's."""
        self.every_step = device.type == "cpu"
        self.interval_s = interval_s
        self.pending: list[tuple[torch.Tensor, int]] = []
        self.total, self.seen = 0.0, 0
        self.last_read = time.monotonic()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.pending.append((loss, images))
        if self.every_step or time.monotonic() - self.last_read >= self.interval_s:
            self.read()

    def read(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss.float() for loss, _ in self.pending]).tolist()  # the one wait for the device
        counts = [n for _, n in self.pending]
        self.pending.clear()
        self.last_read = time.monotonic()
        bad = next((v for v in losses if not math.isfinite(v)), None)
        if self.check_finite and self.untrained and self.seen == 0 and not math.isfinite(losses[0]):
            raise PackNetError(
                f"training cannot start: the loss is {losses[0]} before the first update, so the network as it "
                "starts (earlier tasks' weights and frozen batch norm, a new head) already computes inf or NaN on "
                "these images and a lower learning rate will not help. A checkpoint written before add-task "
                "checked evaluation mode can hold such a task; retrain it with larger batches "
                "(docs/training.md: Batch norm on small inputs)")
        if bad is not None and self.check_finite:
            raise ParameterError("lr", f"training diverged: the loss became {bad} at learning rate {self.lr:g}; "
                                 "lower $lr (or $finetune_lr) and run again")
        self.total += sum(v * n for v, n in zip(losses, counts))
        self.seen += sum(counts)
        self.observer.step(sum(losses) / len(losses), steps=len(losses))

    def finish(self) -> tuple[float, int]:
        self.read()
        return self.total, self.seen


def add_task(
    model: PackNet,
    name: str,
    data_dir: str | Path,
    config: TrainConfig | None = None,
    observer: Observer | None = None,
    resume_path: str | Path | None = None,
    source_sha256: str = "",
) -> PackNet:
    """Train task ``name`` into a copy of ``model`` and return the copy.

    ``resume_path``: where to keep the state of the last finished epoch; a matching file
    found there is resumed from, and it is removed once the task is finished.
    """
    config = config or TrainConfig()
    params.name(name, "name")
    config.validate()  # again: a config's fields may have been changed since it was made
    with _cudnn_autotuned(config.device):
        return _add_task(model, name, data_dir, config, observer, resume_path, source_sha256)


@contextlib.contextmanager
def _cudnn_autotuned(device: str):
    """On a GPU let cuDNN time its convolution algorithms once and keep the fastest (the input
    size is fixed). GPU training is not bit-reproducible anyway (atomic adds in backward); the
    frozen weights are restored bit for bit whatever the algorithm."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or device.startswith("cuda")
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _add_task(model: PackNet, name: str, data_dir: str | Path, config: TrainConfig, observer: Observer | None,
              resume_path: str | Path | None, source_sha256: str) -> PackNet:
    observer = observer or Observer()
    task = len(model.tasks) + 1
    config = config.resolved(task)
    _check_can_add(model, name, config)
    fraction = config.prune_fraction(task)
    if not 0.0 <= fraction < 1.0:
        raise ParameterError("prune", f"$prune must be at least 0 and below 1, got {fraction}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", "$device cuda was asked for, but PyTorch sees no CUDA GPU here; use $device cpu")
    rank, world = distributed.rank_world()
    data = load_task_data(data_dir, model.image_size, model.mean, model.std, config.val_fraction, config.seed,
                          config.strict, config.resize)
    if config.use_pretrained_head:
        if not model.pretrained_head:
            raise ParameterError("use_pretrained_head", "$use_pretrained_head needs a checkpoint made from pretrained "
                                 "weights (`packnet init --pretrained/--weights`)")
        if task != 1:
            raise ParameterError("use_pretrained_head", "$use_pretrained_head is only for the first task")
        expected = model.pretrained_head[models.head_keys(model.arch)[0]].shape[0]
        if expected != len(data.classes):
            raise PackNetError(f"the pretrained head has {expected} classes but {data_dir} has {len(data.classes)}")
    free = model.free_fraction()
    if free < 0.01:
        observer.message(f"only {free:.2%} of the weights are free for task {task} (what earlier tasks freed)")
    trainer = _TaskTrainer(model, task, len(data.classes), config, observer)
    run = _Run()
    identity = {"task": name, "source_sha256": source_sha256, "config": config.identity(), "world_size": world}
    if world > 1:
        distributed.check_consistent_launch(identity, resume_path, {"classes": data.classes, "train": len(data.train)})
    if resume_path is not None and Path(resume_path).exists():
        run = _load_resume(resume_path, identity, trainer)
        observer.message(f"resuming from {resume_path}: {run.phase} epoch {run.epoch} finished")

    if config.sync_bn:
        if world <= 1:
            observer.message("$sync_bn has no effect in one process")
        elif not trainer.train_norm:
            observer.message(f"$sync_bn has no effect: batch norm is frozen for task {task} (trained with task 1)")
        else:
            distributed.use_global_batch_norm(trainer.module)
    ddp_module = distributed.wrap_ddp(trainer.module, config.device) if world > 1 else None
    scaler = torch.amp.GradScaler(trainer.device.type) if config.amp == "fp16" else None

    def statistics_as_saved() -> None:
        """With ``recompute_bn_stats`` an epoch is judged (best epoch) with the batch-norm
        statistics it would be saved with, not the stale running averages: otherwise the first
        epoch can stay "best" and every later one is thrown away."""
        if config.recompute_bn_stats and trainer.batch_norm_trains:
            recompute_bn_stats(trainer.module, data.train_eval, config.batch_size, config.device)

    def save_resume(optimizer) -> None:
        if resume_path is not None and rank == 0:
            _save_resume(resume_path, identity, trainer, run, optimizer)

    def train_phase(phase: str, epochs: int, base_lr: float, decay_every: int | None) -> None:
        if run.phase != phase:
            return
        optimizer = trainer.optimizer(base_lr)
        if run.optimizer_state is not None:
            _load_optimizer_state(optimizer, run.optimizer_state)
            run.optimizer_state = None
        # one loader per phase (workers persist); order and augmentation depend on (seed, epoch) only
        dl = distributed.train_loader(data.train, config.batch_size, config.workers,
                                      pin_memory=trainer.device.type == "cuda",
                                      merge_single=trainer.batch_norm_trains)
        if epochs > run.epoch:
            observer.phase(phase, epochs - run.epoch, len(dl))
        while run.epoch < epochs:
            lr = base_lr * (config.lr_decay ** (run.epoch // decay_every) if decay_every else 1.0)
            gen = _seed_everything(config.seed, phase, run.epoch)
            dl.batch_sampler.set_epoch(int(torch.randint(0, 2**62, (1,), generator=gen)))
            record = trainer.run_epoch(dl, optimizer, lr, ddp_module, scaler)
            if ddp_module is not None:
                distributed.sync_buffers(trainer.module)
            # every epoch reads every training image: count each bad file once, not once per epoch
            run.skipped_images = max(run.skipped_images, record.pop("skipped_images"))
            record.update(phase=phase, epoch=run.epoch + 1, lr=lr)
            if data.val is not None:
                statistics_as_saved()
                val = evaluate(trainer.module, data.val, max(config.batch_size, 64), config.device, config.workers,
                               sharded=True)
                record["val_top1"] = val["top1"]
                score = val["top1"]
            else:
                score = float(run.epoch)  # no validation split: the last epoch wins
            if score > run.best_score:
                run.best_score, run.best_state = score, trainer.trainable_state()
                record["best"] = True
            run.history.append(record)
            run.epoch += 1
            save_resume(optimizer)
            observer.epoch(record)
        observer.end_phase()
        if run.best_state is not None:
            trainer.load_trainable_state(run.best_state)

    if config.epochs == 0 and run.phase == "train":
        run.best_state = trainer.trainable_state()
    train_phase("train", config.epochs, config.lr, config.lr_decay_every)
    if run.phase == "train":
        freed, owned = trainer.prune(fraction)
        run.phase, run.epoch, run.best_score, run.best_state = "finetune", 0, -1.0, None
        text = (f"pruned task {task}: freed {freed:,} of its {owned:,} weights ({freed / max(owned, 1):.1%}; "
                f"$prune {fraction:g}, ties at the cutoff freed too)")
        if config.finetune_epochs and data.val is not None:
            # as the official code: the pruned weights are the score a fine-tune epoch must beat
            statistics_as_saved()
            val = evaluate(trainer.module, data.val, max(config.batch_size, 64), config.device, config.workers,
                           sharded=True)
            run.best_score, run.best_state = val["top1"], trainer.trainable_state()
            run.after_pruning = {"val_top1": val["top1"]}
            text += f"; validation top-1 {val['top1']:.2f}% before fine-tuning"
        observer.message(text)
        save_resume(trainer.optimizer(config.finetune_lr))
    train_phase("finetune", config.finetune_epochs, config.finetune_lr, config.finetune_lr_decay_every)
    # a fine-tune step can land a weight exactly on 0: free it too, so the task owns no zero
    trainer.prune(0.0)
    statistics_as_saved()
    if trainer.batch_norm_trains and not config.recompute_bn_stats:
        _hint_stale_bn_stats(trainer.module, len(data.train), config, observer)
    try:
        _check_finite_in_eval(trainer.module, data.train_eval, name, config, trainer.batch_norm_trains)
    except ParameterError:
        if resume_path is not None and rank == 0:  # its epochs hold the diverged weights: no use resuming
            Path(resume_path).unlink(missing_ok=True)
        raise

    result = _finish(model, trainer, name, data, config, fraction, run)
    skipped = result.tasks[-1].metrics["skipped_images"]
    if skipped:
        observer.message(f"skipped {skipped} unreadable image(s) (training, validation and test)")
    return result


def _check_can_add(model: PackNet, name: str, config: TrainConfig) -> None:
    if not name or not name.strip():
        raise ParameterError("name", "the task needs a name: $name NAME")
    if name in model.task_names:
        raise ParameterError("name", f"task {name!r} already exists; the checkpoint has: "
                             f"{', '.join(model.task_names)}. Choose another $name")
    if len(model.tasks) >= masks.MAX_TASKS:
        raise PackNetError(f"the owner mask holds at most {masks.MAX_TASKS} tasks")
    if model.free_fraction() == 0.0:
        raise ParameterError(
            "prune", "no free weights left: the last task was added with $prune 0 and owns every remaining weight; "
            "start a new model (`packnet init`, `packnet_export.create`), or re-add the last task with $prune above 0"
        )
    if config.amp not in AMP_MODES:
        raise ParameterError("amp", f"$amp must be one of {', '.join(AMP_MODES)}, not {config.amp!r}")
    if config.resize not in RESIZE_MODES:
        raise ParameterError("resize", f"$resize must be one of {', '.join(RESIZE_MODES)}, not {config.resize!r}")
    if config.finetune_lr_decay_every is not None and config.finetune_lr_decay_every < 1:
        raise ParameterError("finetune_lr_decay_every",
                             "$finetune_lr_decay_every must be at least 1 (leave it out for a constant lr)")
    for attr in ("epochs", "finetune_epochs", "batch_size"):
        if getattr(config, attr) < (1 if attr == "batch_size" else 0):
            raise ParameterError(attr, f"${attr} must not be negative" + (" or zero" if attr == "batch_size" else ""))


def _finish(model: PackNet, trainer: _TaskTrainer, name: str, data: TaskData, config: TrainConfig,
            fraction: float, run: _Run) -> PackNet:
    task = trainer.task
    new = copy.copy(model)
    state = {k: v.detach().cpu() for k, v in trainer.module.state_dict().items()}
    if config.channels_last:
        state = {k: v.contiguous() for k, v in state.items()}
    new.shared = dict(model.shared)
    for k in trainer.prunable:
        new.shared[k] = state[k].clone()
    head_w, head_b = models.head_keys(model.arch)
    own = {head_w: state[head_w].clone(), head_b: state[head_b].clone()}
    if model.per_task_norm:
        own.update({k: state[k].clone() for k in model.norm_bias_keys()})
    if task == 1:
        for k in model.norm_bias_keys():
            new.shared[k] = state[k].clone()
    new.owners = trainer.owners
    new.task_tensors = [*model.task_tensors, own]
    training = {**config.identity(), "history": run.history}
    if run.after_pruning is not None:
        tuned = any(r.get("best") for r in run.history if r["phase"] == "finetune")
        training["after_pruning"] = {**run.after_pruning, "kept": not tuned}
    info = TaskInfo(name=name, classes=list(data.classes), prune=fraction, training=training, resize=config.resize)
    new.tasks = [*model.tasks, info]
    if config.use_pretrained_head:
        new.pretrained_head = {}
    metrics: dict = {"train_images": len(data.train), "val_images": len(data.val) if data.val is not None else 0}
    skipped = run.skipped_images
    module = new.task_module(task)
    if data.val is not None:
        val = evaluate(module, data.val, 128, config.device, config.workers, sharded=True)
        metrics["val_top1"] = val["top1"]
        skipped += val["skipped_images"]
    test_dir = Path(_data_root(data)) / "test"
    if test_dir.is_dir():
        test = load_split(test_dir.parent, "test", new.image_size, new.mean, new.std, config.strict, config.resize)
        res = evaluate(module, test, 128, config.device, config.workers, sharded=True)
        metrics.update(test_top1=res["top1"], test_top5=res["top5"], test_images=res["images"])
        skipped += res["skipped_images"]
    metrics["skipped_images"] = skipped
    info.metrics = metrics
    return new


@torch.no_grad()
def recompute_bn_stats(module: nn.Module, dataset, batch_size: int, device: str = "cpu") -> int:
    """Set every batch-norm layer's running mean and variance to their average over ``dataset``.

    One pass in training mode for batch norm only (dropout and the rest in evaluation mode),
    with PyTorch's cumulative average (``momentum=None``): each full batch weighs the same; a
    last partial batch is left out, so the statistics do not depend on how the images divide.
    Deterministic (fixed order, no augmentation), so every torchrun process computes the same
    values from the same images without communicating. Returns the number of batches used.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    module.eval().to(device)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    batches = 0
    try:
        for x, _, _ in loader(dataset, batch_size):
            if x is None or len(x) < max(batch_size, 2):
                continue
            module(x.to(device))
            batches += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
    if batches == 0:
        raise ParameterError("batch_size", f"$recompute_bn_stats needs at least one full batch of $batch_size "
                             f"{batch_size} training images, and there are {len(dataset)}")
    return batches


def _hint_stale_bn_stats(module: nn.Module, images: int, config: TrainConfig, observer: Observer) -> None:
    """Say so when batch norm's running averages cannot have followed the training.

    With momentum m, the averages keep (1 - m)^steps of their initial values (mean 0,
    variance 1) after ``steps`` optimizer steps; evaluation and every export use them.
    """
    momenta = [m.momentum for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
    if not momenta:
        return
    steps = -(-images // config.batch_size) * (config.epochs + (config.finetune_epochs or 0))
    kept = (1.0 - min(momenta)) ** steps
    if kept > 0.05:
        observer.message(f"batch norm momentum {min(momenta):g} over {steps} steps: its running statistics still "
                         f"hold {kept:.0%} of their initial values, so evaluation and exports may score far "
                         "below training; train longer, or pass $recompute_bn_stats")


@torch.no_grad()
def _check_finite_in_eval(module: nn.Module, dataset, name: str, config: TrainConfig, batch_norm_trained: bool) -> None:
    """Refuse a finished task whose network computes inf or NaN in evaluation mode.

    The training loss cannot see it where batch norm trains: in training mode each layer is
    normalized by its batch's statistics, which absorb any growth of the weights, while
    evaluation uses the running averages. When the weights grow faster than those averages
    follow (batch norm over a few values per channel, as batches of 3 images at a 1x1
    feature map give, has gradients of up to 1/sqrt(eps) per layer: efficientnet_b0's first
    convolution went from 0.26 to 6,622 in 3 steps at lr 0.001), evaluation overflows to
    inf/NaN. Every later task runs with these frozen statistics and would diverge at its
    first step, so the task stops here and nothing is written. One batch of training images
    (evaluation transform) is enough: the overflow comes from the weights, so any image shows it.
    """
    module.eval().to(config.device)
    for x, _, _ in loader(dataset, config.batch_size):
        if x is None:
            continue
        logits = module(x.to(config.device)).float()
        if bool(torch.isfinite(logits).all()):
            return
        bad = logits[~torch.isfinite(logits)][0].item()
        cause = ("the weights grew faster than batch norm's running statistics could follow (batch norm over "
                 "too few values per channel, or too high a learning rate). Raise $batch_size or lower $lr"
                 if batch_norm_trained else "Lower $lr")
        raise ParameterError("batch_size" if batch_norm_trained else "lr",
                             f"training diverged: task {name!r} computes {bad} in evaluation mode, though its training "
                             f"loss stayed finite ($batch_size {config.batch_size}, $lr {config.lr:g}): {cause} "
                             "and run again; nothing was written")


def _data_root(data: TaskData) -> str:
    ds = data.train.dataset if hasattr(data.train, "dataset") else data.train
    return str(Path(ds.root).parent)


# ------------------------------------------------------------------------ resume
def _save_resume(path, identity: dict, trainer: _TaskTrainer, run: _Run, optimizer) -> None:
    tensors = {f"module/{k}": v.detach().cpu().contiguous() for k, v in trainer.module.state_dict().items()}
    tensors.update({f"owner/{k}": v for k, v in trainer.owners.items()})
    if run.best_state is not None:
        tensors.update({f"best/{k}": v.contiguous() for k, v in run.best_state.items()})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optim/{i}"] = buf.detach().cpu().contiguous()
    meta = {"identity": identity, "phase": run.phase, "epoch": run.epoch, "best_score": run.best_score,
            "history": run.history, "after_pruning": run.after_pruning, "skipped_images": run.skipped_images}
    blob = st_save(tensors, metadata={"packnet_resume": json.dumps(meta)})
    with checkpoint.atomic_path(path) as handle:
        handle.write(blob)


def _load_resume(path, identity: dict, trainer: _TaskTrainer) -> _Run:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["packnet_resume"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise PackNetError(f"resume file {path} is unreadable ({exc.__class__.__name__}); delete it to start over") \
            from None
    if meta.get("identity") != identity:
        raise ParameterError(
            "restart", f"{path} holds an interrupted run with other settings or another source checkpoint; "
            "delete it (or pass $restart) to start this run from scratch"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        kind, _, rest = k.partition("/")
        groups.setdefault(kind, {})[rest] = v
    try:
        _check_resume(trainer, groups, meta)
        trainer.module.load_state_dict(groups["module"])
        run = _Run(phase=meta["phase"], epoch=int(meta["epoch"]), best_score=float(meta["best_score"]),
                   best_state=groups.get("best"), history=list(meta["history"]),
                   after_pruning=_after_pruning(meta.get("after_pruning")),
                   skipped_images=int(meta.get("skipped_images", 0)))
    except (KeyError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise ParameterError("restart", f"resume file {path} is unusable ({str(exc).strip().splitlines()[0][:150]}); "
                             "delete it (or pass $restart) to start over") from None
    trainer.owners = groups["owner"]
    trainer._refresh_masks()
    trainer.updated = True
    run.optimizer_state = groups.get("optim", {})
    return run


def _after_pruning(value) -> dict | None:
    if value is None:
        return None
    return {"val_top1": float(value["val_top1"])}


def _check_resume(trainer: _TaskTrainer, groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """A resume file must fit the run, and must not touch what earlier tasks own: their owners,
    weights and (when frozen) norm/bias must be exactly the source checkpoint's."""
    if meta["phase"] not in ("train", "finetune"):
        raise ValueError(f"unknown phase {meta['phase']!r}")
    model, state = trainer.model, trainer.module.state_dict()
    owners = groups["owner"]
    if owners.keys() != model.owners.keys():
        raise ValueError("its owner masks do not match the network")
    frozen = [] if trainer.train_norm else model.norm_bias_keys()
    for kind in ("module", "best"):
        tensors = groups.get(kind, {})
        for k, v in tensors.items():
            if k not in state or v.shape != state[k].shape or v.dtype != state[k].dtype:
                raise ValueError(f"{kind}/{k} does not fit the network")
        for k in frozen:
            if k in tensors and not torch.equal(tensors[k], model.shared[k]):
                raise ValueError(f"{kind}/{k} differs from the frozen value")
    for k, before in model.owners.items():
        o, earlier = owners[k], before != masks.FREE
        if o.dtype != torch.uint8 or o.shape != before.shape:
            raise ValueError(f"the owner mask of {k} has the wrong shape or type")
        if not torch.equal(o[earlier], before[earlier]) or bool(
                (~earlier & (o != masks.FREE) & (o != trainer.task)).any()):
            raise ValueError(f"the owner mask of {k} reassigns weights")
        for kind in ("module", "best"):
            w = groups.get(kind, {}).get(k)
            if w is not None and not torch.equal(w[earlier], model.shared[k][earlier]):
                raise ValueError(f"{kind}/{k} changes weights of earlier tasks")


def _load_optimizer_state(optimizer, buffers: dict[str, torch.Tensor]) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if str(i) in buffers:
            optimizer.state[p]["momentum_buffer"] = _laid_out_like(p, buffers[str(i)].to(p.device))


def resume_path_for(output: str | os.PathLike) -> Path:
    return Path(str(output) + ".resume")

