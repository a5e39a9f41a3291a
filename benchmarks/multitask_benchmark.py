"""The multitask ONNX graph against the dense graph of one task, on onnxruntime CPU.

For vgg_mini (48 px) and resnet18 (64 px) with six tasks whose owner masks follow the
paper's schedule (prune 50% after task 1, 75% after every later task), made by magnitude
without training (the freed weights get fresh random values before the next task, as
training would change them), this measures:

* file size of the multitask graph (both layouts) against the budget
  ``nonzero weights x 4 + packed mask + heads`` and against one dense graph per task;
* session load time and resident memory (RSS growth of a fresh process creating the
  session and running one batch), each file in its own process;
* latency at batch 1 and 32, with 1 thread and onnxruntime's default, of tasks 1 and 6:
  dense and multitask sessions live in one process and are timed in interleaved rounds,
  so background load hits them alike; the ratio is of the medians.

The dense graph is torch.onnx.export of ``model.task_module(k)`` (BN folded by the exporter).

Usage::

    nice -n 10 python benchmarks/multitask_benchmark.py [--archs vgg_mini,resnet18] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "vgg_mini": {"arch_kwargs": {"width": 16}, "image_size": 48},
    "resnet18": {"arch_kwargs": {}, "image_size": 64},
}
CLASSES = [200, 196, 102, 10, 100, 47]
"""Class counts of six tasks (CUBS, Cars, Flowers, CIFAR-10, a 100-class and a 47-class task)."""
LAYOUTS = ("branches", "runtime-mask", "portable")


def masked_model(arch: str, classes: list[int], image_size: int, arch_kwargs: dict, per_task_norm: bool = False,
                 seed: int = 0):
    """A PackNet model with the paper's pruning schedule, masks made by magnitude."""
    import torch

    from packnet_export import masks, models
    from packnet_export.checkpoint import PackNet, TaskInfo
    from packnet_export.training import DEFAULT_FIRST_PRUNE, DEFAULT_LATER_PRUNE

    model = PackNet.create(arch, image_size=image_size, arch_kwargs=arch_kwargs, per_task_norm=per_task_norm,
                           seed=seed)
    generator = torch.Generator().manual_seed(seed)
    head_w, head_b = models.head_keys(arch)
    features = models.build(arch, 2, arch_kwargs).state_dict()[head_w].shape[1]
    for k, count in enumerate(classes, start=1):
        owners = masks.assign_free(model.owners, k)
        shared = dict(model.shared)
        for key in owners:  # free weights get new values, as training task k would give them
            w = shared[key]
            fresh = torch.randn(w.shape, generator=generator) * w.std()
            shared[key] = torch.where(model.owners[key] == masks.FREE, fresh, w)
        weights, model.owners = masks.prune_task(shared, owners, k, DEFAULT_FIRST_PRUNE if k == 1
                                                 else DEFAULT_LATER_PRUNE)
        shared.update(weights)
        model.shared = shared
        task = {head_w: torch.randn(count, features, generator=generator) * 0.05,
                head_b: torch.randn(count, generator=generator) * 0.05}
        if per_task_norm:
            for key in model.norm_bias_keys():
                t = model.shared[key]
                task[key] = t + 0.1 * torch.rand(t.shape, generator=generator) if t.is_floating_point() else t
        model.task_tensors.append(task)
        model.tasks.append(TaskInfo(f"task{k}", [f"c{i}" for i in range(count)], 0.5))
    return model


def dense_graph(model, k: int) -> bytes:
    import torch

    module = model.task_module(k)
    f = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, model.image_size, model.image_size),), f, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return f.getvalue()


# ---------------------------------------------------------- measured in a child
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _inputs(session, batch: int, size: int, task: int) -> dict:
    import numpy as np

    feeds = {"input": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    kind = next((i.type for i in session.get_inputs() if i.name == "task_index"), None)
    if kind is not None:  # float32 in the portable layout, int64 in the others
        feeds["task_index"] = np.array(task, dtype=np.float32 if kind == "tensor(float)" else np.int64)
    return feeds


def child_memory(path: str, size: int) -> dict:
    """Load time and RSS growth of one file, in this (fresh) process."""
    import numpy as np  # noqa: F401  (imported before the baseline)
    import onnxruntime  # noqa: F401

    before = _rss_mb()
    start = time.perf_counter()
    session = _session(path, 1)
    load = time.perf_counter() - start
    loaded = _rss_mb()
    session.run(None, _inputs(session, 1, size, 0))
    return {"load_s": load, "rss_load_mb": loaded - before, "rss_after_run_mb": _rss_mb() - before}


def child_latency(paths: dict[str, str], size: int, task: int, threads: int, rounds: int, seconds: float) -> dict:
    """Median latency per graph at batch 1 and 32, dense and multitask timed in turn."""
    sessions = {name: _session(p, threads) for name, p in paths.items()}
    out = {}
    for batch in (1, 32):
        feeds = {name: _inputs(s, batch, size, task - 1) for name, s in sessions.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, s in sessions.items():  # warm up
            s.run(None, feeds[name])
        for _ in range(rounds):
            for name, s in sessions.items():
                n, start = 0, time.perf_counter()
                while n < 3 or time.perf_counter() - start < seconds:
                    s.run(None, feeds[name])
                    n += 1
                times[name].append((time.perf_counter() - start) / n)
        out[batch] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return out


# ------------------------------------------------------------------- the parent
def _child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_arch(arch: str, folder: Path, rounds: int, seconds: float) -> dict:
    import onnx

    from packnet_export.exporter.multitask import build_multitask_model, size_budget

    cfg = CONFIGS[arch]
    model = masked_model(arch, CLASSES, cfg["image_size"], cfg["arch_kwargs"])
    size = cfg["image_size"]
    budget = size_budget(model)
    files, build_s = {}, {}
    for layout in LAYOUTS:
        start = time.perf_counter()
        proto = build_multitask_model(model, layout=layout)
        build_s[layout] = time.perf_counter() - start
        files[layout] = folder / f"{arch}_{layout}.onnx"
        onnx.save(proto, files[layout])
    tasks = [1, len(model.tasks)]
    for k in range(1, len(model.tasks) + 1):
        files[f"dense{k}"] = folder / f"{arch}_dense{k}.onnx"
        files[f"dense{k}"].write_bytes(dense_graph(model, k))
    sizes = {name: p.stat().st_size for name, p in files.items()}
    dense_total = sum(sizes[f"dense{k}"] for k in range(1, len(model.tasks) + 1))
    memory = {name: _child(["--memory", str(files[name]), "--size", str(size)])
              for name in ("dense1", f"dense{len(model.tasks)}", *LAYOUTS)}
    latency = {}
    for k in tasks:
        for threads in (1, 0):
            paths = {"dense": str(files[f"dense{k}"]), **{layout: str(files[layout]) for layout in LAYOUTS}}
            ms = _child(["--latency", json.dumps(paths), "--size", str(size), "--task", str(k),
                         "--threads", str(threads), "--rounds", str(rounds), "--seconds", str(seconds)])
            latency[f"task{k}_threads{threads or 'default'}"] = {
                batch: {**v, **{f"{layout}_ratio": v[layout] / v["dense"] for layout in LAYOUTS}}
                for batch, v in ms.items()
            }
    return {
        "arch": arch, "image_size": size, "classes": CLASSES, "budget": budget,
        "weights": sum(o.numel() for o in model.owners.values()),
        "sizes": {name: sizes[name] for name in LAYOUTS},
        "size_over_budget": {layout: sizes[layout] / budget["total_bytes"] for layout in LAYOUTS},
        "dense_one_task_bytes": sizes["dense1"], "dense_all_tasks_bytes": dense_total,
        "build_s": build_s, "memory": memory, "latency_ms": latency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vgg_mini,resnet18")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.25, help="minimum time per graph per round")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--latency", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--task", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(child_memory(args.memory, args.size)))
        return
    if args.latency:
        print(json.dumps(child_latency(json.loads(args.latency), args.size, args.task, args.threads, args.rounds,
                                       args.seconds)))
        return
    import onnxruntime

    results = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__},
        "archs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            print(f"{arch} ...", file=sys.stderr)
            results["archs"].append(run_arch(arch, Path(tmp), args.rounds, args.seconds))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multitask.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    """The markdown tables of MULTITASK.md."""
    lines = []
    for r in results["archs"]:
        mb = 1 / 1e6
        b = r["budget"]
        lines += [f"### {r['arch']} at {r['image_size']} px, six tasks, {r['weights']:,} prunable weights", "",
                  f"Budget: {b['nonzero_weights']:,} nonzero weights x 4 B + {b['owner_bits']}-bit mask "
                  f"{b['mask_bytes'] * mb:.2f} MB + heads/norms {b['head_bytes'] * mb:.3f} MB = "
                  f"{b['total_bytes'] * mb:.2f} MB", "",
                  "| file | size (MB) | / budget | load (s) | RSS after load (MB) | RSS after 1 run (MB) |",
                  "|---|---|---|---|---|---|"]
        for name, m in r["memory"].items():
            size = r["sizes"].get(name)
            size_txt = f"{size * mb:.2f}" if size else f"{r['dense_one_task_bytes'] * mb:.2f}"
            over = f"{r['size_over_budget'][name]:.3f}" if name in r["size_over_budget"] else "-"
            lines.append(f"| {name} | {size_txt} | {over} | {m['load_s']:.2f} | {m['rss_load_mb']:.0f} | "
                         f"{m['rss_after_run_mb']:.0f} |")
        lines += ["", f"Six dense graphs: {r['dense_all_tasks_bytes'] * mb:.2f} MB.", "",
                  "| task, threads | batch | dense (ms) | " + " | ".join(f"{x} (ms) | ratio" for x in LAYOUTS) + " |",
                  "|---|---|---|" + "---|---|" * len(LAYOUTS)]
        for label, per_batch in r["latency_ms"].items():
            for batch, v in per_batch.items():
                lines.append(f"| {label} | {batch} | {v['dense']:.2f} | " + " | ".join(
                    f"{v[x]:.2f} | {v[f'{x}_ratio']:.3f}" for x in LAYOUTS if x in v) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
