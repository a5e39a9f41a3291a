"""Export benchmark: file sizes, latency ratios, --all-tasks time and peak memory of an export.

For each model (the bundled sample when it exists, and untrained networks carrying masks of
the paper's pruning schedule: 50% of task 1's weights freed, then 75% of each later task's,
owners assigned by magnitude with ``packnet_export.masks``) it measures, on onnxruntime CPU:

* the size of the dense, sparse and multitask files against their targets;
* latency of sparse and multitask graphs relative to the dense graph of the same task at
  batch 1 and batch ``--batch`` (median of ``--runs`` calls, one thread);
* the time of one ``export(..., all tasks)`` against one ``torch.onnx.export`` per task;
* peak resident memory of an export (a fresh subprocess; ``ru_maxrss`` minus the RSS after
  loading the model) against the checkpoint's size.

Usage::

    python benchmarks/export_benchmark.py [--models sample vgg16 resnet50] [--image-size 224] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from packnet_export import checkpoint, export, masks, models, validation  # noqa: E402
from packnet_export.checkpoint import PackNet, TaskInfo  # noqa: E402

PAPER_CLASSES = (10, 102, 200, 196, 195, 250)  # cifar10 stand-in, flowers, cubs, cars, wikiart, sketch


def paper_masks(arch: str, image_size: int, tasks: int = 6, arch_kwargs: dict | None = None) -> PackNet:
    """An untrained model whose owner masks follow the paper's schedule (50%, then 75% per task)."""
    model = PackNet.create(arch, image_size, arch_kwargs or {})
    head_w, head_b = models.head_keys(arch)
    width = models.build(arch, 2, arch_kwargs or {}).state_dict()[head_w].shape[1]
    g = torch.Generator().manual_seed(0)
    for k in range(1, tasks + 1):
        prune = 0.5 if k == 1 else 0.75
        for key, owner in model.owners.items():  # training would give freed weights new values
            fresh = torch.randn(owner.shape, generator=g) * 0.02
            model.shared[key] = torch.where(owner == masks.FREE, fresh, model.shared[key])
        model.owners = masks.assign_free(model.owners, k)
        weights, model.owners = masks.prune_task({key: model.shared[key] for key in model.owners},
                                                 model.owners, k, prune)
        model.shared.update(weights)
        c = PAPER_CLASSES[(k - 1) % len(PAPER_CLASSES)]
        model.tasks.append(TaskInfo(f"task{k}", [f"c{j}" for j in range(c)], prune))
        model.task_tensors.append({head_w: torch.randn(c, width, generator=g) * 0.01, head_b: torch.zeros(c)})
    return model


def torch_export_per_task(model: PackNet, out: Path) -> float:
    """Seconds of one plain torch.onnx.export per task to a file (the baseline --all-tasks must beat)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k in range(1, len(model.tasks) + 1):
        module = model.task_module(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(1, 3, model.image_size, model.image_size),), str(out / f"{k}.onnx"),
                              dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}}, opset_version=export.DEFAULT_OPSET)
        del module
    return time.perf_counter() - start


def latency(path: Path, size: int, batch: int, runs: int, task_index: int | None = None) -> float:
    session = validation.make_session(path, "cpu", threads=1).session
    return validation.latency_ms(session, size, task_index, batch=batch, runs=runs, budget_s=60)


def peak_memory(ckpt: Path, out: Path, formats: list[str]) -> dict:
    """Peak RSS of an --all-tasks export in a fresh process, above the RSS before loading the model
    (so the model itself counts), after importing torch and onnxruntime."""
    code = f"""
import resource, json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from packnet_export import checkpoint, export
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
export.runtime_ir_version()  # imports onnxruntime: a fixed cost, not the export's
base = rss()
model = checkpoint.load({str(ckpt)!r})
export.export(model, Path({str(out)!r}), list(range(1, len(model.tasks) + 1)), {formats!r}, force=True)
print(json.dumps({{"rss_before_load": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_model(name: str, model: PackNet, ckpt: Path, work: Path, batch: int, runs: int) -> dict:
    size = model.image_size
    n = len(model.tasks)
    out = work / name
    row: dict = {"model": name, "arch": model.arch, "image_size": size, "tasks": n,
                 "checkpoint_bytes": ckpt.stat().st_size}
    formats = ["dense", "sparse"] + (["multitask"] if export.multitask_available() else [])
    start = time.perf_counter()
    files = export.export(model, out, list(range(1, n + 1)), ["dense"], force=True)
    row["all_tasks_export_s"] = time.perf_counter() - start
    row["torch_export_per_task_s"] = torch_export_per_task(model, work / f"{name}-torch")
    start = time.perf_counter()
    files += export.export(model, out, list(range(1, n + 1)), ["sparse"], force=True)
    row["all_tasks_sparse_export_s"] = time.perf_counter() - start
    row["export_time_ratio"] = row["all_tasks_export_s"] / row["torch_export_per_task_s"]
    if "multitask" in formats:
        start = time.perf_counter()
        files += export.export(model, out, [], ["multitask"], force=True)
        row["multitask_export_s"] = time.perf_counter() - start
    mem = peak_memory(ckpt, work / f"{name}-mem", ["dense", "sparse"])
    row["export_peak_bytes"] = mem["peak"] - mem["rss_before_load"]
    row["memory_ratio"] = row["export_peak_bytes"] / row["checkpoint_bytes"]
    tasks = []
    by = {(f.format, f.task): f for f in files}
    for k, info in enumerate(model.tasks, start=1):
        dense, sp = by["dense", info.name], by["sparse", info.name]
        t = {"task": info.name, "dense_bytes": dense.bytes, "sparse_bytes": sp.bytes,
             "sparse_target_bytes": sp.size_bound, "sparse_meets_target": sp.bytes <= sp.size_bound}
        if k in (1, n):  # latency for the first and last task: they bracket the density
            for b in (1, batch):
                d = latency(dense.path, size, b, runs)
                t[f"dense_ms_b{b}"] = d
                t[f"sparse_ratio_b{b}"] = latency(sp.path, size, b, runs) / d
                if ("multitask", None) in by:
                    t[f"multitask_ratio_b{b}"] = latency(by["multitask", None].path, size, b, runs, k - 1) / d
        tasks.append(t)
    row["per_task"] = tasks
    if ("multitask", None) in by:
        from packnet_export.multitask import size_budget

        budget = size_budget(model)
        row["multitask_bytes"] = by["multitask", None].bytes
        row["multitask_target_bytes"] = 1.05 * budget["total_bytes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sample", "vgg16", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224, help="Input size of vgg16/resnet50.")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        for name in args.models:
            if name == "sample":
                if not export.SAMPLE_CHECKPOINT.is_file():
                    print("skipping the sample: samples/packnet-6task.safetensors is absent", file=sys.stderr)
                    continue
                ckpt = export.SAMPLE_CHECKPOINT
                model = checkpoint.load(ckpt)
            else:
                model = paper_masks(name, args.image_size, args.tasks)
                ckpt = work / f"{name}.safetensors"
                checkpoint.save(model, ckpt)
            print(f"benchmarking {name} ...", file=sys.stderr)
            row = bench_model(name, model, ckpt, work, args.batch, args.runs)
            print(json.dumps(row, indent=1), file=sys.stderr)
            rows.append(row)
            del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpu_threads": 1,
                                    "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
