"""What the official pruning rules change: the same short PackNet sequence, trained with two
checkouts of this project side by side (before: exactly ``round(p * n)`` freed per layer, ties
broken by position, the last fine-tune epoch always kept; after: every tie and zero freed, and
the pruned weights compete with the fine-tune epochs, see docs/training.md).

For each checkout it runs ``packnet init`` and ``packnet add-task`` (that checkout's own code, in
a subprocess started in its folder) on tasks of ``../shared/data/finegrained-mini``, then reads
every checkpoint with this checkout's library: per task, the weights it owns, how many of those
are exactly zero, the free capacity left, and the test accuracy measured by ``add-task``.

Usage::

    mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before
    python benchmarks/tie_effect.py --before /tmp/before --before-commit <commit> \\
        --tasks flowers,cubs,sketch --epochs 3 --finetune-epochs 1 --subset 0.3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

from six_tasks import add_schedule_options, train_args  # noqa: E402

from packnet_export import checkpoint, masks  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "finegrained-mini"


def commit_of(folder: Path) -> str:
    proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


def packnet(folder: Path, *args: str) -> dict:
    """One CLI command of the checkout in ``folder`` (``python -m cli.main`` there imports its code)."""
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{folder}: packnet {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def subset_folder(source: Path, target: Path, fraction: float) -> Path:
    """The first ``fraction`` of each class's images (sorted by name, at least one), as symbolic
    links: a shorter run on the same kind of data, without copying an image."""
    for split in ("train", "test"):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.is_file())
            keep = images[:max(1, math.ceil(fraction * len(images)))]
            (target / split / folder.name).mkdir(parents=True, exist_ok=True)
            for image in keep:
                link = target / split / folder.name / image.name
                if not link.exists():
                    link.symlink_to(image.resolve())
    return target


def run_sequence(folder: Path, args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model.safetensors"
    packnet(folder, "init", "--arch", "vgg_mini", "--width", str(args.width), "--image-size", str(args.image_size),
            "-o", str(ckpt), "--force", "--json")
    start = time.time()
    for i, task in enumerate(args.tasks):
        options = train_args(args, i)
        if i == len(args.tasks) - 1:  # the last task: --prune 0, no fine-tuning (said explicitly: older code tunes)
            options[options.index("--finetune-epochs") + 1] = "0"
            options += ["--prune", "0"]
        packnet(folder, "add-task", str(ckpt), "--name", task, "--data", str(args.data / task), *options)
    return {"checkout": str(folder), "commit": commit_of(folder), "seconds": time.time() - start,
            "tasks": task_stats(ckpt)}


def task_stats(ckpt: Path) -> list[dict]:
    """Per task of a checkpoint: test accuracy (measured by add-task), weights owned, how many of
    them are exactly 0, the free weights left after it, and the score the pruned weights had."""
    model = checkpoint.load(ckpt)
    stats = []
    for k, info in enumerate(model.tasks, start=1):
        owners = model.owners.items()
        stats.append({
            "task": info.name, "test_top1": info.metrics["test_top1"],
            "owned": sum(int((o == k).sum()) for _, o in owners),
            "owned_zeros": sum(int(((o == k) & (model.shared[key] == 0)).sum()) for key, o in owners),
            "free_after": sum(int(((o == masks.FREE) | (o > k)).sum()) for _, o in owners),
            "after_pruning": info.training.get("after_pruning"),
        })
    return stats


def markdown(results: dict) -> str:
    before, after = results["before"], results["after"]
    lines = ["| task | owned before | of which exactly 0 | owned after | of which exactly 0 | "
             "free after the task, before -> after | test top-1 before -> after (%) | after: pruned weights kept |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for b, a in zip(before["tasks"], after["tasks"]):
        kept = (a.get("after_pruning") or {}).get("kept")
        lines.append(f"| {b['task']} | {b['owned']:,} | {b['owned_zeros']:,} | {a['owned']:,} | {a['owned_zeros']:,} "
                     f"| {b['free_after']:,} -> {a['free_after']:,} | {b['test_top1']:.2f} -> {a['test_top1']:.2f} "
                     f"| {'-' if kept is None else 'yes' if kept else 'no'} |")
    mean_b = sum(t["test_top1"] for t in before["tasks"]) / len(before["tasks"])
    mean_a = sum(t["test_top1"] for t in after["tasks"]) / len(after["tasks"])
    lines.append(f"| **mean** | | | | | | **{mean_b:.2f} -> {mean_a:.2f}** | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout to compare against (its own code runs)")
    parser.add_argument("--before-commit", help="the commit --before holds, when it is not a git checkout")
    parser.add_argument("--after", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    parser.add_argument("--after-commit", help="the commit --after holds, when it is not a git checkout")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--subset", type=float, default=1.0,
                        help="train and test on this fraction of each class's images (default: all)")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=["flowers", "cubs", "sketch"])
    add_schedule_options(parser)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "tie_effect")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tie_effect.json")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: read the checkpoints a run left in --work (e.g. one stopped early)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is absent: this benchmark needs the real images of ../shared")
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__}}
    if args.subset < 1.0:
        subset = args.work / f"data-{args.subset:g}"
        for task in args.tasks:
            subset_folder(args.data / task, subset / task, args.subset)
        args.data = subset
    if args.report_only:
        for side in ("before", "after"):
            results[side] = {"checkout": str(getattr(args, side)), "commit": commit_of(getattr(args, side)),
                             "tasks": task_stats(args.work / side / "model.safetensors")}
    else:
        # the two checkouts train side by side (the same work either way; wall time halves on a busy machine)
        results["before"], results["after"] = _train_both(args)
    for side, commit in (("before", args.before_commit), ("after", args.after_commit)):
        if commit:
            results[side]["commit"] = commit
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


def _train_both(args) -> tuple[dict, dict]:
    with ThreadPoolExecutor(2) as pool:
        before = pool.submit(run_sequence, args.before.resolve(), args, args.work / "before")
        after = pool.submit(run_sequence, args.after.resolve(), args, args.work / "after")
        return before.result(), after.result()


if __name__ == "__main__":
    main()
