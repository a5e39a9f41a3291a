"""Training throughput under DistributedDataParallel: 1, 2, ... processes, PackNet against plain.

Weak scaling, as torchrun users run it: every process keeps ``--batch-size`` images per step,
so N processes train a global batch N times larger and each epoch of ``--images`` images takes
N times fewer steps. For each process count the script spawns the processes (gloo on the CPU,
nccl with one GPU per process), and times, interleaved:

* ``plain``: DDP around the model, SGD with momentum on every parameter;
* ``packnet``: the ``add-task`` trainer of a second task (``_TaskTrainer.run_epoch`` with the
  DDP module), whose gradient masking runs after DDP's all-reduce.

Each epoch starts and ends at a barrier, so the slowest process sets its time; the median
epoch gives images per second for the whole group. Scaling efficiency is images/s with N
processes over N x images/s with one; the PackNet ratio is its epoch time over plain's with
the same number of processes.

    python benchmarks/ddp_scaling.py --nprocs 1,2                 # CPU: one torch thread per process
    python benchmarks/ddp_scaling.py --nprocs 2 --sync-bn         # what --sync-bn costs the first task
    python benchmarks/ddp_scaling.py --nprocs 1,2,4,8 --device cuda --images 8192 --batch-size 128 \\
        --arch resnet18 --image-size 64 --width 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils.data import Subset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from training_overhead import PlainTrainer, first_task_model, generated_data, pruned_first_task  # noqa: E402

from packnet_export import distributed, models  # noqa: E402
from packnet_export.data import load_task_data  # noqa: E402
from packnet_export.training import Observer, TrainConfig, _TaskTrainer  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, data_dir: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        kwargs = {"width": args.width} if args.width else {}
        model = first_task_model(args.arch, kwargs, args.image_size)
        data = load_task_data(data_dir, model.image_size, model.mean, model.std, val_fraction=0.0)
        n = min(args.images, len(data.train))
        train = Subset(data.train, list(range(n)))
        classes = len(data.classes)
        loader = distributed.train_loader(train, args.batch_size, pin_memory=cuda)
        loader.batch_sampler.set_epoch(0)
        batches = [(x.to(device), y.to(device), bad) for x, y, bad in loader]  # this rank's share, decoded once

        config = TrainConfig(batch_size=args.batch_size, device=str(device), amp=args.amp,
                             channels_last=args.channels_last)
        packnet = _TaskTrainer(copy.deepcopy(model), 2, classes, config, Observer())
        packnet_ddp = distributed.wrap_ddp(packnet.module, str(device))
        packnet_opt = packnet.optimizer(0.01)
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        plain = PlainTrainer(models.build(args.arch, classes, kwargs), 0.01, 0.9, 0.0, device, args.amp,
                             args.channels_last)
        plain.module = distributed.wrap_ddp(plain.module, str(device))
        cases = {
            "plain": lambda: plain.run_epoch(batches),
            "packnet": lambda: packnet.run_epoch(batches, packnet_opt, 0.01, packnet_ddp, scaler),
        }
        if args.sync_bn:  # the first task (batch norm trained), with and without global statistics
            for name, sync in [("packnet task1", False), ("packnet task1 sync-bn", True)]:
                first = pruned_first_task(args.arch, kwargs, args.image_size, classes, config)
                if sync:
                    distributed.use_global_batch_norm(first.module)
                first_ddp = distributed.wrap_ddp(first.module, str(device))
                cases[name] = (lambda t, o, m: lambda: t.run_epoch(batches, o, 0.01, m, scaler))(
                    first, first.optimizer(0.01), first_ddp)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for rep in range(args.repeats + 1):
            for name, run in cases.items():
                if cuda:
                    torch.cuda.synchronize()
                torch.distributed.barrier()
                start = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                torch.distributed.barrier()
                if rep:  # the first round warms caches, allocators and DDP's buckets
                    times[name].append(time.perf_counter() - start)
        if rank == 0:
            global_images = sum(len(y) for _, y, _ in batches) * world
            Path(out).write_text(json.dumps({"images": global_images, "epochs_s": times}))
    finally:
        distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/finegrained-mini/flowers")
    ap.add_argument("--images", type=int, default=512, help="training images per epoch (whole group)")
    ap.add_argument("--arch", default="vgg_mini")
    ap.add_argument("--width", type=int, default=16, help="vgg_mini width (0: the architecture's default)")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--repeats", type=int, default=3, help="epochs timed per case (after one warm-up)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--sync-bn", action="store_true",
                    help="also time the first task (batch norm trained) with and without --sync-bn")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    data_dir, source = args.data, str(args.data)
    if not (data_dir / "train").is_dir():
        data_dir = generated_data(Path(tempfile.mkdtemp()))
        source = "generated coloured noise (10 classes x 64)"
    rows = {}
    for world in [int(v) for v in args.nprocs.split(",")]:
        if args.device == "cuda" and world > torch.cuda.device_count():
            print(f"skipping {world} processes: {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            mp.spawn(_worker, args=(world, _free_port(), args, str(data_dir), str(out)), nprocs=world, join=True)
            result = json.loads(out.read_text())
        median = {k: statistics.median(v) for k, v in result["epochs_s"].items()}
        rows[world] = {
            "images_per_epoch": result["images"],
            "images_per_s": {k: round(result["images"] / v, 1) for k, v in median.items()},
            "packnet_vs_plain": round(median["packnet"] / median["plain"], 3),
            **({"sync_bn_vs_not": round(median["packnet task1 sync-bn"] / median["packnet task1"], 3)}
               if args.sync_bn else {}),
            "epochs_s": {k: [round(t, 3) for t in v] for k, v in result["epochs_s"].items()},
        }
        print(f"{world} process(es): {rows[world]['images_per_s']}  packnet/plain {rows[world]['packnet_vs_plain']}"
              + (f"  sync-bn/not {rows[world]['sync_bn_vs_not']}" if args.sync_bn else ""), file=sys.stderr)
    base = rows.get(1)
    for world, row in rows.items():
        if base:
            row["scaling_efficiency"] = {k: round(v / (world * base["images_per_s"][k]), 3)
                                         for k, v in row["images_per_s"].items()}
    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if args.device == "cuda"
                      else f"no GPU, {args.threads} torch thread(s) per process"),
        "torch": torch.__version__,
        "data": source,
        "arch": f"{args.arch} at {args.image_size} px" + (f", width {args.width}" if args.width else ""),
        "batch_size_per_process": args.batch_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "processes": rows,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
