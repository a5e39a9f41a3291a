"""Do the exported files run on the runtimes edge users deploy to? The compatibility matrix.

Exports a checkpoint (default: the bundled sample) with ``packnet-export`` -- every task dense
and sparse, and the multitask graph in every layout -- then gives each file to each
runtime's own documented ONNX path, one fresh process per (runtime, file), with a timeout:

    onnxruntime-old   an older onnxruntime wheel (default 1.23.2) loading the .onnx
    ort-format        python -m onnxruntime.tools.convert_onnx_models_to_ort, then the .ort
    openvino          Core.read_model + compile_model(CPU, INFERENCE_PRECISION_HINT=f32)
    openvino-default  the same with OpenVINO's default precision (bf16 on AMX/AVX512-BF16 CPUs)
    tflite            onnx2tf (on a copy; local sample file, nothing downloaded) -> LiteRT
    ncnn              pnnx model.onnx inputshape=[1,3,H,W]f32 -> ncnn .param/.bin
    mnn               MNN's converter extension _tools.mnnconvert (never MNN.tools) -> MNN.nn
    tvm               tvm.relax.frontend.onnx.from_onnx -> tvm.compile(llvm) -> relax.VirtualMachine

Each cell records whether the file converts, loads and runs, max|diff| of the logits and
top-1 agreement against onnxruntime (the project's own, on the original file) on real test
images (``--images`` per task from ``DATA/<task>/test``, a seeded sample), batch-1 latency as
a ratio to onnxruntime timed in interleaved rounds inside the same process, and the peak
memory of loading and running. A crash (SIGSEGV) or a hang is a recorded cell, never the end
of the benchmark. Results go to ``benchmarks/results/edge_runtimes.json`` and the matrix into
``benchmarks/EDGE.md`` (between its generated-section markers).

The runtimes pin conflicting onnx / numpy / onnxruntime versions, so they live in their own
environments: ``benchmarks/edge_setup.sh DIR`` creates them, ``--edge-venv DIR`` uses them.
A runtime whose Python cannot import it is reported as "not installed".

    nice python benchmarks/edge_runtimes.py --edge-venv /work/edge-venv \\
        --data ../shared/data/finegrained-mini

Extra files (quantized exports, other checkpoints) join the matrix with ``--file PATH``;
their reference is onnxruntime on the same file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "edge_worker.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "finegrained-mini"
RUNTIMES = ["onnxruntime-old", "ort-format", "openvino", "openvino-default", "tflite", "ncnn", "mnn", "tvm"]
VENV_OF = {"onnxruntime-old": "ort-old", "tflite": "tf"}
"""Which environment of ``--edge-venv`` holds each runtime (``main`` for the others)."""
IMPORTS = {"onnxruntime-old": "onnxruntime", "ort-format": "onnxruntime", "openvino": "openvino",
           "openvino-default": "openvino", "tflite": "onnx2tf", "ncnn": "ncnn", "mnn": "MNN", "tvm": "tvm"}
RELATIVE_TOLERANCE = 1e-3
"""Same as validation on CPU: max|diff| <= 1e-3 x max(1, max|reference logit|)."""
BEGIN = "<!-- edge_runtimes.py: generated matrix, begin -->"
END = "<!-- edge_runtimes.py: generated matrix, end -->"


# ----------------------------------------------------------------- files
def export_files(args, work: Path) -> list[dict]:
    """Every file of the matrix: ``{"path", "kind", "task" | None}`` (kind: dense, sparse,
    multitask:<layout>, or file for ``--file``)."""
    exporter = Path(sys.executable).parent / "packnet-export"
    base = [str(exporter), "--all-tasks", "--no-validate", "--force", "--opset", str(args.opset), *args.export_arg]
    if args.checkpoint:
        base += ["--checkpoint", str(args.checkpoint)]
    files: list[dict] = []
    single = work / "export"
    run([*base, "--format", "dense", "-o", str(single)])
    run([*base, "--format", "sparse", "-o", str(single)])
    for path in sorted(single.glob("*.onnx")):
        task, kind, _ = path.name.rsplit(".", 2)
        files.append({"path": str(path), "kind": kind, "task": task})
    for layout in args.layouts:
        out = work / f"multitask-{layout}"
        run([*base, "--format", "multitask", "--multitask-layout", layout, "-o", str(out)])
        files.append({"path": str(out / "multitask.onnx"), "kind": f"multitask:{layout}", "task": None})
    for extra in args.file:
        files.append({"path": str(Path(extra).resolve()), "kind": "file", "task": None})
    if args.tasks:
        files = [f for f in files if f["task"] is None or f["task"] in args.tasks]
    return files


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def metadata(path: str) -> dict[str, str]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def task_images(meta: dict, task: str, data: Path | None, count: int) -> tuple[np.ndarray, str]:
    """``count`` test images of ``task`` (a seeded sample over all classes), preprocessed as
    evaluation does; seeded random inputs when the folder is absent."""
    size = json.loads(meta["packnet.input_size"])
    folder = data / task if data else None
    if folder and (folder / "test").is_dir():
        from packnet_export import data as data_mod

        split = data_mod.load_split(folder, "test", size[-1], json.loads(meta["packnet.mean"]),
                                    json.loads(meta["packnet.std"]))
        picks = sorted(random.Random(0).sample(range(len(split)), min(count, len(split))))
        xs = [split[i][0] for i in picks]
        xs = [x for x in xs if x is not None]
        return np.stack([np.asarray(x, dtype=np.float32) for x in xs]), "images"
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, *size), dtype=np.float32), "random"


def cases_of(entry: dict, meta: dict, data: Path | None, count: int) -> tuple[list[dict], dict, str]:
    """The worker's cases for a file (one per task it computes) and their inputs."""
    if meta.get("packnet.format") == "multitask":
        tasks = json.loads(meta["packnet.tasks"])
        counts = json.loads(meta["packnet.num_classes"])
        cases = [{"name": t, "task_index": i, "classes": counts[i]} for i, t in enumerate(tasks)]
    else:
        task = meta.get("packnet.task", entry["task"] or "task")
        cases = [{"name": task, "task_index": None, "classes": int(meta.get("packnet.num_classes", 0)) or None}]
    inputs, kinds = {}, set()
    for case in cases:
        inputs[case["name"]], kind = task_images(meta, case["name"], data, count)
        kinds.add(kind)
    return cases, inputs, "images" if kinds == {"images"} else "random"


def index_dtype(session) -> str:
    declared = next((i.type for i in session.get_inputs() if i.name == "task_index"), "tensor(int64)")
    return "float32" if declared == "tensor(float)" else "int64"


def reference(path: str, cases: list[dict], inputs: dict) -> tuple[dict, str]:
    """onnxruntime's logits (the project's own onnxruntime, CPU, batch 1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    out = {}
    for case in cases:
        x = inputs[case["name"]]
        rows = []
        for i in range(len(x)):
            feeds = {"input": x[i:i + 1]}
            if case["task_index"] is not None:
                feeds["task_index"] = np.array(case["task_index"], dtype=index_dtype(session))
            rows.append(session.run(["logits"], feeds)[0])
        out[case["name"]] = np.concatenate(rows)
    return out, ort.__version__, index_dtype(session)


# ----------------------------------------------------------------- cells
def python_for(runtime: str, args) -> str:
    for spec in args.python:
        name, _, path = spec.partition("=")
        if name == runtime:
            return path
    if args.edge_venv:
        return str(Path(args.edge_venv) / VENV_OF.get(runtime, "main") / "bin" / "python")
    return sys.executable


def importable(python: str, module: str) -> bool:
    if not Path(python).exists():
        return False
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120)
    return done.returncode == 0


def run_cell(runtime: str, python: str, entry: dict, cases: list[dict], inputs_path: Path, input_shape: list[int],
             index_dtype: str, work: Path, args) -> dict:
    """One (runtime, file) in a fresh process; a crash or a timeout is a result too."""
    cell_dir = work / "cells" / f"{runtime}-{Path(entry['path']).parent.name}-{Path(entry['path']).stem}"
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    job = {"runtime": runtime, "model": entry["path"], "workdir": str(cell_dir), "inputs": str(inputs_path),
           "cases": [{"name": c["name"], "task_index": c["task_index"]} for c in cases], "threads": args.threads,
           "input_shape": input_shape, "multitask": cases[0]["task_index"] is not None, "task_index_dtype": index_dtype,
           "rounds": args.rounds, "round_s": args.round_s}
    (cell_dir / "job.json").write_text(json.dumps(job))
    # the environment's bin/ first, as when it is activated: onnx2tf runs the `onnxsim` command
    # it installed, and without it skips its simplification (and then fails on sparse files)
    path = f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, PATH=path, TVM_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    try:
        done = subprocess.run([python, str(WORKER), str(cell_dir / "job.json")], capture_output=True, text=True,
                              timeout=args.timeout, env=env, cwd=cell_dir)
        code, stderr = done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        code = None
        stderr = ((exc.stdout or b"")[-3000:] + (exc.stderr or b"")[-3000:]).decode(errors="replace") \
            if isinstance(exc.stdout, bytes) or isinstance(exc.stderr, bytes) else str(exc.stderr or "")[-3000:]
    (cell_dir / "output.log").write_text(stderr)
    result = json.loads((cell_dir / "result.json").read_text()) if (cell_dir / "result.json").is_file() else {
        "stage": "start"}
    result["wall_s"] = time.perf_counter() - start
    if code is None:
        result["error"] = f"timed out after {args.timeout} s at stage {result['stage']}"
        result["status"] = "timeout"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        from edge_worker import first_error_line

        result["error"] = f"crashed ({name}) at stage {result['stage']}: {first_error_line(stderr)}"
        result["status"] = "crash"
    elif result.get("stage") != "done":
        result.setdefault("error", f"exited {code} at stage {result['stage']}")
        result["status"] = f"{result['stage']} failed"
    else:
        result["status"] = "ran"
    if result["status"] == "ran":
        logits = np.load(cell_dir / "logits.npz")
        result["logits"] = {k: logits[k] for k in logits.files}
    return result


def compare(result: dict, ref: dict, cases: list[dict]) -> None:
    """max|diff| and top-1 agreement against onnxruntime; sets status ok / differs."""
    if result["status"] != "ran":
        return
    diffs, agree, tol_ok, per_task = [], [], True, {}
    for case in cases:
        r = ref[case["name"]]
        c = case["classes"] or r.shape[1]
        r = r[:, :c]
        got = result["logits"][case["name"]]
        if got.shape != ref[case["name"]].shape and got.shape[1] < c:
            result["status"] = "differs"
            result["error"] = f"logits shape {list(got.shape)}, expected {list(ref[case['name']].shape)}"
            return
        got = got[:, :c]
        diff = float(np.abs(got - r).max()) if np.isfinite(got).all() else float("inf")
        tol = RELATIVE_TOLERANCE * max(1.0, float(np.abs(r).max()))
        top = float((got.argmax(1) == r.argmax(1)).mean())
        per_task[case["name"]] = {"max_abs_diff": diff, "tolerance": tol, "top1_agreement": top}
        diffs.append(diff)
        agree.append(top)
        tol_ok &= diff <= tol
    result.pop("logits")
    result["tasks"] = per_task
    result["max_abs_diff"] = max(diffs)
    result["top1_agreement"] = float(np.mean(agree))
    result["status"] = "ok" if tol_ok and min(agree) == 1.0 else "differs"


# ----------------------------------------------------------------- report
def kind_label(kind: str) -> str:
    return f"multitask `{kind.split(':', 1)[1]}`" if kind.startswith("multitask:") else kind


def summarize(cells: list[dict], runtime: str, kind: str) -> str:
    mine = [c for c in cells if c["runtime"] == runtime and c["kind"] == kind]
    if not mine:
        return "-"
    ok = [c for c in mine if c["status"] == "ok"]
    bad = [c for c in mine if c["status"] != "ok"]
    ratios = [c["ratio_to_onnxruntime"] for c in mine if c.get("ratio_to_onnxruntime")]
    ran = [c for c in mine if "max_abs_diff" in c]
    parts = []
    if len(mine) > 1:
        parts.append(f"{'ok' if not bad else 'FAIL'} {len(ok)}/{len(mine)}")
    else:
        parts.append("ok" if ok else "FAIL")
    if ran:
        parts.append(f"diff {max(c['max_abs_diff'] for c in ran):.1e}")
        parts.append(f"top-1 {100 * min(c['top1_agreement'] for c in ran):.1f}%")
    if ratios:
        parts.append(f"{np.median(ratios):.2f}x")
    text = ", ".join(parts)
    if bad:
        first = bad[0]
        text += f": {first['status']}: `{_md(first.get('error', ''))[:160]}`"
    return text


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def markdown(report: dict) -> str:
    cells, kinds = report["cells"], report["kinds"]
    partial = report.get("files_done", report.get("files")) != report.get("files")
    when = f"Generated {report['date']} by" if not partial else \
        f"PARTIAL: {report['files_done']} of {report['files']} files measured, {report['date']}, by"
    lines = [BEGIN, "", when, "", f"    {report['command']}", "",
             f"Machine: {report['machine']}. Reference: onnxruntime {report['reference']} (CPU) on the original "
             f"file; inputs: {report['inputs']} ({report['images']} per task); opset {report['opset']}; "
             f"{report['threads']} thread(s) per runtime.", "",
             "Each cell: ok (converted, loaded, ran; max|diff| <= 1e-3 x max(1, max|logit|) and top-1 "
             "agreement 100% on every task) or FAIL with the first failure quoted; then the largest max|diff|, "
             "the lowest top-1 agreement, and the median batch-1 latency ratio to onnxruntime (measured in "
             "interleaved rounds in the same process).", "",
             "| runtime | version | " + " | ".join(kind_label(k) for k in kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for runtime in report["runtimes"]:
        info = report["versions"].get(runtime, "not installed")
        row = [summarize(cells, runtime, k) for k in kinds]
        lines.append(f"| {runtime} | {_md(info)} | " + " | ".join(row) + " |")
    lines += ["", "Per file (peak = highest RSS during load and run, minus RSS before load; size = the "
              "runtime's own file):", "",
              "| runtime | file | status | max\\|diff\\| | top-1 | latency (ms) | ratio | peak (MB) | size (MB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        name = f"{c['task']}.{c['kind']}" if c["task"] else c["file"] if c["kind"] == "file" else kind_label(c["kind"])
        diff = f"{c['max_abs_diff']:.1e}" if "max_abs_diff" in c else "-"
        top = f"{100 * c['top1_agreement']:.1f}%" if "top1_agreement" in c else "-"
        lat = f"{c['latency_ms']:.2f}" if c.get("latency_ms") else "-"
        ratio = f"{c['ratio_to_onnxruntime']:.2f}" if c.get("ratio_to_onnxruntime") else "-"
        peak = f"{c['peak_mb']:.0f}" if c.get("peak_mb") is not None else "-"
        size = f"{c['converted_bytes'] / 1e6:.2f}" if c.get("converted_bytes") else "-"
        status = c["status"] + (f": `{_md(c['error'])[:200]}`" if c.get("error") and c["status"] != "ok" else "")
        if c.get("precision"):
            status += f" ({c['precision']})"
        lines.append(f"| {c['runtime']} | {name} | {status} | {diff} | {top} | {lat} | {ratio} | {peak} | {size} |")
    lines += ["", END]
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else "# Edge runtimes\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {platform.machine()} {platform.system()} ({cpu or 'unknown CPU'}), no GPU used"


def layouts_default() -> list[str]:
    from packnet_export.exporter import LAYOUTS

    return list(LAYOUTS)


def _shown(script: str) -> str:
    path = Path(script).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the bundled sample")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--export-arg", action="append", default=[],
                    help="extra packnet-export argument (repeat), e.g. --export-arg=--ir-version --export-arg=8")
    ap.add_argument("--layouts", nargs="*", help="multitask layouts (default: all)")
    ap.add_argument("--tasks", nargs="*", help="only these tasks' dense/sparse files")
    ap.add_argument("--file", action="append", default=[], help="an extra .onnx file for the matrix (repeat)")
    ap.add_argument("--runtimes", nargs="*", default=RUNTIMES, choices=RUNTIMES)
    ap.add_argument("--edge-venv", type=Path, help="folder of the environments made by benchmarks/edge_setup.sh")
    ap.add_argument("--python", action="append", default=[], metavar="RUNTIME=PYTHON",
                    help="the Python that runs RUNTIME (overrides --edge-venv)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder roots DATA/<task>/test")
    ap.add_argument("--images", type=int, default=64, help="test images per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-s", type=float, default=0.1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ap.add_argument("--work", type=Path, help="keep converted files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "edge_runtimes.json")
    ap.add_argument("--markdown", type=Path, default=HERE / "EDGE.md")
    args = ap.parse_args()
    args.layouts = args.layouts if args.layouts is not None else layouts_default()
    data = args.data if args.data and args.data.is_dir() else None
    if data is None:
        print(f"{args.data} is absent: seeded random inputs instead of test images", file=sys.stderr)
    sys.path.insert(0, str(HERE))

    temp = None if args.work else tempfile.TemporaryDirectory(prefix="edge-runtimes-")
    work = args.work or Path(temp.name)
    work.mkdir(parents=True, exist_ok=True)
    files = export_files(args, work)
    versions, pythons = {}, {}
    for runtime in args.runtimes:
        python = python_for(runtime, args)
        if importable(python, IMPORTS[runtime]):
            pythons[runtime] = python
        else:
            print(f"{runtime}: {python} cannot import {IMPORTS[runtime]}; reported as not installed", file=sys.stderr)
    cells = []
    ref_version = inputs_kind = None
    kinds = list(dict.fromkeys(f["kind"] for f in files))  # the matrix's columns: dense, sparse, multitask...
    done = 0

    def save() -> None:
        """The report so far, rewritten after every file: an interrupted run keeps what it measured."""
        report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": "python " + " ".join([_shown(sys.argv[0]), *sys.argv[1:]]),
                  "machine": machine(), "reference": ref_version, "inputs": inputs_kind, "images": args.images,
                  "opset": args.opset, "threads": args.threads, "runtimes": args.runtimes, "kinds": kinds,
                  "versions": versions, "cells": cells, "files_done": done, "files": len(files)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
        write_markdown(args.markdown, markdown(report))

    # the multitask graphs first: one file each, and the ones most likely to fail somewhere
    for entry in sorted(files, key=lambda f: not f["kind"].startswith("multitask:")):
        meta = metadata(entry["path"])
        cases, inputs, inputs_kind = cases_of(entry, meta, data, args.images)
        inputs_path = work / "inputs" / f"{Path(entry['path']).parent.name}-{Path(entry['path']).stem}.npz"
        inputs_path.parent.mkdir(exist_ok=True)
        np.savez(inputs_path, **inputs)
        ref, ref_version, dtype = reference(entry["path"], cases, inputs)
        shape = [1, *json.loads(meta["packnet.input_size"])]
        for runtime in args.runtimes:
            if runtime not in pythons:
                continue
            t = time.perf_counter()
            result = run_cell(runtime, pythons[runtime], entry, cases, inputs_path, shape, dtype, work, args)
            compare(result, ref, cases)
            if result.get("version"):
                versions[runtime] = result["version"]
            result.update(runtime=runtime, kind=entry["kind"], task=entry["task"], file=Path(entry["path"]).name)
            result.pop("traceback", None)
            cells.append(result)
            print(f"{runtime:17s} {entry['task'] or '-':8s} {entry['kind']:24s} {result['status']:13s} "
                  f"{time.perf_counter() - t:6.1f}s {result.get('error', '')[:150]}", flush=True)
        done += 1
        save()
    print(f"wrote {args.json} and {args.markdown}")
    if temp:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
