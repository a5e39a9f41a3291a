"""The ``portable`` multitask layout on backbones other than the sample's, through the edge runtimes.

The sample is vgg_mini (plain 3x3 convolutions, a Linear head). This script builds two-task
PackNet models of backbones with the other layer kinds the layout rewrites -- squeezenet1_1 (a
1x1 convolution head), mobilenet_v3_small (depthwise and squeeze-excitation convolutions,
hardswish, a masked Linear in the classifier), resnet18 (strided and 1x1 downsampling
convolutions, residual adds) -- with the test suite's synthetic two-task cycle
(``tests/test_architectures.py: Cycle``: 32 px images, a few training steps, task 1 pruned),
exports each as ``<arch>.portable.onnx``, checks it against PyTorch with onnxruntime, and runs
``edge_runtimes.py --file`` on the files (random inputs: the tasks are synthetic).

    nice python benchmarks/edge_backbones.py --edge-venv /work/edge-venv \\
        --runtimes onnxruntime-old tflite ncnn mnn openvino

Results: ``benchmarks/results/edge_backbones.json`` and ``benchmarks/EDGE-backbones.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHS = ["squeezenet1_1", "mobilenet_v3_small", "resnet18"]


def build(arch: str, folder: Path) -> Path:
    """``folder/<arch>.portable.onnx`` of a synthetic two-task model, validated with onnxruntime."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_architectures import Cycle  # the suite's synthetic cycle: same data, same steps

    from packnet_export.exporter import pipeline, validation

    cycle = Cycle(arch, 32, folder / "cycle")
    (written,) = pipeline.export(cycle.two, folder / "cycle" / "portable", [1, 2], ["multitask"],
                                 layout="portable", force=True)
    result = validation.validate_file(written.path, cycle.two, measure_latency=False)
    if not result["passed"]:
        raise SystemExit(f"{arch}: the portable file does not match PyTorch on onnxruntime: {result}")
    path = folder / f"{arch}.portable.onnx"
    written.path.replace(path)
    print(f"{arch}: {path} ({path.stat().st_size / 1e6:.2f} MB), matches PyTorch on onnxruntime", flush=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", default=ARCHS)
    ap.add_argument("--edge-venv", type=Path, required=True, help="as for edge_runtimes.py")
    ap.add_argument("--runtimes", nargs="*", help="default: every runtime of edge_runtimes.py")
    ap.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    temp = None if args.work else tempfile.TemporaryDirectory(prefix="edge-backbones-")
    work = args.work or Path(temp.name)
    files = [build(arch, work / arch) for arch in args.archs]
    results = HERE / "results" / "edge_backbones.json"
    command = [sys.executable, str(HERE / "edge_runtimes.py"), "--edge-venv", str(args.edge_venv), "--layouts",
               "--tasks", "none", "--work", str(work / "matrix"), "--json", str(results),
               "--markdown", str(HERE / "EDGE-backbones.md")]
    command += [x for f in files for x in ("--file", str(f))]
    if args.runtimes:
        command += ["--runtimes", *args.runtimes]
    done = subprocess.run(command)
    if temp:
        temp.cleanup()
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
