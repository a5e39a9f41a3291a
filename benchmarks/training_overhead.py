"""Epoch time of PackNet training against plain training of the same model on the same data.

Plain = ordinary SGD with momentum on every parameter, batch norm in train mode, no masks.
PackNet = the trainer of ``packnet add-task`` (``_TaskTrainer.run_epoch``): the same SGD step,
then the weights the task does not own restored (bitwise) after each step. Two PackNet cases
are timed:

* ``task1-pruned``: the first task's fine-tuning after pruning (batch norm trained, half of
  every layer free): the same work as plain training plus the restore, i.e. its pure cost.
* ``task2``: a second task on a network half owned by task 1 (batch norm frozen in eval
  mode, as PackNet does).

``--amp off,bf16,fp16`` and ``--layouts nchw,channels-last`` time every combination side by side
(PackNet against plain of the same precision and layout, and the speed-up of each precision
and layout). The runs are interleaved (plain, task1-pruned, task2, plain, ...) so that a
machine whose load changes affects all cases alike; the median epoch of each is reported, in wall-clock seconds
and in CPU seconds of this process (on a CPU shared with other jobs the CPU time is the
steadier measure: it does not count the time the process waits for a core). ``--mode compute``
times pre-decoded batches (the strictest view of the overhead: nothing else dilutes it);
``--mode loader`` includes JPEG decoding and augmentation through the training loader.

    nice -n 10 python benchmarks/training_overhead.py --data ../shared/data/finegrained-mini/flowers
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from packnet_export import distributed, masks, models  # noqa: E402
from packnet_export.checkpoint import PackNet  # noqa: E402
from packnet_export.data import load_task_data, write_synthetic_image_folder  # noqa: E402
from packnet_export.training import Observer, TrainConfig, _TaskTrainer  # noqa: E402


def generated_data(root: Path, classes: int = 10, per_class: int = 64, size: int = 72) -> Path:
    """Coloured-noise ImageFolder (JPEG, so decoding costs what real images cost), where ../shared is absent."""
    return write_synthetic_image_folder(root, classes, per_class, 0, size, seed=0, noise=40.0, suffix=".jpg")


def pruned_first_task(arch: str, arch_kwargs: dict, image_size: int, classes: int, config: TrainConfig):
    """The trainer of a first task after pruning: all of its weights trainable, half of each layer pruned away."""
    trainer = _TaskTrainer(PackNet.create(arch, image_size, arch_kwargs), 1, classes, config, Observer())
    trainer.prune(0.5)
    return trainer


def first_task_model(arch: str, arch_kwargs: dict, image_size: int) -> PackNet:
    """A model whose task 1 owns half of every layer (magnitude-pruned initial weights)."""
    model = PackNet.create(arch, image_size, arch_kwargs)
    owners = masks.assign_free(model.owners, 1)
    weights = {k: model.shared[k] for k in owners}
    new_w, owners = masks.prune_task(weights, owners, 1, 0.5)
    model.shared.update(new_w)
    model.owners = owners
    return model


class PlainTrainer:
    """Ordinary training: SGD with momentum, no masks; the same mixed precision and memory format as PackNet's."""

    def __init__(self, module: torch.nn.Module, lr: float, momentum: float, weight_decay: float,
                 device: torch.device, amp: str = "off", channels_last: bool = False) -> None:
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module, self.device, self.channels_last = module.to(device), device, channels_last
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def run_epoch(self, batches) -> None:
        self.module.train()
        for x, y, _ in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = F.cross_entropy(self.module(x), y)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/finegrained-mini/flowers")
    ap.add_argument("--images", type=int, default=256, help="training images per epoch")
    ap.add_argument("--arch", default="vgg_mini")
    ap.add_argument("--width", type=int, default=16, help="vgg_mini width (0: the architecture's default)")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="epochs timed per case (after one warm-up)")
    ap.add_argument("--mode", choices=["compute", "loader"], default="compute")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other jobs)")
    ap.add_argument("--amp", default="off",
                    help="comma-separated precisions timed side by side: off, bf16, fp16 (e.g. off,bf16,fp16)")
    ap.add_argument("--layouts", default="nchw", help="comma-separated memory formats timed side by side: "
                    "nchw, channels-last")
    ap.add_argument("--channels-last", action="store_true", help="the same as --layouts channels-last")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.channels_last:
        args.layouts = "channels-last"
    torch.set_num_threads(args.threads)

    data_dir = args.data
    source = str(data_dir)
    if not (data_dir / "train").is_dir():
        data_dir = generated_data(Path(tempfile.mkdtemp()))
        source = "generated coloured noise (10 classes x 64)"
    device = torch.device(args.device)
    arch_kwargs = {"width": args.width} if args.width else {}
    model = first_task_model(args.arch, arch_kwargs, args.image_size)
    data = load_task_data(data_dir, model.image_size, model.mean, model.std, val_fraction=0.0)
    n = min(args.images, len(data.train))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:n].tolist()
    train = Subset(data.train, sorted(order))
    classes = len(data.classes)

    loader = distributed.train_loader(train, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    loader.batch_sampler.set_epoch(0)
    if args.mode == "compute":
        batches = [(x.to(device), y.to(device), bad) for x, y, bad in loader]

        def epoch_data(_seed: int):
            return batches
    else:
        def epoch_data(seed: int):
            loader.batch_sampler.set_epoch(seed)
            return loader

    def case_name(case: str, amp: str, channels_last: bool) -> str:
        return " ".join([case] + ([amp] if amp != "off" else []) + (["channels-last"] if channels_last else []))

    def packnet_epoch(trainer: _TaskTrainer):
        """One epoch of ``trainer`` with its own optimizer (and loss scaler for fp16)."""
        optimizer = trainer.optimizer(0.01)
        scaler = torch.amp.GradScaler(device.type) if trainer.config.amp == "fp16" else None
        return lambda batches: trainer.run_epoch(batches, optimizer, 0.01, scaler=scaler)

    layouts = [v == "channels-last" for v in args.layouts.split(",")]
    cases, what = {}, {}
    for channels_last in layouts:
        for amp in args.amp.split(","):
            config = TrainConfig(batch_size=args.batch_size, weight_decay=args.weight_decay, device=args.device,
                                 workers=args.workers, amp=amp, channels_last=channels_last)
            plain = PlainTrainer(models.build(args.arch, classes, arch_kwargs), 0.01, 0.9, args.weight_decay,
                                 device, amp, channels_last)
            runs = {
                "plain": plain.run_epoch,
                "task1-pruned": packnet_epoch(pruned_first_task(args.arch, arch_kwargs, args.image_size, classes,
                                                                config)),
                "task2": packnet_epoch(_TaskTrainer(copy.deepcopy(model), 2, classes, config, Observer())),
            }
            for case, run in runs.items():
                cases[case_name(case, amp, channels_last)] = run
                what[case_name(case, amp, channels_last)] = (case, amp, channels_last)

    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.repeats + 1):
        for name, run in cases.items():
            d = epoch_data(rep)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            run(d)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:  # the first round warms caches and allocators
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    def ratios(numerator, other) -> dict[str, float]:
        """median[k] / median[other(k)] for every case k whose counterpart other(k) was timed."""
        out = {}
        for k in cases:
            ref = other(*what[k])
            if ref is not None and ref in median:
                out[k] = round(numerator[k] / numerator[ref], 3)
        return out

    def plain_of(case: str, amp: str, channels_last: bool) -> str | None:
        return case_name("plain", amp, channels_last) if case != "plain" else None

    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   + (torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"),
        "torch": torch.__version__,
        "data": source,
        "images_per_epoch": n,
        "batch_size": args.batch_size,
        "arch": f"{args.arch} at {args.image_size} px" + (f", width {args.width}" if args.width else ""),
        "mode": args.mode,
        "median_epoch_s": {k: round(v, 4) for k, v in median.items()},
        "images_per_s": {k: round(n / v, 1) for k, v in median.items()},
        "ratio_vs_plain": ratios(median, plain_of),
        "median_epoch_cpu_s": {k: round(v, 4) for k, v in median_cpu.items()},
        "cpu_ratio_vs_plain": ratios(median_cpu, plain_of),
        # speed-ups: time of the counterpart (fp32, or NCHW) over the time of the case
        "mixed_precision_speedup": {k: round(1 / v, 3) for k, v in ratios(
            median, lambda c, a, cl: case_name(c, "off", cl) if a != "off" else None).items()},
        "channels_last_speedup": {k: round(1 / v, 3) for k, v in ratios(
            median, lambda c, a, cl: case_name(c, a, False) if cl else None).items()},
        "epochs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "epochs_cpu_s": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
