"""onnxruntime CPU latency of a six-task run's exported files: dense, sparse and multitask, per task.

``packnet-export --all-tasks --format all`` times each file once while validating it (a median
of a few calls, order fixed); on a shared machine that drifts. This times the files already
written, interleaved (``export_benchmark.interleaved``: every round runs dense, sparse and
multitask in turn, and a graph's ratio is its median time over the dense graph's in the same
round), so the ratios hold even where the absolute milliseconds do not.

Usage::

    python benchmarks/six_tasks_latency.py --checkpoint runs/six_tasks/packnet.safetensors \\
        --exports runs/six_tasks/exports --out benchmarks/results/six_tasks-ARCH-latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import onnxruntime

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from export_benchmark import cpu_session, interleaved  # noqa: E402

from packnet_export import checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the PackNet checkpoint the files came from")
    parser.add_argument("--exports", type=Path, required=True, help="the folder packnet-export wrote")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="onnxruntime intra-op threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = checkpoint.load(args.checkpoint)
    multitask = args.exports / "multitask.onnx"
    rows = []
    for k, info in enumerate(model.tasks, start=1):
        for threads in args.threads:
            sessions = {"dense": (cpu_session(args.exports / f"{info.name}.dense.onnx", threads), None),
                        "sparse": (cpu_session(args.exports / f"{info.name}.sparse.onnx", threads), None)}
            if multitask.exists():
                sessions["multitask"] = (cpu_session(multitask, threads), k - 1)
            for batch in args.batches:
                res = interleaved(sessions, model.image_size, batch, args.rounds)
                rows.append({"task": info.name, "threads": threads, "batch": batch, **res})
                print(f"{info.name} threads={threads} batch={batch}: dense {res['dense']['ms']:.3f} ms, "
                      + ", ".join(f"{g} {res[g]['ms']:.3f} ms ({res[g]['ratio']:.3f}x)"
                                  for g in sessions if g != "dense"), flush=True)
    args.out.write_text(json.dumps({
        "checkpoint": str(args.checkpoint), "arch": model.arch, "image_size": model.image_size,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "onnxruntime": onnxruntime.__version__},
        "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
