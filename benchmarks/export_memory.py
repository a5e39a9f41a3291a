"""Peak memory of an export, measured in a fresh process per measurement.

What "peak memory of an export" means here (the issue's target is <= 3x the model's size):

* **baseline**: the RSS of a process that has imported torch, onnx, onnxruntime and
  packnet_export and created one onnxruntime session (the IR-version probe). This is a
  fixed cost of the tools (~300-400 MB), paid by any process that exports anything, and is
  reported separately, not counted against the model.
* **load**: the RSS added by ``checkpoint.load`` (the model in memory, ~1x).
* **export increase**: the highest RSS reached during ``pipeline.export(...)`` minus the RSS
  right before it (the model already loaded). The kernel's high-water mark (``VmHWM``) is
  reset right before the phase (``/proc/self/clear_refs`` = 5), so earlier peaks (imports,
  loading) are not counted in it. This is the number compared with 3x the model.
* **export + model**: the export's peak above the baseline, i.e. the model counted too.

The model's size is the checkpoint file's size (float32 weights, uint8 owner masks,
heads). With ``--validate``, the onnxruntime validation that the CLI runs after writing is
measured as a separate phase (its sessions hold the graph's weights after folding and
pre-packing, which is the runtime's memory, not the exporter's).

Usage::

    python benchmarks/export_memory.py CKPT [CKPT ...] [--formats dense sparse multitask] [--validate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_PROBE = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, REPO)
import torch, onnx, onnxruntime
torch.set_num_threads(1)
from packnet_export import checkpoint
from packnet_export.exporter import pipeline, validation

def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
def reset_peak():
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')

validation.probe_provider("cpu")  # imports onnxruntime and opens one session: a fixed cost
out = {"baseline_rss": status('VmRSS'), "import_peak": status('VmHWM')}
model = checkpoint.load(CKPT)
out["after_load_rss"] = status('VmRSS')
tasks = list(range(1, len(model.tasks) + 1))
with tempfile.TemporaryDirectory(dir=WORK) as tmp:
    reset_peak()
    out["before_export_rss"] = status('VmRSS')
    start = time.perf_counter()
    files = pipeline.export(model, Path(tmp), tasks, FORMATS, force=True)
    out["export_s"] = time.perf_counter() - start
    out["export_peak"] = status('VmHWM')
    out["after_export_rss"] = status('VmRSS')
    out["files"] = {f.path.name: f.bytes for f in files}
    if VALIDATE:
        reset_peak()
        before = status('VmRSS')
        for f in files:
            validation.validate_file(f.path, model, None if f.task is None else [f.task], "cpu",
                                     measure_latency=False)
        out["validate_increase"] = status('VmHWM') - before
print("RESULT " + json.dumps(out))
"""


def measure(ckpt: Path, formats: list[str], validate: bool = False, work: Path | None = None) -> dict:
    """One fresh process: baseline, load, and the export's peak (see the module docstring)."""
    code = (f"REPO = {str(REPO)!r}\nCKPT = {str(ckpt)!r}\nFORMATS = {formats!r}\nVALIDATE = {validate!r}\n"
            f"WORK = {str(work or ckpt.parent)!r}\n" + _PROBE)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"memory probe failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    size = ckpt.stat().st_size
    r["model_bytes"] = size
    r["formats"] = formats
    r["load_increase"] = r["after_load_rss"] - r["baseline_rss"]
    r["export_increase"] = r["export_peak"] - r["before_export_rss"]
    r["export_ratio"] = r["export_increase"] / size
    r["export_with_model"] = r["export_peak"] - r["baseline_rss"]
    r["export_with_model_ratio"] = r["export_with_model"] / size
    if "validate_increase" in r:
        r["validate_ratio"] = r["validate_increase"] / size
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--formats", nargs="+", default=["dense", "sparse", "multitask"])
    parser.add_argument("--each", action="store_true", help="One process per format as well as all together.")
    parser.add_argument("--validate", action="store_true", help="Also measure the onnxruntime validation.")
    args = parser.parse_args()
    mb = 1e6
    for ckpt in args.checkpoints:
        runs = [args.formats] + ([[f] for f in args.formats] if args.each and len(args.formats) > 1 else [])
        for formats in runs:
            r = measure(ckpt, formats, args.validate)
            line = (f"{ckpt.name} {'+'.join(formats)}: model {r['model_bytes'] / mb:.1f} MB, "
                    f"baseline {r['baseline_rss'] / mb:.0f} MB, load +{r['load_increase'] / mb:.1f} MB, "
                    f"export +{r['export_increase'] / mb:.1f} MB ({r['export_ratio']:.2f}x), "
                    f"export+model {r['export_with_model'] / mb:.1f} MB ({r['export_with_model_ratio']:.2f}x), "
                    f"{r['export_s']:.1f} s")
            if "validate_increase" in r:
                line += f", validation +{r['validate_increase'] / mb:.1f} MB ({r['validate_ratio']:.2f}x)"
            print(line, flush=True)
            print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
