"""Dense per-task graphs: the architecture's graph with the task's masked weights, runs anywhere.

Task k's file holds every prunable weight as task k computes with it (zero where the owner
is 0 or a later task), its own head and its batch-norm/bias tensors: a plain ONNX graph
that any runtime loads, the same size as a separate network.
"""

from __future__ import annotations

from pathlib import Path

from .template import ExportContext, task_skeleton, task_tensor, tensor_bytes
from .writer import ExportedFile, file_bytes, write_onnx


def write(context: ExportContext, task: int, path: Path) -> ExportedFile:
    """Write task ``task`` (1-based) of ``context.model`` to ``path`` as a dense graph."""
    model, template = context.model, context.template
    skeleton = task_skeleton(template, model, task, "dense", context.source_sha256, context.ir_version)
    keys = template.keys
    get = task_tensor(model, task)
    external = write_onnx(path, skeleton, ((k, get(k)) for k in keys), tensor_bytes(model, keys, task))
    return ExportedFile(path, "dense", model.tasks[task - 1].name, file_bytes(path, external), external)
