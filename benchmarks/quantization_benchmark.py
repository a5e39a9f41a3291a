"""Quantization benchmark: size, accuracy and onnxruntime CPU latency of fp16 and int8 exports.

* The bundled sample (six tasks, vgg_mini at 48 px) with its real images
  (``../shared/data/finegrained-mini``): every format at fp32, fp16 and int8 (calibrated on
  ``--calibration-images`` training images per task), the size ratio of each file to its fp32
  counterpart, top-1 on each task's test images for the fp32 PyTorch model and the fp16 /
  int8 dense and int8 multitask files, and int8 / fp32 dense latency.
* Untrained networks of real size carrying the paper's masks (``export_benchmark.paper_masks``),
  calibrated on real training images resized to their input (accuracy means nothing there):
  size ratios and int8 / fp32 dense latency at batch 1 and ``--batch``.

Latency: the int8 and fp32 dense graphs of the same task timed interleaved, ``--rounds``
rounds, onnxruntime pinned to ``--threads`` intra-op threads (``export_benchmark.interleaved``).

Usage::

    nice python benchmarks/quantization_benchmark.py [--models sample resnet18] [--image-size 112]
        [--tasks 3] [--calibration-images 256] [--threads 1] [--rounds 7] [--batch 32] [--out FILE]
        [--data-root ../shared/data/finegrained-mini]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export_benchmark import cpu_session, interleaved, paper_masks  # noqa: E402

from packnet_export import checkpoint, data  # noqa: E402
from packnet_export.exporter import pipeline, validation  # noqa: E402
from packnet_export.exporter.calibration import CalibrationSet, calibration_images  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "finegrained-mini"
PRECISIONS = ("fp32", "fp16", "int8")


def cpu_flags() -> dict:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    return {flag: flag in flags for flag in wanted}


def export_all(model, out: Path, calibration: dict) -> dict[str, list]:
    tasks = list(range(1, len(model.tasks) + 1))
    files = {}
    for precision in PRECISIONS:
        start = time.perf_counter()
        written = pipeline.export(model, out, tasks, ["all"], precision=precision,
                                  calibration=calibration if precision == "int8" else None)
        files[precision] = (written, time.perf_counter() - start)
    return files


def sizes(files: dict) -> dict:
    """Bytes per format and precision (summed over tasks), and each ratio to fp32."""
    out: dict = {}
    for precision, (written, seconds) in files.items():
        for f in written:
            out.setdefault(f.format, {}).setdefault(precision, 0)
            out[f.format][precision] += f.bytes
        out.setdefault("export_seconds", {})[precision] = round(seconds, 2)
    for fmt, by in out.items():
        if fmt != "export_seconds":
            by.update({f"{p}_ratio": by[p] / by["fp32"] for p in PRECISIONS if p != "fp32"})
    for written, _ in files.values():
        for f in written:
            if f.size_bound is not None:
                out.setdefault("size_targets", []).append({"file": f.path.name, "bytes": f.bytes,
                                                           "target": round(f.size_bound),
                                                           "met": f.bytes <= f.size_bound})
    return out


def latency(files: dict, model, threads: int, rounds: int, batch: int) -> dict:
    """int8 and fp16 dense vs fp32 dense of the last task, interleaved, at batch 1 and ``batch``."""
    name = model.tasks[-1].name
    paths = {p: next(f.path for f in w if f.format == "dense" and f.task == name) for p, (w, _) in files.items()}
    sessions = {"dense" if p == "fp32" else p: (cpu_session(path, threads), None) for p, path in paths.items()}
    return {f"batch{b}": interleaved(sessions, model.image_size, b, rounds) for b in (1, batch)}


def accuracy(files: dict, model, root: Path) -> list[dict]:
    rows = []
    multitask = next(f.path for f in files["int8"][0] if f.format == "multitask")
    mt = cpu_session(multitask, 2)
    for k, info in enumerate(model.tasks, start=1):
        x, y = validation.image_inputs(model, k, root / info.name)
        labels = y.numpy()
        row = {"task": info.name, "test_images": int(len(labels)),
               "fp32_pytorch": float((validation.torch_logits(model, k, x).argmax(1) == labels).mean() * 100)}
        for precision in ("fp32", "fp16", "int8"):
            path = next(f.path for f in files[precision][0] if f.format == "dense" and f.task == info.name)
            ours = validation.run_logits(cpu_session(path, 2), x.numpy())
            row[f"{precision}_dense"] = float((ours.argmax(1) == labels).mean() * 100)
        ours = validation.run_logits(mt, x.numpy(), k - 1, info.num_classes)
        row["int8_multitask"] = float((ours.argmax(1) == labels).mean() * 100)
        row["int8_drop"] = row["fp32_pytorch"] - min(row["int8_dense"], row["int8_multitask"])
        rows.append(row)
    return rows


def random_calibration(model, count: int, root: Path) -> dict:
    """Real training images (the sample's first task), resized to the model's input: an untrained
    network has no images of its own, but its activations still need realistic ranges."""
    split = data.load_split(root / "cifar10", "train", model.image_size, model.mean, model.std)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).tolist()[:count]
    images = np.stack([split[i][0].numpy() for i in order])
    return {k: CalibrationSet(images, np.zeros(len(images), np.int64), root / "cifar10")
            for k in range(1, len(model.tasks) + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sample", "resnet18"])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantization.json"))
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the six tasks' ImageFolder roots")
    args = parser.parse_args()
    root = args.data_root
    if not root.is_dir():
        sys.exit(f"{root} is absent: the benchmark calibrates and measures accuracy on its images")
    import onnxruntime as ort

    # models measured by an earlier run stay in the file (each entry keeps its own command)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
                         "onnxruntime": ort.__version__}
    earlier = result.pop("command", None)
    for entry in result["models"].values():
        entry.setdefault("command", earlier)
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "sample":
                model = checkpoint.load(pipeline.SAMPLE_CHECKPOINT)
                calibration = {k: calibration_images(model, k, root / t.name, args.calibration_images)
                               for k, t in enumerate(model.tasks, start=1)}
            else:
                model = paper_masks(name, args.image_size, args.tasks)
                calibration = random_calibration(model, min(args.calibration_images, 64), root)
            files = export_all(model, Path(tmp), calibration)
            entry = {"command": " ".join(sys.argv), "arch": model.arch, "image_size": model.image_size,
                     "tasks": len(model.tasks),
                     "calibration_images": int(len(calibration[1].images)), "sizes": sizes(files),
                     "latency": latency(files, model, args.threads, args.rounds, args.batch)}
            if name == "sample":
                entry["accuracy"] = accuracy(files, model, root)
            result["models"][name] = entry
            print(json.dumps({name: entry}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
