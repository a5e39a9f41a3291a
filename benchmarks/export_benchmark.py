"""Export benchmark: file sizes, latency ratios, --all-tasks time and peak memory of an export.

For each model (the bundled sample when it exists, and untrained networks carrying masks of
the paper's pruning schedule: 50% of task 1's weights freed, then 75% of each later task's,
owners assigned by magnitude with ``packnet_export.masks``) it measures, on onnxruntime CPU:

* the size of the dense, sparse and multitask files against their targets;
* latency of sparse and multitask graphs relative to the dense graph of the same task at
  batch 1 and batch ``--batch``, with onnxruntime pinned to 1 and to 2 intra-op threads,
  measured interleaved (see :func:`interleaved`; ``--rounds`` rounds);
* the time of one ``export(..., all tasks)`` against one ``torch.onnx.export`` per task;
* peak memory of an export (``benchmarks/export_memory.py``: a fresh process, the peak RSS
  during the export above the RSS right before it) against the checkpoint's size.

Usage::

    python benchmarks/export_benchmark.py [--models sample vgg16 resnet50] [--image-size 224] [--out FILE]
        [--checkpoint-dir DIR] [--threads 1 2] [--rounds 15] [--check-folding]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import export_memory  # noqa: E402

from packnet_export import checkpoint, masks, models  # noqa: E402
from packnet_export.checkpoint import PackNet, TaskInfo  # noqa: E402
from packnet_export.exporter import DEFAULT_OPSET, pipeline, validation  # noqa: E402

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
                              dynamic_axes={"input": {0: "N"}}, opset_version=DEFAULT_OPSET)
        del module
    return time.perf_counter() - start


def interleaved(sessions: dict[str, tuple[object, int | None]], size: int, batch: int, rounds: int,
                round_s: float = 0.05) -> dict[str, dict]:
    """Latency of every session relative to ``sessions["dense"]``, measured interleaved.

    Each round times every session in turn (alternating the order), running each for about
    ``round_s`` (the same number of calls for all); the ratio of a graph is the median over
    rounds of its time divided by the dense graph's time in the same round, so background
    load that drifts between rounds cancels out. ``best_ratio`` compares the fastest round of
    each (the least disturbed one): on a shared machine it is the steadier estimate.
    """
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)

    def call(name: str) -> None:
        session, index = sessions[name]
        validation.run_logits(session, x, index, batch=batch)

    for name in sessions:  # warm-up (first calls allocate and tune)
        call(name)
        call(name)
    start = time.perf_counter()
    call("dense")
    reps = max(1, int(round_s / max(time.perf_counter() - start, 1e-6)))
    names = list(sessions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(reps):
                call(name)
            times[name].append((time.perf_counter() - start) / reps * 1e3)
    out = {}
    for name in names:
        ratios = [t / d for t, d in zip(times[name], times["dense"])]
        out[name] = {"ms": statistics.median(times[name]), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "best_ratio": min(times[name]) / min(times["dense"])}
    out["calls_per_round"] = reps
    out["rounds"] = rounds
    return out


def cpu_session(path: Path, threads: int):
    """A CPU session with ``threads`` intra-op threads that do not spin when idle.

    With spinning on (onnxruntime's default), the worker threads of the session that ran last
    keep a core busy for a while after its call, slowing whichever session runs next: in an
    interleaved comparison on 2 cores this made the graph timed second look up to 1.9x slower.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def folded_ops(path: Path, threads: int = 1) -> dict[str, int]:
    """Op counts of the graph onnxruntime really runs (``optimized_model_filepath``): the
    sparse and multitask decodes (CumSum, Gather on initializers, Where) must be gone."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "w.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        proto = onnx.load(options.optimized_model_filepath, load_external_data=False)

    counts: dict[str, int] = {}

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
    walk(proto.graph)
    return dict(sorted(counts.items()))


def latency_tasks(n: int, which: tuple[str, ...] = ("first", "last")) -> tuple[int, ...]:
    return tuple(sorted({1 if w == "first" else n for w in which}))


def bench_model(name: str, model: PackNet, ckpt: Path, work: Path, batch: int, rounds: int,
                threads_list: tuple[int, ...] = (1, 2), check_folding: bool = False,
                which: tuple[str, ...] = ("first", "last")) -> dict:
    size = model.image_size
    n = len(model.tasks)
    out = work / name
    row: dict = {"model": name, "arch": model.arch, "image_size": size, "tasks": n,
                 "checkpoint_bytes": ckpt.stat().st_size}
    formats = ["dense", "sparse", "multitask"]
    start = time.perf_counter()
    files = pipeline.export(model, out, list(range(1, n + 1)), ["dense"], force=True)
    row["all_tasks_export_s"] = time.perf_counter() - start
    row["torch_export_per_task_s"] = torch_export_per_task(model, work / f"{name}-torch")
    start = time.perf_counter()
    files += pipeline.export(model, out, list(range(1, n + 1)), ["sparse"], force=True)
    row["all_tasks_sparse_export_s"] = time.perf_counter() - start
    row["export_time_ratio"] = row["all_tasks_export_s"] / row["torch_export_per_task_s"]
    if "multitask" in formats:
        start = time.perf_counter()
        files += pipeline.export(model, out, [], ["multitask"], force=True)
        row["multitask_export_s"] = time.perf_counter() - start
    mem = export_memory.measure(ckpt, ["dense", "sparse", "multitask"], work=work)
    row["memory"] = {k: mem[k] for k in ("baseline_rss", "load_increase", "export_increase", "export_ratio",
                                          "export_with_model", "export_with_model_ratio")}
    tasks = []
    by = {(f.format, f.task): f for f in files}
    for k, info in enumerate(model.tasks, start=1):
        dense, sp = by["dense", info.name], by["sparse", info.name]
        t = {"task": info.name, "dense_bytes": dense.bytes, "sparse_bytes": sp.bytes,
             "sparse_target_bytes": sp.size_bound, "sparse_meets_target": sp.bytes <= sp.size_bound}
        if k in latency_tasks(n, which):
            for threads in threads_list:
                sessions = {"dense": (cpu_session(dense.path, threads), None),
                            "sparse": (cpu_session(sp.path, threads), None)}
                if ("multitask", None) in by:
                    sessions["multitask"] = (cpu_session(by["multitask", None].path, threads), k - 1)
                for b in (1, batch):
                    res = interleaved(sessions, size, b, rounds)
                    t[f"threads{threads}_b{b}"] = res
                    print(f"  {name} {info.name} threads={threads} batch={b}: dense {res['dense']['ms']:.2f} ms, "
                          + ", ".join(f"{g} {res[g]['ratio']:.3f}x (best {res[g]['best_ratio']:.3f}x)"
                                      for g in sessions if g != "dense"),
                          file=sys.stderr, flush=True)
                del sessions
        tasks.append(t)
    row["per_task"] = tasks
    if check_folding:
        last = model.tasks[-1].name
        row["optimized_ops"] = {fmt: folded_ops(by[fmt, last].path) for fmt in ("dense", "sparse")}
        if ("multitask", None) in by:
            row["optimized_ops"]["multitask"] = folded_ops(by["multitask", None].path)
    if ("multitask", None) in by:
        from packnet_export.exporter.multitask import size_budget

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
    parser.add_argument("--rounds", type=int, default=15, help="Interleaved latency rounds.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads.")
    parser.add_argument("--latency-tasks", nargs="+", choices=["first", "last"], default=["first", "last"])
    parser.add_argument("--check-folding", action="store_true",
                        help="Record the op counts of the graphs onnxruntime optimizes (last task).")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="Reuse (or keep) the masked vgg16/resnet50 checkpoints here: making them takes minutes.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        for name in args.models:
            if name == "sample":
                if not pipeline.SAMPLE_CHECKPOINT.is_file():
                    print("skipping the sample: samples/packnet-6task.safetensors is absent", file=sys.stderr)
                    continue
                ckpt = pipeline.SAMPLE_CHECKPOINT
                model = checkpoint.load(ckpt)
            else:
                ckpt = (args.checkpoint_dir or work) / f"{name}.safetensors"
                if ckpt.is_file():
                    model = checkpoint.load(ckpt)
                else:
                    model = paper_masks(name, args.image_size, args.tasks)
                    checkpoint.save(model, ckpt)
                if model.image_size != args.image_size:
                    model.image_size = args.image_size
            print(f"benchmarking {name} ...", file=sys.stderr)
            row = bench_model(name, model, ckpt, work, args.batch, args.rounds, tuple(args.threads),
                              args.check_folding, tuple(args.latency_tasks))
            print(json.dumps(row, indent=1), file=sys.stderr)
            rows.append(row)
            del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpu_count": os.cpu_count(),
                                    "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
