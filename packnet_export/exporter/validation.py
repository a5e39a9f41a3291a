"""Prove that an exported graph computes what the PyTorch model computes, with onnxruntime.

For each task in a file: the ONNX checker, one onnxruntime session on the requested
provider (the provider *really* used is read back from the session), the logits of a batch
(seeded random inputs, or real images with ``data``) compared with the PyTorch task module,
and the latency at batch 1.

Tolerance: ``max |onnx - torch| <= rel x max(1, max |torch|)`` with ``rel = 1e-3`` on CPU
and ``1e-2`` on CUDA (TF32 and other kernels round differently). Float32 graphs whose batch
norm onnxruntime fuses into the convolutions differ from PyTorch by ~1e-6 relative; a wrong
weight or mask shows up orders of magnitude above the tolerance. Top-1 agreement must be
100%; a sample whose two best PyTorch logits are closer than the tolerance (a numerical tie)
agrees when onnxruntime picks either of them.

fp16 files: ``rel = 1e-2`` on every provider (float16 keeps 11 significant bits; measured
~1e-3 relative on the sample). int8 files: no logit tolerance applies (quantization moves
every logit); the top-1 *accuracy* of the int8 graph is compared with the fp32 PyTorch
model's on real images (``data``'s ``test/``, else the calibration images, which are
training images), and the file fails when it loses more than ``max_accuracy_drop`` points.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import data as data_mod
from ..checkpoint import PackNet
from ..errors import PackNetError, ParameterError, ValidationFailed
from .formats import DEFAULT_MAX_ACCURACY_DROP, PROVIDERS

RELATIVE_TOLERANCE = {"CPUExecutionProvider": 1e-3, "CUDAExecutionProvider": 1e-2}
FP16_RELATIVE_TOLERANCE = 1e-2
RANDOM_BATCH = 8
LATENCY_RUNS = 20
LATENCY_BUDGET_S = 2.0


class ProviderUnavailable(ParameterError):
    """``provider="cuda"`` was asked for and CUDA cannot run the graph: never a silent CPU run."""

    exit_code = 1


@dataclass
class Session:
    session: object
    provider: str
    """The execution provider the session really runs on (first of ``get_providers()``)."""
    notice: str | None = None
    """One line explaining a fallback from CUDA to CPU under ``auto``."""


@contextlib.contextmanager
def _quiet_onnxruntime():
    """onnxruntime logs a failed CUDA provider load at error level; we report it ourselves."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def make_session(path: str | Path | bytes, provider: str = "auto", threads: int | None = None) -> Session:
    """An onnxruntime session on ``provider`` (auto, cuda or cpu), reporting the one really used."""
    import onnxruntime as ort

    source = path if isinstance(path, bytes) else str(path)
    if provider not in PROVIDERS:
        raise ParameterError("provider", f"unknown $provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    reason = None
    if provider != "cpu":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
        else:
            try:
                with _quiet_onnxruntime():
                    session = ort.InferenceSession(source, options,
                                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's own exception types
                reason = f"the session failed on CUDA ({str(exc).strip().splitlines()[0][:160]})"
            else:
                if session.get_providers()[0] == "CUDAExecutionProvider":
                    return Session(session, "CUDAExecutionProvider")
                reason = "the CUDA provider could not start (no usable GPU, driver or CUDA libraries)"
    if provider == "cuda":
        raise ProviderUnavailable("provider", f"$provider cuda: CUDA cannot be used: {reason}; "
                                  "use $provider auto or cpu to run on the CPU")
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValidationFailed(f"onnxruntime cannot load {path}: {str(exc).strip().splitlines()[0][:300]}") from None
    notice = f"CUDA is not usable ({reason}); running on CPU" if reason else None
    return Session(session, session.get_providers()[0], notice)


def probe_provider(provider: str) -> Session:
    """Open a one-node graph on ``provider``: fails (or notes the fallback) before any real work."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [value("x", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return make_session(probe.SerializeToString(), provider)


def check_onnx(path: str | Path) -> None:
    """The ONNX checker on the file (by path, so external data is followed)."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ValidationFailed(f"{path} fails the ONNX checker: {first[:300]}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's ``packnet.*`` metadata, after ``onnx_files.check_file`` (external data inside
    the model's folder, metadata consistent with the graph) and before onnx opens anything else."""
    from ..onnx_files import check_file

    return check_file(path).metadata


def file_tasks(meta: dict[str, str]) -> list[str]:
    """The tasks a file computes, in ``task_index`` order for a multi-task graph."""
    if meta.get("packnet.format") == "multitask":
        return list(json.loads(meta.get("packnet.tasks", "[]")))
    return [meta["packnet.task"]] if "packnet.task" in meta else []


# ----------------------------------------------------------------- inputs
def random_inputs(image_size: int, batch: int = RANDOM_BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def check_image_data(model: PackNet, task: int, data_dir: str | Path) -> data_mod.ImageFolderSplit:
    """The ``test/`` split of ``data_dir`` for ``task``: its classes, one readable image. Called
    before an export writes anything, so that a bad ``--data`` fails first."""
    from ..data_checks import check_split_classes

    split = data_mod.load_split(data_dir, "test", model.image_size, model.mean, model.std,
                                resize=model.tasks[task - 1].resize_mode)
    check_split_classes(Path(data_dir) / "test", split.classes, model.tasks[task - 1].classes,
                        model.tasks[task - 1].name)
    return split


def image_inputs(model: PackNet, task: int, data_dir: str | Path, limit: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images of ``data_dir`` (``DIR/test/<class>/``), preprocessed as the task's evaluation
    (its stored resize mode)."""
    split = check_image_data(model, task, data_dir)
    xs, ys = [], []
    for x, y, _ in data_mod.loader(split, batch_size=64):
        if x is not None:
            xs.append(x)
            ys.append(y)
        if limit and sum(len(b) for b in xs) >= limit:
            break
    if not xs:
        raise PackNetError(f"{data_dir}/test holds no readable image")
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------- running
def task_index_feed(session, task_index: int) -> np.ndarray:
    """``task_index`` as the graph declares it: int64, or float32 in the ``portable`` layout
    (ncnn, one of its targets, has float tensors only)."""
    declared = next((i.type for i in session.get_inputs() if i.name == "task_index"), "tensor(int64)")
    return np.array(task_index, dtype=np.float32 if declared == "tensor(float)" else np.int64)


def run_logits(session, x: np.ndarray, task_index: int | None = None, classes: int | None = None,
               batch: int = 64) -> np.ndarray:
    """Logits of ``x`` in batches; for a multi-task graph pass ``task_index`` (0-based)."""
    outs = []
    x = x.astype(input_dtype(session), copy=False)  # float16 for a file written with --fp16-io
    for start in range(0, len(x), batch):
        feeds = {"input": x[start:start + batch]}
        if task_index is not None:
            feeds["task_index"] = task_index_feed(session, task_index)
        outs.append(session.run(["logits"], feeds)[0].astype(np.float32, copy=False))
    logits = np.concatenate(outs)
    return logits[:, :classes] if classes is not None else logits


def input_dtype(session) -> np.dtype:
    """The type the session's ``input`` takes (float32, or float16 for an fp16-io file)."""
    kind = next(i.type for i in session.get_inputs() if i.name == "input")
    return np.dtype(np.float16) if kind == "tensor(float16)" else np.dtype(np.float32)


def accuracy_check(ours: np.ndarray, reference: np.ndarray, labels: np.ndarray, max_drop: float) -> dict:
    """An int8 graph's top-1 accuracy against the fp32 model's on the same labelled images."""
    quantized = float((ours.argmax(1) == labels).mean() * 100)
    fp32 = float((reference.argmax(1) == labels).mean() * 100)
    finite = bool(np.isfinite(ours).all())
    return {"accuracy": quantized, "accuracy_fp32": fp32, "accuracy_drop": fp32 - quantized,
            "max_accuracy_drop": max_drop, "top1_agreement": float((ours.argmax(1) == reference.argmax(1)).mean()),
            "samples": int(len(labels)), "finite": finite, "passed": finite and fp32 - quantized <= max_drop}


def torch_logits(model: PackNet, task: int, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    module = model.task_module(task)
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def compare(onnx_logits: np.ndarray, reference: np.ndarray, relative: float) -> dict:
    """Max abs difference, tolerance, and top-1 agreement (numerical ties count as agreeing)."""
    diff = float(np.abs(onnx_logits - reference).max()) if reference.size else 0.0
    tolerance = relative * max(1.0, float(np.abs(reference).max()) if reference.size else 1.0)
    ref_top = reference.argmax(1)
    onnx_top = onnx_logits.argmax(1)
    best = reference.max(1)
    picked = reference[np.arange(len(reference)), onnx_top]
    agree = (ref_top == onnx_top) | (best - picked <= tolerance)
    finite = bool(np.isfinite(onnx_logits).all())
    return {"max_abs_diff": diff, "tolerance": tolerance, "top1_agreement": float(agree.mean()) if len(agree) else 1.0,
            "samples": int(len(reference)), "finite": finite,
            "passed": finite and diff <= tolerance and bool(agree.all())}


def latency_ms(session, image_size: int, task_index: int | None = None, batch: int = 1,
               runs: int = LATENCY_RUNS, budget_s: float = LATENCY_BUDGET_S) -> float:
    """Median wall time of one call at ``batch``, after one warm-up call, within ``budget_s``."""
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    run_logits(session, x, task_index)
    times = []
    start = time.perf_counter()
    while len(times) < runs and (time.perf_counter() - start < budget_s or len(times) < 3):
        t = time.perf_counter()
        run_logits(session, x, task_index)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def validate_file(path: str | Path, model: PackNet | None = None, tasks: list[str] | None = None,
                  provider: str = "auto", data: dict[str, Path] | None = None, check: bool = True,
                  measure_latency: bool = True, calibration: dict | None = None,
                  max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP) -> dict:
    """Check ``path`` and compare each task it computes with ``model`` (when given).

    Returns a report: provider, notice, and per task: max_abs_diff, tolerance,
    top1_agreement, latency_ms, accuracy (with ``data``: task name -> ImageFolder root, whose
    ``test/`` images replace the random inputs), passed. An int8 file is judged by accuracy
    instead (``accuracy_check``), on ``data`` or else on ``calibration`` (task name ->
    ``calibration.CalibrationSet``). Raises only for
    problems of the input (``PackNetError``) or an unusable provider; a wrong graph is a
    report with ``passed: False``.
    """
    meta = read_metadata(path)
    if check:
        check_onnx(path)
    names = file_tasks(meta)
    multitask = meta.get("packnet.format") == "multitask"
    if tasks is not None:
        missing = [t for t in tasks if t not in names]
        if missing:
            raise PackNetError(f"{path} computes {', '.join(names) or 'no named task'}, not {missing[0]!r}")
        names = list(tasks)
    size = json.loads(meta["packnet.input_size"])[-1] if "packnet.input_size" in meta else (
        model.image_size if model else None)
    if size is None:
        raise PackNetError(f"{path} carries no packnet.input_size metadata; it was not written by packnet-export")
    sess = make_session(path, provider)
    precision = meta.get("packnet.precision", "fp32")
    relative = FP16_RELATIVE_TOLERANCE if precision == "fp16" else RELATIVE_TOLERANCE.get(sess.provider, 1e-2)
    all_names = file_tasks(meta)
    results = []
    for name in names:
        index = all_names.index(name) if multitask else None
        entry: dict = {"task": name}
        if model is not None:
            k = model.task_number(name)
            classes = model.tasks[k - 1].num_classes
            labels = None
            inputs = "images"
            if data and name in data:
                x, labels = image_inputs(model, k, data[name])
            elif precision == "int8" and calibration and name in calibration:
                x, labels = torch.from_numpy(calibration[name].images), torch.from_numpy(calibration[name].labels)
                inputs = "calibration images"
            else:
                x, inputs = random_inputs(model.image_size), "random"
            ours = run_logits(sess.session, x.numpy(), index, classes if multitask else None)
            reference = torch_logits(model, k, x)
            if precision == "int8" and labels is not None:
                entry.update(accuracy_check(ours, reference, labels.numpy(), max_accuracy_drop))
            elif precision == "int8":  # no labelled image: agreement is shown, only finiteness can fail
                finite = bool(np.isfinite(ours).all())
                entry.update({"top1_agreement": float((ours.argmax(1) == reference.argmax(1)).mean()),
                              "samples": int(len(x)), "finite": finite, "passed": finite})
            else:
                entry.update(compare(ours, reference, relative))
            entry["inputs"] = inputs
            if labels is not None and "accuracy" not in entry:
                entry["accuracy"] = float((ours.argmax(1) == labels.numpy()).mean() * 100)
        else:
            counts = json.loads(meta.get("packnet.num_classes", "null"))
            classes = counts[index] if multitask and isinstance(counts, list) else None
            ours = run_logits(sess.session, random_inputs(size).numpy(), index, classes)
            entry.update({"finite": bool(np.isfinite(ours).all()), "inputs": "random", "reference": None})
            entry["passed"] = entry["finite"]
        if measure_latency:
            entry["latency_ms"] = latency_ms(sess.session, size, index)
        results.append(entry)
    return {"path": str(path), "format": meta.get("packnet.format"), "precision": precision, "provider": sess.provider,
            "notice": sess.notice, "compared": model is not None, "tasks": results,
            "passed": all(r["passed"] for r in results)}
