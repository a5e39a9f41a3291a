"""The fp16 and int8 files of every format: what ``--precision fp16|int8`` writes.

Each is made from the fp32 file's graph (``dense``, ``sparse``, ``multitask``):

* fp16: the fp32 graph, converted by onnxruntime's float16 converter (``quantization.to_fp16``);
* dense int8: the dense graph with batch norm folded, quantized by onnxruntime
  (``quantization.quantize_int8``) on the task's calibration images;
* sparse int8: the dense int8 graph with its int8 weights stored sparsely
  (``quantization.sparse_int8``);
* multitask int8: ``multitask_int8.build`` (one int8 tensor per layer shared by the tasks).

These graphs are built in memory (the quantizer works on a whole model), then written with
the streaming writer (atomic; external data for large models).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from . import multitask, quantization, sparse
from .template import ExportContext, task_skeleton, task_tensor
from .writer import ExportedFile, Streamed, as_array, file_bytes, set_ir_version, write_onnx

SIZE_TARGET_KEY = "packnet.size_target"
"""Metadata of the multitask int8 file: the bytes of its stored parts (``multitask_int8.Int8Multitask.budget``)."""
SIZE_SLACK = 1.05
"""The int8 size targets allow 5% over the stored bytes (graph structure, names, metadata)."""


def write(context: ExportContext, fmt: str, task: int | None, path: Path) -> ExportedFile:
    """Write ``fmt``'s file of ``task`` (None for the multi-task graph) at ``context.precision``."""
    if context.precision == "fp16":
        return _write_fp16(context, fmt, task, path)
    if fmt == "multitask":
        return _write_multitask_int8(context, path)
    return _write_int8(context, fmt, task, path)


def _mark(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    present = {p.key: p for p in proto.metadata_props}
    for key, value in meta.items():
        if key in present:
            present[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def _finish(proto: onnx.ModelProto, path: Path, fmt: str, task: int | None, context: ExportContext,
            size_bound: float | None = None, extra: dict | None = None) -> ExportedFile:
    set_ir_version(proto, context.ir_version)
    skeleton, tensors = quantization.split_initializers(proto)
    external = write_onnx(path, skeleton, tensors, sum(a.nbytes for _, a in tensors))
    name = context.model.tasks[task - 1].name if task is not None else None
    return ExportedFile(path, fmt, name, file_bytes(path, external), external, size_bound,
                        {"precision": context.precision, **(extra or {})})


def _materialized(skeleton: onnx.ModelProto, tensors) -> onnx.ModelProto:
    return quantization.float_model(skeleton, {name: quantization.materialize(t) for name, t in tensors})


def float_graph(context: ExportContext, fmt: str, task: int | None) -> onnx.ModelProto:
    """The fp32 file of ``fmt`` (and ``task``) as one in-memory model."""
    model, template = context.model, context.template
    if fmt == "dense":
        get = task_tensor(model, task)
        return _materialized(task_skeleton(template, model, task, "dense", context.source_sha256,
                                           context.ir_version),
                             ((k, get(k)) for k in template.keys))
    if fmt == "sparse":
        p = sparse.parts(context, task)
        return _materialized(p.skeleton, p.tensors())
    skeleton, tensors = multitask.multitask_parts(model, context.opset, context.layout, template=template,
                                                  source_sha256=context.source_sha256, ir_version=context.ir_version)
    return _materialized(skeleton, tensors)


def _write_fp16(context: ExportContext, fmt: str, task: int | None, path: Path) -> ExportedFile:
    half = quantization.to_fp16(float_graph(context, fmt, task), context.fp16_io)
    _mark(half, quantization.precision_metadata("fp16", fp16_io=context.fp16_io))
    return _finish(half, path, fmt, task, context)


def int8_dense(context: ExportContext, task: int) -> onnx.ModelProto:
    """Task ``task``'s dense graph, batch norm folded, quantized on its calibration images."""
    model, template = context.model, context.template
    skeleton = task_skeleton(template, model, task, "dense", context.source_sha256, context.ir_version)
    get = task_tensor(model, task)
    folded = quantization.fold_batch_norm(skeleton.graph, {k: quantization.materialize(get(k))
                                                           for k in template.keys})
    calibration = context.calibration[task]
    quantized = quantization.quantize_int8(quantization.float_model(skeleton, folded), calibration.images,
                                           activation_type=context.activation_type)
    del quantized.metadata_props[:]
    _mark(quantized, {p.key: p.value for p in skeleton.metadata_props})
    _mark(quantized, quantization.precision_metadata("int8", calibration.describe(),
                                                     activation_type=context.activation_type))
    return quantized


def _write_int8(context: ExportContext, fmt: str, task: int, path: Path) -> ExportedFile:
    if task not in context.quantized:  # one quantization serves the task's dense and sparse files;
        context.quantized = {task: int8_dense(context, task)}  # the files come task by task: keep one
    quantized = context.quantized[task]
    if fmt == "dense":
        return _finish(quantized, path, fmt, task, context)
    prunable = [k for k in context.template.keys if k in context.model.owners]
    packed = quantization.sparse_int8(quantized, prunable)
    _mark(packed.skeleton, {"packnet.format": "sparse"})
    proto = quantization.float_model(packed.skeleton, dict(packed.tensors))
    bound = SIZE_SLACK * (packed.nonzero + packed.weights / 8 + packed.other_bytes)
    return _finish(proto, path, fmt, task, context, bound,
                   {"nonzero_weights": packed.nonzero, "prunable_weights": packed.weights})


def _write_multitask_int8(context: ExportContext, path: Path) -> ExportedFile:
    from . import multitask_int8

    built = multitask_int8.build(context.model, context.template, context.calibration, context.opset,
                                 context.activation_type)
    skeleton = built.skeleton
    per_task = {context.model.tasks[k - 1].name: c.describe() for k, c in context.calibration.items()}
    _mark(skeleton, {"packnet.source_sha256": context.source_sha256 or "",
                     **quantization.precision_metadata("int8", {"tasks": per_task},
                                                        activation_type=context.activation_type),
                     # the size target's parts, for `packnet report --exports`
                     SIZE_TARGET_KEY: json.dumps(built.budget, separators=(",", ":"))})
    set_ir_version(skeleton, context.ir_version)
    total = sum(t.nbytes if isinstance(t, Streamed) else as_array(t).nbytes for _, t in built.tensors)
    external = write_onnx(path, skeleton, built.tensors, total)
    return ExportedFile(path, "multitask", None, file_bytes(path, external), external,
                        SIZE_SLACK * built.budget["total_bytes"], {"precision": "int8", **built.budget})
