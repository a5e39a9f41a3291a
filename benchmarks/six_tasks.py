"""The six-task benchmark: PackNet against individual networks, classifier-only and sequential fine-tuning.

Runs the paper's sequence (cifar10 -> flowers -> cubs -> cars -> wikiart -> sketch, CIFAR-10
standing in for ImageNet) on ``../shared/data/finegrained-mini`` and writes every number to
``benchmarks/results/six_tasks.json``; ``benchmarks/make_results.py`` turns that into
``benchmarks/RESULTS.md`` and the plots.

PackNet and the individual networks are trained with the toolkit's own CLI (``packnet init``,
``packnet add-task``, ``packnet eval``), exactly as a user would. The two other baselines need
training loops the CLI does not offer, so they use the library:

* individual networks (the paper's upper reference): task 1 trained from scratch, then one
  network per later task fine-tuned from it with every weight free (``--prune 0``), as the
  paper fine-tunes each from ImageNet;
* classifier-only (lower reference): the task-1 network frozen, a new head per task;
* sequential fine-tuning: one backbone fine-tuned task after task with a new head each time;
  every task is then evaluated with the final backbone, which shows forgetting.

Usage::

    python benchmarks/six_tasks.py [--epochs 5] [--finetune-epochs 2] [--out benchmarks/results]
    python benchmarks/six_tasks.py --arch mobilenet_v2 --arch-kwargs '{"width_mult": 0.5}' --image-size 32 \
        --train-images 3000 --test-images 1000 --only packnet   # results in six_tasks-mobilenet_v2.json
    python benchmarks/six_tasks.py --arch mobilenet_v3_small --recompute-bn-stats ...

``--train-images`` / ``--test-images`` run on a class-stratified subset of each task (symbolic
links under ``--work``, the images themselves stay in ../shared), for backbones too slow to
train on every image on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from packnet_export import checkpoint, models  # noqa: E402
from packnet_export.data import load_split, load_task_data, loader  # noqa: E402
from packnet_export.training import evaluate, recompute_bn_stats  # noqa: E402

SOURCE_DATA = REPO.parent / "shared" / "data" / "finegrained-mini"
DATA = SOURCE_DATA
"""The data the run uses: SOURCE_DATA, or a subset of it (``--train-images``)."""
TASKS = ["cifar10", "flowers", "cubs", "cars", "wikiart", "sketch"]


def packnet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "packnet_export.cli.main", *args]


def run(cmd: list[str], log) -> dict:
    """Run a CLI command with --json; its JSON goes to the result, its progress to the log."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout)


def train_args(args, task_index: int) -> list[str]:
    lr = args.first_lr if task_index == 0 else args.lr
    return ["--epochs", str(args.epochs), "--finetune-epochs", str(args.finetune_epochs), "--lr", str(lr),
            "--finetune-lr", str(args.finetune_lr), "--lr-decay-every", str(args.lr_decay_every),
            "--batch-size", str(args.batch_size), "--weight-decay", str(args.weight_decay), "--json",
            *(["--recompute-bn-stats"] if args.recompute_bn_stats else [])]


def test_accuracy(ckpt: Path, task: str, log) -> float:
    return run(packnet_cmd("eval", str(ckpt), "--task", task, "--data", str(DATA / task), "--json"), log)["top1"]


def export_state(ckpt: Path, task: int, path: Path) -> None:
    """Task ``task``'s full network as a plain state dict, the start of the fine-tuned baselines."""
    model = checkpoint.load(ckpt)
    save_file({k: v.contiguous() for k, v in model.task_state_dict(task).items()}, str(path))


def arch_args(args) -> list[str]:
    out = ["--arch", args.arch, "--image-size", str(args.image_size)]
    if args.arch_kwargs:
        out += ["--arch-kwargs", args.arch_kwargs]
    return out + (["--width", str(args.width)] if args.arch == "vgg_mini" else [])


def arch_kwargs(args) -> dict:
    return {"width": args.width} if args.arch == "vgg_mini" else json.loads(args.arch_kwargs or "{}")


def subset(source: Path, target: Path, train: int, test: int, seed: int = 0) -> Path:
    """A class-stratified subset of every task as symbolic links: at most ``train`` / ``test``
    images per task (0: all), each class keeping its share (at least one image)."""
    rng = random.Random(seed)
    for task in TASKS:
        for split, limit in (("train", train), ("test", test)):
            classes = sorted(p for p in (source / task / split).iterdir() if p.is_dir())
            files = {c: sorted(c.iterdir()) for c in classes}
            total = sum(len(f) for f in files.values())
            for c, fs in files.items():
                keep = fs if not limit or limit >= total else rng.sample(fs, max(1, round(len(fs) * limit / total)))
                folder = target / task / split / c.name
                folder.mkdir(parents=True, exist_ok=True)
                for f in keep:
                    link = folder / f.name
                    if not link.exists():
                        os.symlink(f, link)
    return target


def run_packnet(args, work: Path, log) -> dict:
    ckpt = work / "packnet.safetensors"
    run(packnet_cmd("init", *arch_args(args), "-o", str(ckpt), "--force", "--json"), log)
    right_after, timings = {}, {}
    for i, task in enumerate(TASKS):
        prune = ["--prune", "0"] if i == len(TASKS) - 1 else []
        start = time.time()
        result = run(packnet_cmd("add-task", str(ckpt), "--name", task, "--data", str(DATA / task),
                                 *train_args(args, i), *prune), log)
        timings[task] = time.time() - start
        right_after[task] = result["metrics"]["test_top1"]
    after_all = {task: test_accuracy(ckpt, task, log) for task in TASKS}
    return {"checkpoint": str(ckpt), "right_after": right_after, "after_all": after_all, "seconds": timings}


def run_individual(args, work: Path, log) -> dict:
    accuracies, timings = {}, {}
    first = work / "individual-cifar10.safetensors"
    for i, task in enumerate(TASKS):
        ckpt = work / f"individual-{task}.safetensors"
        init = ["init", *arch_args(args), "-o", str(ckpt), "--force", "--json"]
        if i > 0:
            init += ["--weights", str(work / "individual-start.safetensors")]
        run(packnet_cmd(*init), log)
        start = time.time()
        result = run(packnet_cmd("add-task", str(ckpt), "--name", task, "--data", str(DATA / task),
                                 *train_args(args, i), "--prune", "0"), log)
        timings[task] = time.time() - start
        accuracies[task] = result["metrics"]["test_top1"]
        if i == 0:
            export_state(first, 1, work / "individual-start.safetensors")
    return {"accuracy": accuracies, "seconds": timings, "start": str(first)}


def _train_loop(module: nn.Module, params, data, args, lr: float, train_bn: bool) -> None:
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    total = args.epochs + args.finetune_epochs
    for epoch in range(total):
        if epoch < args.epochs:
            group_lr = lr * (0.1 ** (epoch // args.lr_decay_every))
        else:
            group_lr = args.finetune_lr
        for group in optimizer.param_groups:
            group["lr"] = group_lr
        module.train()
        if not train_bn:
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        gen = torch.Generator().manual_seed(epoch)
        for x, y, _ in loader(data.train, args.batch_size, shuffle=True, generator=gen):
            if x is None:
                continue
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            optimizer.step()


def _test_set(task: str, args):
    return load_split(DATA / task, "test", args.image_size, checkpoint.IMAGENET_MEAN, checkpoint.IMAGENET_STD)


def run_classifier_only(args, start_ckpt: Path, log) -> dict:
    base = checkpoint.load(start_ckpt)
    accuracies, timings = {}, {}
    for i, task in enumerate(TASKS):
        if i == 0:
            accuracies[task] = base.tasks[0].metrics["test_top1"]
            continue
        start = time.time()
        data = load_task_data(DATA / task, args.image_size, base.mean, base.std, val_fraction=0.1)
        torch.manual_seed(i)
        module = models.build(args.arch, len(data.classes), arch_kwargs(args))
        state = base.task_state_dict(1)
        head = models.head_keys(args.arch, arch_kwargs(args))
        module.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        for name, p in module.named_parameters():
            p.requires_grad_(name in head)
        _train_loop(module, [p for p in module.parameters() if p.requires_grad], data, args, args.lr, False)
        accuracies[task] = evaluate(module, _test_set(task, args))["top1"]
        timings[task] = time.time() - start
        log.write(f"classifier-only {task}: {accuracies[task]:.2f}%\n")
        log.flush()
    return {"accuracy": accuracies, "seconds": timings}


def run_sequential(args, start_ckpt: Path, log) -> dict:
    """Fine-tune one backbone task after task; evaluate all tasks at the end (forgetting)."""
    base = checkpoint.load(start_ckpt)
    head_w, head_b = models.head_keys(args.arch, arch_kwargs(args))
    backbone = {k: v.clone() for k, v in base.task_state_dict(1).items() if k not in (head_w, head_b)}
    heads = {"cifar10": {k: base.task_tensors[0][k] for k in (head_w, head_b)}}
    right_after = {"cifar10": base.tasks[0].metrics["test_top1"]}
    timings = {}
    for i, task in enumerate(TASKS[1:], start=1):
        start = time.time()
        data = load_task_data(DATA / task, args.image_size, base.mean, base.std, val_fraction=0.1)
        torch.manual_seed(i)
        module = models.build(args.arch, len(data.classes), arch_kwargs(args))
        module.load_state_dict(backbone, strict=False)
        _train_loop(module, list(module.parameters()), data, args, args.lr, True)
        if args.recompute_bn_stats:  # as add-task --recompute-bn-stats does for PackNet and individual networks
            recompute_bn_stats(module, data.train_eval, args.batch_size)
        state = module.state_dict()
        backbone = {k: v.clone() for k, v in state.items() if k not in (head_w, head_b)}
        heads[task] = {k: state[k].clone() for k in (head_w, head_b)}
        right_after[task] = evaluate(module, _test_set(task, args))["top1"]
        timings[task] = time.time() - start
        log.write(f"sequential {task}: {right_after[task]:.2f}% right after\n")
        log.flush()
    after_all = {}
    for task in TASKS:
        module = models.build(args.arch, heads[task][head_w].shape[0], arch_kwargs(args))
        module.load_state_dict({**backbone, **heads[task]})
        after_all[task] = evaluate(module, _test_set(task, args))["top1"]
    return {"right_after": right_after, "after_all": after_all, "seconds": timings}


def code_version() -> dict:
    """The commit the numbers come from (training rules change: docs/training.md)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    """The network and the training schedule (``train_args`` turns them into add-task options)."""
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--first-lr", type=float, default=0.02)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--finetune-lr", type=float, default=0.001)
    parser.add_argument("--lr-decay-every", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--arch", default="vgg_mini", help="any name `packnet init --list-archs` lists")
    parser.add_argument("--width", type=int, default=16, help="vgg_mini's base width")
    parser.add_argument("--arch-kwargs", default="", help="the builder's keyword arguments as JSON, as "
                        "`packnet init --arch-kwargs` takes them, e.g. '{\"width_mult\": 0.5}' for mobilenet_v2")
    parser.add_argument("--train-images", type=int, default=0, help="train images per task (0: all)")
    parser.add_argument("--test-images", type=int, default=0, help="test images per task (0: all)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--recompute-bn-stats", action="store_true",
                        help="pass add-task --recompute-bn-stats (PackNet, individual networks) and recompute them "
                        "the same way after sequential fine-tuning: needed for mobilenet_v3_small, whose batch "
                        "norm (momentum 0.01) never catches up in short runs; classifier-only keeps batch norm frozen")


def main() -> None:
    global DATA, SOURCE_DATA
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_schedule_options(parser)
    parser.add_argument("--data", type=Path, default=SOURCE_DATA,
                        help="the finegrained-mini folder (default: ../shared beside the repository; a worktree "
                             "elsewhere passes it)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "six_tasks")
    parser.add_argument("--only", choices=["packnet", "individual", "classifier", "sequential"], nargs="*")
    args = parser.parse_args()
    SOURCE_DATA = DATA = args.data.resolve()
    if not SOURCE_DATA.is_dir():
        raise SystemExit(f"{SOURCE_DATA} is absent: this benchmark needs the finegrained-mini images (--data)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.train_images or args.test_images:
        DATA = subset(SOURCE_DATA, args.work / "data", args.train_images, args.test_images)
    results_path = args.out / ("six_tasks.json" if args.arch == "vgg_mini" else f"six_tasks-{args.arch}.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": torch.get_num_threads(), "torch": torch.__version__, "gpu": "none"}
    results["code"] = code_version()
    wanted = args.only or ["packnet", "individual", "classifier", "sequential"]
    with open(args.work / "log.txt", "a") as log:
        for method in wanted:
            start = time.time()
            if method == "packnet":
                results["packnet"] = run_packnet(args, args.work, log)
            elif method == "individual":
                results["individual"] = run_individual(args, args.work, log)
            elif method == "classifier":
                results["classifier_only"] = run_classifier_only(
                    args, args.work / "individual-cifar10.safetensors", log)
            elif method == "sequential":
                results["sequential"] = run_sequential(args, args.work / "individual-cifar10.safetensors", log)
            results.setdefault("wall_seconds", {})[method] = time.time() - start
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{method} done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
