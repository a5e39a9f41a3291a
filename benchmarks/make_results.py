"""Turn ``benchmarks/results/six_tasks.json`` into ``benchmarks/RESULTS.md`` and its plots.

Usage::

    python benchmarks/make_results.py [--results benchmarks/results/six_tasks.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from packnet_export import checkpoint  # noqa: E402
from packnet_export import storage as report  # noqa: E402

TASKS = ["cifar10", "flowers", "cubs", "cars", "wikiart", "sketch"]
METHODS = [
    ("classifier_only", "Classifier only (frozen task-1 features)"),
    ("sequential_after", "Sequential fine-tuning, after all tasks"),
    ("sequential_right", "Sequential fine-tuning, right after each task"),
    ("packnet", "PackNet (this toolkit)"),
    ("individual", "Individual networks"),
]


def accuracy_table(results: dict) -> dict[str, dict[str, float]]:
    table = {
        "classifier_only": results["classifier_only"]["accuracy"],
        "sequential_after": results["sequential"]["after_all"],
        "sequential_right": results["sequential"]["right_after"],
        "packnet": results["packnet"]["after_all"],
        "individual": results["individual"]["accuracy"],
    }
    return {m: {t: float(v[t]) for t in TASKS} for m, v in table.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def plot_accuracy(acc: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(METHODS)
    for i, (key, label) in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(TASKS))]
        ax.bar(xs, [acc[key][t] for t in TASKS], width, label=label)
    ax.set_xticks(range(len(TASKS)), TASKS)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Six tasks in sequence: accuracy per task and method (vgg_mini, 48 px)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_storage(rows: list[tuple[str, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels, values = zip(*rows)
    ax.barh(range(len(rows)), values, color=["#888", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(rows)])
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("storage (MB, 10^6 bytes)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f} MB", va="center", fontsize=8)
    ax.set_title("Storage of six tasks")
    ax.set_xlim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def code_lines(code: dict | None) -> list[str]:
    """Which code the numbers were measured with (``six_tasks.py`` records it)."""
    if not code:
        return ["* Code: not recorded by this run."]
    dirty = " with uncommitted changes" if code.get("uncommitted_changes") else ""
    return [f"* Code: commit {code['commit']}{dirty}." + (f" {code['note']}" if code.get("note") else "")]


KEPT_FROM = "## Edge backbone"
"""Sections from this heading on are written by hand from other runs (``six_tasks.py --arch``) and kept."""


def kept_sections(path: Path) -> str:
    """The hand-written sections of an existing RESULTS.md, so regenerating the vgg_mini part keeps them."""
    text = path.read_text() if path.exists() else ""
    start = text.find(KEPT_FROM)
    return "\n" + text[start:] if start >= 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "six_tasks.json")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="PackNet checkpoint of the run (default: the one the results name)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    acc = accuracy_table(results)
    ckpt = args.checkpoint or Path(results["packnet"]["checkpoint"])
    model = checkpoint.load(ckpt)
    storage = report.build_report(report.inventory_from_model(model, ckpt))["storage"]
    plots = args.out.parent / "results"
    plot_accuracy(acc, plots / "six_tasks_accuracy.png")
    storage_rows = [
        ("Individual networks", storage["separate"]["megabytes"]),
        ("PackNet, official (1 B/weight mask)", storage["packnet_official"]["megabytes"]),
        ("PackNet, paper (3-bit mask)", storage["packnet_paper"]["megabytes"]),
        ("Classifier only / sequential", storage["single_network"]["megabytes"]),
    ]
    plot_storage(storage_rows, plots / "six_tasks_storage.png")

    pk = results["packnet"]
    forgetting = {t: pk["right_after"][t] - pk["after_all"][t] for t in TASKS}
    s = results["settings"]
    lines = [
        "# Six-task benchmark on real images",
        "",
        "The paper's sequence (ImageNet -> CUBS -> Cars -> Flowers -> WikiArt -> Sketch) on "
        "`../shared/data/finegrained-mini`, with CIFAR-10 standing in for ImageNet as the large first task "
        "(no pretrained weights can be downloaded here), in the order cifar10 -> flowers -> cubs -> cars -> "
        "wikiart -> sketch. Every network is trained from scratch on this machine's CPU.",
        "",
        "## Accuracy (test top-1, %)",
        "",
        "| task | " + " | ".join(label for _, label in METHODS) + " |",
        "|---|" + "---:|" * len(METHODS),
    ]
    for t in TASKS:
        lines.append(f"| {t} | " + " | ".join(f"{acc[m][t]:.2f}" for m, _ in METHODS) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean(acc[m].values()):.2f}**" for m, _ in METHODS) + " |")
    lines += ["", "![accuracy per task and method](results/six_tasks_accuracy.png)", ""]
    lines += [
        "## Zero forgetting",
        "",
        "PackNet's accuracy of each task right after it was trained (`add-task` measures it) and after all six "
        "tasks (`packnet eval` on the final checkpoint):",
        "",
        "| task | right after | after all six | change | sequential fine-tuning: change |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in TASKS:
        lines.append(f"| {t} | {pk['right_after'][t]:.2f} | {pk['after_all'][t]:.2f} | "
                     f"{pk['after_all'][t] - pk['right_after'][t]:+.2f} | "
                     f"{acc['sequential_after'][t] - acc['sequential_right'][t]:+.2f} |")
    lines += [
        "",
        f"Forgetting of PackNet: **{max(abs(v) for v in forgetting.values()):.2f} points** at most "
        "(the logits are bit-identical; `tests/test_training.py` checks it on every run of the suite).",
        "",
        "## Storage",
        "",
        "From `packnet report` on the final checkpoint (fp32 weights; MB = 10^6 bytes):",
        "",
        "| method | MB | ratio to individual networks |",
        "|---|---:|---:|",
    ]
    for label, key in [("Individual networks (6 backbones + heads)", "separate"),
                       ("PackNet as the paper counts it (ceil(log2 7) = 3-bit owner mask)", "packnet_paper"),
                       ("PackNet as the official code stores it (1-byte mask)", "packnet_official"),
                       ("PackNet, entropy bound of the mask", "packnet_entropy"),
                       ("Piggyback (1 bit per weight per added task)", "piggyback"),
                       ("Classifier only / sequential fine-tuning (1 backbone + 6 heads)", "single_network")]:
        if key in storage:
            lines.append(f"| {label} | {storage[key]['megabytes']:.3f} | {storage[key]['ratio_to_separate']:.3f} |")
    size = ckpt.stat().st_size / 1e6
    lines += ["", f"The checkpoint file itself (fp32 weights, 1-byte owner mask, metadata) is {size:.3f} MB.",
              "", "![storage per method](results/six_tasks_storage.png)", ""]

    ratio = storage["packnet_paper"]["ratio_to_separate"]
    pk_mean, ind_mean, clf_mean = (mean(acc[m].values()) for m in ("packnet", "individual", "classifier_only"))
    lines += [
        "## Targets",
        "",
        f"* PackNet's mean accuracy above classifier-only: {pk_mean:.2f} vs {clf_mean:.2f} -> "
        f"**{'met' if pk_mean > clf_mean else 'missed'}** ({pk_mean - clf_mean:+.2f} points).",
        f"* Within 3 points of individual networks: {pk_mean:.2f} vs {ind_mean:.2f} -> "
        f"**{'met' if pk_mean >= ind_mean - 3 else 'missed'}** ({pk_mean - ind_mean:+.2f} points).",
        f"* Forgetting exactly 0: **{'met' if all(v == 0 for v in forgetting.values()) else 'missed'}**.",
        f"* Storage <= 1/4 of six individual networks: {ratio:.3f} -> **{'met' if ratio <= 0.25 else 'missed'}**.",
        "",
    ]
    best_fixed = max(TASKS[1:], key=lambda t: acc["packnet"][t] - acc["individual"][t])
    worst_fixed = min(TASKS[1:], key=lambda t: acc["packnet"][t] - acc["individual"][t])
    lines += [
        "## Reading the numbers",
        "",
        "* Sequential fine-tuning shows what PackNet prevents: right after each task it is the most accurate "
        f"method (mean {mean(acc['sequential_right'].values()):.2f}), but once all six tasks are trained every "
        f"earlier task has collapsed (cifar10 {acc['sequential_right']['cifar10']:.2f} -> "
        f"{acc['sequential_after']['cifar10']:.2f}). PackNet's earlier tasks do not move at all.",
        f"* PackNet against individual networks: {pk_mean - ind_mean:+.2f} points on average. Later tasks own "
        "few weights of their own (12.5% of the network for flowers, 5.3% for wikiart) and lose points "
        f"on some tasks (worst: {worst_fixed}, "
        f"{acc['packnet'][worst_fixed] - acc['individual'][worst_fixed]:+.2f}), but gain on small data sets "
        "where fine-tuning a whole network for 8 epochs from the task-1 weights over-fits and frozen, reused "
        f"weights regularise (best: {best_fixed}, {acc['packnet'][best_fixed] - acc['individual'][best_fixed]:+.2f}).",
        "* Absolute accuracies are those of a 0.28 M-weight network trained from scratch at 48 px for 8 epochs per "
        "task on a CPU; fine-grained tasks like cars (196 classes, 29 training images per class) stay near chance "
        "for every method. The paper's setting (ImageNet-pretrained VGG-16 at 224 px) needs a GPU and the "
        "pretrained weights; the commands are the same.",
        "",
    ]
    wall = results.get("wall_seconds", {})
    prunable = sum(o.numel() for o in model.owners.values())
    lines += [
        "## How it was run",
        "",
        f"* Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPU threads, no GPU, "
        f"torch {results['machine']['torch']}; other jobs shared the two cores during the run, so the wall "
        "times below are upper bounds.",
        f"* Architecture `vgg_mini` (width {s['width']}, {prunable:,} prunable weights)"
        f" at {s['image_size']} px; batch {s['batch_size']}, SGD momentum 0.9, weight decay "
        f"{s['weight_decay']}; {s['epochs']} epochs at lr {s['first_lr']} (task 1) / {s['lr']} (later tasks), "
        f"x0.1 every {s['lr_decay_every']} epochs, then {s['finetune_epochs']} fine-tuning epochs at lr "
        f"{s['finetune_lr']}. PackNet prunes 50% after task 1, 75% after tasks 2-5, nothing after the last task "
        "(as the paper does for its last task). Every baseline trains the same number of epochs with the same "
        "schedule. PackNet and the individual networks (trained by `add-task`) choose the best epoch of each "
        "phase on 10% of train/ held out, never on test/; the classifier-only and sequential loops keep their "
        "last epoch.",
        "* Individual networks: task 1 from scratch, each later task fine-tuned from it with every weight free "
        "(the paper fine-tunes each from ImageNet). Classifier only: task 1's network frozen, a new head per task. "
        "Sequential: one backbone fine-tuned task after task (batch norm too), a new head each time, every task "
        "evaluated at the end with the last backbone.",
        "* Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) + ".",
        *code_lines(results.get("code")),
        "",
        "Reproduce (this run took about an hour, with other jobs sharing the 2 cores):",
        "",
        "```bash",
        f"python benchmarks/six_tasks.py --epochs {s['epochs']} --finetune-epochs {s['finetune_epochs']}",
        "python benchmarks/make_results.py",
        "```",
        "",
        "PackNet is trained with the toolkit's own commands; `runs/six_tasks/log.txt` records each one, e.g.:",
        "",
        "```bash",
        f"packnet init --arch vgg_mini --width {s['width']} --image-size {s['image_size']} -o packnet.safetensors",
        f"packnet add-task packnet.safetensors --name cifar10 --data ../shared/data/finegrained-mini/cifar10 "
        f"--epochs {s['epochs']} --finetune-epochs {s['finetune_epochs']} --lr {s['first_lr']} --finetune-lr "
        f"{s['finetune_lr']} --lr-decay-every {s['lr_decay_every']} --batch-size {s['batch_size']} "
        f"--weight-decay {s['weight_decay']}",
        "# ... flowers, cubs, cars, wikiart with --lr " + str(s["lr"]) + ", then sketch with --prune 0",
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines) + kept_sections(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
