"""One cell of the edge-runtime matrix: convert one ONNX file with one runtime's own tool, run it.

Started by ``benchmarks/edge_runtimes.py`` in a fresh process per (runtime, file), with the
Python of the environment that holds that runtime (the runtimes pin conflicting versions of
onnx, numpy and onnxruntime, so they cannot share one environment with the project). Needs
numpy and the runtime only: it never imports packnet_export.

    python edge_worker.py JOB.json

JOB.json: ``runtime``, ``model`` (the exported .onnx, never modified: converters get a copy),
``workdir`` (private, writable), ``inputs`` (an .npz of float32 NCHW images, one array per
case), ``cases`` (``[{"name", "task_index"}]``; ``task_index`` null for a single-task file),
``threads``. Writes ``result.json`` (stage reached, error, versions, latency, memory, sizes)
and ``logits.npz`` (one array per case) into ``workdir``.

A crash (SIGSEGV in a native converter) kills only this process: the parent records it from
the exit status and the last lines of stderr. Side effects are contained here:

* onnx2tf rewrites its input file in place: it converts a copy inside ``workdir``; it also
  downloads sample images from the internet unless a file of that name is in the working
  directory: the worker writes one (the job's own images), so nothing is fetched.
* MNN's ``MNN.tools.mnnconvert`` wrapper pip-installs a telemetry package and posts to a
  remote log service: the worker calls the converter extension ``_tools.mnnconvert`` directly.
* OpenVINO computes in bf16 on CPUs with AMX/AVX512-BF16 unless told f32: ``openvino`` passes
  ``INFERENCE_PRECISION_HINT=f32``, ``openvino-default`` shows the default's effect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
"""The file onnx2tf downloads into its working directory when it is absent."""


class Stage(Exception):
    """A failure at a named stage (convert, load, run), with the runtime's own message."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def first_error_line(text: str) -> str:
    """The most informative line of a tool's output: the last one naming an error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        low = line.lower()
        if any(word in low for word in ("error", "exception", "failed", "not supported", "unsupported")):
            return line[:400]
    return (lines[-1] if lines else "")[:400]


def reset_peak() -> None:
    """Reset the kernel's RSS high-water mark, so VmHWM measures what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (``VmHWM``: the peak RSS, ``VmRSS``: now), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------- runtimes
class Runtime:
    """Convert (if the runtime has its own format), load, and run one image at a time."""

    name = ""

    def __init__(self, job: dict) -> None:
        self.job = job
        self.work = Path(job["workdir"])
        self.threads = int(job.get("threads", 1))
        self.converted: Path | None = None

    def version(self) -> str:
        raise NotImplementedError

    def index(self, task_index: int) -> np.ndarray:
        """``task_index`` in the file's declared type (float32 in the portable layout, else int64)."""
        return np.array(task_index, dtype=self.job.get("task_index_dtype", "int64"))

    def convert(self, model: Path) -> None:
        """Write the runtime's own file from ``model`` (a copy in the work dir)."""

    def load(self, model: Path) -> None:
        raise NotImplementedError

    def run(self, x: np.ndarray, task_index: int | None) -> np.ndarray:
        """Logits ``[1, C]`` of one NCHW image ``x`` ``[1, 3, H, W]``."""
        raise NotImplementedError

    def _tool(self, argv: list[str], what: str, cwd: Path | None = None) -> str:
        """Run a converter command; a non-zero exit is a convert failure with its message."""
        done = subprocess.run(argv, cwd=cwd or self.work, capture_output=True, text=True,
                              timeout=self.job.get("convert_timeout", 600))
        out = done.stdout + done.stderr
        (self.work / f"{what}.log").write_text(out)
        if done.returncode != 0:
            signal = f" (signal {-done.returncode})" if done.returncode < 0 else ""
            raise Stage("convert", f"{what} exited {done.returncode}{signal}: {first_error_line(out)}")
        return out


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def _session(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def load(self, model: Path) -> None:
        self.session = self._session(self.converted or model)
        self.input_names = {i.name for i in self.session.get_inputs()}

    def run(self, x, task_index):
        feeds = {"input": x}
        if task_index is not None:
            feeds["task_index"] = self.index(task_index)
        return self.session.run(["logits"], feeds)[0]


class OldOnnxRuntime(OnnxRuntime):
    """An older onnxruntime wheel (its own environment): does it load the file at all?"""

    name = "onnxruntime-old"


class OrtFormat(OnnxRuntime):
    """onnxruntime's own .ort format, written by its documented converter."""

    name = "ort-format"

    def convert(self, model):
        out = self.work / "ort"
        self._tool([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(model),
                    "--output_dir", str(out)], "convert_onnx_models_to_ort")
        found = sorted(out.glob("*.ort"))
        if not found:
            raise Stage("convert", "convert_onnx_models_to_ort wrote no .ort file")
        self.converted = found[0]


class OpenVino(Runtime):
    name = "openvino"
    precision: str | None = "f32"

    def version(self):
        import openvino as ov

        return ov.__version__.split("-")[0]

    def load(self, model):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": self.threads}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        # read_model is the runtime's ONNX frontend (no conversion tool, so no telemetry)
        compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.used_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.request = compiled.create_infer_request()
        self.names = [i.get_any_name() for i in compiled.inputs]
        self.logits = next(o for o in compiled.outputs if "logits" in o.get_names())

    def run(self, x, task_index):
        feeds = {"input": x}
        if task_index is not None:
            feeds["task_index"] = self.index(task_index)
        return np.array(self.request.infer(feeds)[self.logits])


class OpenVinoDefault(OpenVino):
    """OpenVINO with its default precision (bf16 on CPUs that have it)."""

    name = "openvino-default"
    precision = None


class Tflite(Runtime):
    """TFLite through onnx2tf, run with the LiteRT interpreter."""

    name = "tflite"

    def version(self):
        import onnx2tf

        try:
            from ai_edge_litert import __version__ as litert
        except ImportError:
            litert = "?"
        return f"onnx2tf {onnx2tf.__version__}, LiteRT {litert}"

    def convert(self, model):
        copy = self.work / "model.onnx"  # onnx2tf rewrites its input in place
        shutil.copyfile(model, copy)
        images = np.load(self.job["inputs"])
        sample = np.concatenate([images[k] for k in images.files])[:20].transpose(0, 2, 3, 1)
        np.save(self.work / ONNX2TF_SAMPLE, np.ascontiguousarray(sample, dtype=np.float32))
        cwd = os.getcwd()
        os.chdir(self.work)  # onnx2tf looks for (and would download) its sample file here
        try:
            import onnx2tf

            # -ois (overwrite_input_shape), not only -b: with -b 1 the inner shapes keep the
            # symbolic batch, and onnx2tf then leaves an NCHW tensor made by a Transpose (the
            # portable layout's convolutions) unconverted before MaxPool
            shape = ",".join(map(str, self.job["input_shape"]))  # [1, 3, H, W]
            onnx2tf.convert(input_onnx_file_path=str(copy), output_folder_path=str(self.work / "tf"),
                            non_verbose=True, batch_size=1, overwrite_input_shape=[f"input:{shape}"])
        except SystemExit as exc:  # onnx2tf calls sys.exit(1) after printing its error
            raise Stage("convert", f"onnx2tf exited {exc.code}") from None
        except Exception as exc:
            raise Stage("convert", f"onnx2tf: {type(exc).__name__}: {first_error_line(str(exc)) or exc!r}") from None
        finally:
            os.chdir(cwd)
        self.converted = self.work / "tf" / "model_float32.tflite"
        if not self.converted.is_file():
            raise Stage("convert", "onnx2tf wrote no model_float32.tflite")

    def load(self, model):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            from tensorflow.lite import Interpreter
        self.it = Interpreter(model_path=str(self.converted), num_threads=self.threads)
        self.it.allocate_tensors()
        ins = self.it.get_input_details()
        self.image = next(d for d in ins if len(d["shape"]) == 4)
        self.task = next((d for d in ins if len(d["shape"]) != 4), None)
        outs = self.it.get_output_details()
        self.out = next(d for d in outs if np.dtype(d["dtype"]) == np.float32)

    def run(self, x, task_index):
        self.it.set_tensor(self.image["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))  # NHWC
        if self.task is not None:
            self.it.set_tensor(self.task["index"], np.array(task_index, dtype=self.task["dtype"]).reshape(
                self.task["shape"]))
        self.it.invoke()
        return self.it.get_tensor(self.out["index"]).copy()


class Ncnn(Runtime):
    """ncnn through pnnx (the converter ncnn documents for ONNX files)."""

    name = "ncnn"

    def version(self):
        import ncnn

        try:
            from importlib.metadata import version
            pnnx = version("pnnx")
        except Exception:
            pnnx = "?"
        return f"pnnx {pnnx}, ncnn {ncnn.__version__}"

    def convert(self, model):
        copy = self.work / "model.onnx"  # pnnx writes its outputs next to its input
        shutil.copyfile(model, copy)
        size = self.job["input_shape"]
        pnnx = shutil.which("pnnx", path=str(Path(sys.executable).parent)) or "pnnx"
        # one input: its shape with batch 1; several (multitask): pnnx reads them from the file
        shape = [] if self.job.get("multitask") else [f"inputshape=[{','.join(map(str, size))}]f32"]
        # fp16=0: pnnx stores ncnn weights in fp16 by default, which is a precision choice, not conversion
        self._tool([pnnx, str(copy), *shape, "fp16=0"], "pnnx")
        self.param, self.bin = self.work / "model.ncnn.param", self.work / "model.ncnn.bin"
        if not self.param.is_file():
            raise Stage("convert", "pnnx wrote no model.ncnn.param")
        self.converted = self.bin
        lines = self.param.read_text().splitlines()
        self.inputs = [line.split()[1] for line in lines[2:] if line.split()[0] == "Input"]

    def load(self, model):
        import ncnn

        self.ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.num_threads = self.threads
        # ncnn stores and computes in fp16/bf16 where the CPU has it (AVX512-FP16 here): off, to
        # measure the conversion, not a precision choice (like OpenVINO's f32 hint)
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_bf16_packed"):
            if hasattr(self.net.opt, flag):
                setattr(self.net.opt, flag, False)
        if self.net.load_param(str(self.param)) != 0 or self.net.load_model(str(self.bin)) != 0:
            raise Stage("load", "ncnn.Net refused the .param/.bin")

    def run(self, x, task_index):
        with self.net.create_extractor() as ex:
            ex.input(self.inputs[0], self.ncnn.Mat(np.ascontiguousarray(x[0])).clone())
            if task_index is not None:
                if len(self.inputs) < 2:
                    raise Stage("run", "pnnx folded task_index away: the .param has a single input")
                ex.input(self.inputs[1], self.ncnn.Mat(np.array([task_index], dtype=np.float32)).clone())
            status, out = ex.extract("out0")
            if status != 0:
                raise Stage("run", f"ncnn extract returned {status}")
            return np.array(out).reshape(1, -1)


class Mnn(Runtime):
    name = "mnn"

    def version(self):
        import MNN

        return MNN.version() if hasattr(MNN, "version") else "?"

    def convert(self, model):
        import _tools  # MNN's converter extension; NOT MNN.tools.mnnconvert (telemetry, pip install)

        out = self.work / "model.mnn"
        ok = _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(model), "--MNNModel", str(out),
                                "--bizCode", "packnet"])
        if not ok or not out.is_file():
            raise Stage("convert", "mnnconvert reported failure")
        self.converted = out

    def load(self, model):
        import MNN.expr as F
        import MNN.nn as nn

        self.F = F
        names = ["input", "task_index"] if self.job.get("multitask") else ["input"]
        rt = nn.create_runtime_manager(({"backend": "CPU", "numThread": self.threads, "precision": "high"},))
        self.net = nn.load_module_from_file(str(self.converted), names, ["logits"], runtime_manager=rt)

    def run(self, x, task_index):
        F = self.F
        feeds = [F.const(np.ascontiguousarray(x), list(x.shape), F.NCHW)]
        if task_index is not None:
            index = self.index(task_index)
            if index.dtype == np.float32:
                feeds.append(F.const(index, [], F.NCHW, F.float))
            else:  # MNN computes int64 inputs as int32
                feeds.append(F.const(index.astype(np.int32), [], F.NCHW, F.int))
        out = self.net.forward(feeds)
        out = out[0] if isinstance(out, list) else out
        return np.array(out.read(), dtype=np.float32).reshape(1, -1)


class Tvm(Runtime):
    """TVM's Relax ONNX frontend, compiled for the host CPU (llvm)."""

    name = "tvm"

    def version(self):
        import tvm

        return tvm.__version__

    def convert(self, model):
        import onnx
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        shapes = {"input": list(self.job["input_shape"])}
        if self.job.get("multitask"):
            shapes["task_index"] = []
        try:
            mod = from_onnx(onnx.load(str(model)), shape_dict=shapes)
        except Exception as exc:
            raise Stage("convert", f"from_onnx: {type(exc).__name__}: {first_error_line(str(exc))}") from None
        try:
            mod = relax.transform.DecomposeOpsForInference()(mod)
            self.exe = tvm.compile(mod, target="llvm")
        except Exception as exc:
            raise Stage("convert", f"compile: {type(exc).__name__}: {first_error_line(str(exc))}") from None
        path = self.work / "model.so"
        self.exe.export_library(str(path))
        self.converted = path

    def load(self, model):
        import tvm
        from tvm import relax

        self.tvm = tvm
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.converted)), tvm.cpu())

    def run(self, x, task_index):
        tensor = self.tvm.runtime.tensor
        args = [tensor(np.ascontiguousarray(x))]
        if task_index is not None:
            args.append(tensor(self.index(task_index)))
        out = self.vm["main"](*args)
        if not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy()


RUNTIMES = {r.name: r for r in (OnnxRuntime, OldOnnxRuntime, OrtFormat, OpenVino, OpenVinoDefault, Tflite, Ncnn, Mnn,
                                Tvm)}


# ----------------------------------------------------------------- the cell
def baseline_session(model: Path, threads: int):
    """onnxruntime on the original file in this process, for an interleaved latency ratio."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]), ort.__version__
    except Exception:  # an old onnxruntime that refuses the file: no ratio, the cell says why
        return None, ort.__version__


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    work = Path(job["workdir"])
    model = Path(job["model"])
    result: dict = {"runtime": job["runtime"], "stage": "start"}
    runtime = RUNTIMES[job["runtime"]](job)

    def save() -> None:
        (work / "result.json").write_text(json.dumps(result, indent=1))

    try:
        result["version"] = runtime.version()
        result["stage"] = "convert"
        save()  # a crash from here on leaves the stage it reached
        start = time.perf_counter()
        runtime.convert(model)
        result["convert_s"] = time.perf_counter() - start
        if runtime.converted is not None:
            files = [runtime.converted]
            if isinstance(runtime, Ncnn):
                files.append(runtime.param)
            result["converted_bytes"] = sum(f.stat().st_size for f in files)
        result["stage"] = "load"
        save()
        reset_peak()
        before = status_mb("VmRSS")
        start = time.perf_counter()
        runtime.load(model)
        result["load_s"] = time.perf_counter() - start
        if hasattr(runtime, "used_precision"):
            result["precision"] = runtime.used_precision
        result["stage"] = "run"
        save()
        images = np.load(job["inputs"])
        logits = {}
        times = []
        for case in job["cases"]:
            x = images[case["name"]]
            rows = []
            for i in range(len(x)):
                t = time.perf_counter()
                rows.append(np.asarray(runtime.run(x[i:i + 1], case["task_index"]), dtype=np.float32).reshape(1, -1))
                times.append(time.perf_counter() - t)
            logits[case["name"]] = np.concatenate(rows)
        peak = status_mb("VmHWM")
        result["peak_mb"] = peak - before if peak is not None and before is not None else None
        np.savez(work / "logits.npz", **logits)
        result["stage"] = "done"
        result.update(latency(runtime, model, job, images, times))
    except Stage as exc:
        result["stage"] = exc.stage
        result["error"] = str(exc)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {first_error_line(str(exc)) or exc!r}"
        result["traceback"] = traceback.format_exc()[-2000:]
    save()
    return 0


def latency(runtime: Runtime, model: Path, job: dict, images, times: list[float]) -> dict:
    """Median batch-1 latency, and the ratio to onnxruntime timed in interleaved rounds here.

    Rounds alternate the runtime and onnxruntime on the same first images, so the load of a
    shared machine hits both alike; onnxruntime loads the original .onnx.
    """
    out = {"latency_ms": float(np.median(times) * 1e3)}
    if isinstance(runtime, OnnxRuntime) and runtime.converted is None:
        return out  # onnxruntime itself: no ratio to take
    base, base_version = baseline_session(model, runtime.threads)
    out["baseline"] = f"onnxruntime {base_version}" if base_version else None
    if base is None:
        return out
    case = job["cases"][0]
    x = images[case["name"]][:1]
    feeds = {"input": x}
    if case["task_index"] is not None:
        feeds["task_index"] = runtime.index(case["task_index"])
    ours, theirs = [], []
    for _ in range(job.get("rounds", 5)):
        for fn, into in ((lambda: runtime.run(x, case["task_index"]), ours),
                         (lambda: base.run(["logits"], feeds), theirs)):
            fn()
            t = time.perf_counter()
            n = 0
            while n < 3 or time.perf_counter() - t < job.get("round_s", 0.1):
                fn()
                n += 1
            into.append((time.perf_counter() - t) / n)
    out["ratio_to_onnxruntime"] = float(np.median(ours) / np.median(theirs))
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
