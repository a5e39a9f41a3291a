"""An export from start to finish: check everything, trace once, write every file.

Every check that can fail (formats, layout, opset, tasks, finite weights, existing files,
the output folder) runs before the first file is written; the torch trace is made once, on
the first file, and shared by all of them (see ``template.ExportContext``).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .. import checkpoint
from ..checkpoint import PackNet
from ..errors import PackNetError, ParameterError
from .calibration import DEFAULT_CALIBRATION_IMAGES
from .formats import (
    DEFAULT_ACTIVATION_TYPE,
    DEFAULT_LAYOUT,
    DEFAULT_OPSET,
    DEFAULT_PRECISION,
    REGISTRY,
    check_activation_type,
    check_has_tasks,
    check_layout,
    check_layout_opset,
    check_layout_precision,
    check_opset,
    check_precision,
    resolve_formats,
)
from .template import ExportContext
from .writer import ExportedFile, flat_pieces, ir_version_for

SAMPLE_CHECKPOINT = Path(str(importlib.resources.files("packnet_export.samples") / "packnet-6task.safetensors"))
"""The six-task sample: ``samples/`` in the repository, package data once installed."""
DEFAULT_OUTPUT = Path("exports")


def sample_checkpoint() -> Path:
    """The bundled six-task sample, used when no checkpoint is given."""
    if not SAMPLE_CHECKPOINT.is_file():
        raise ParameterError("model_or_path", f"no $model_or_path given and the bundled sample "
                             f"{SAMPLE_CHECKPOINT} is missing; pass $model_or_path CKPT")
    return SAMPLE_CHECKPOINT


def load_source(ckpt: Path | None) -> tuple[PackNet, Path, str]:
    """The model to export (the bundled sample without ``ckpt``), its path and sha256."""
    path = ckpt if ckpt is not None else sample_checkpoint()
    model = checkpoint.load(path)
    return model, path, checkpoint.file_sha256(path)


def check_finite(model: PackNet) -> None:
    """A weight that is NaN or Inf would export silently and compute garbage: refuse it."""
    tensors = [(k, t) for k, t in model.shared.items()]
    tensors += [(f"task {t.name}: {k}", v) for t, ts in zip(model.tasks, model.task_tensors) for k, v in ts.items()]
    for key, t in tensors:  # piece by piece: a whole boolean copy of vgg16's fc6 would be 103 MB
        if t.is_floating_point() and not all(bool(torch.isfinite(p).all()) for (p,) in flat_pieces(t)):
            raise PackNetError(f"weight {key} holds NaN or Inf values; nothing was exported")


def output_paths(out_dir: Path, model: PackNet, tasks: list[int], formats: Iterable[str],
                 precision: str = DEFAULT_PRECISION) -> list[tuple[str, int | None, Path]]:
    """``(format, task, path)`` of every file an export writes: the per-task files of each task
    (``<task>.<format>.onnx``), then the files of all tasks (``multitask.onnx``); with a
    precision other than fp32, ``<task>.<format>.<precision>.onnx``."""
    chosen = [REGISTRY[f] for f in formats]
    plan: list[tuple[str, int | None, Path]] = [
        (f.name, k, out_dir / f.file_name(model.tasks[k - 1].name, precision)) for k in tasks for f in chosen
        if f.per_task]
    plan += [(f.name, None, out_dir / f.file_name(None, precision)) for f in chosen if not f.per_task]
    return plan


def prepare_output(out_dir: Path, paths: list[Path], force: bool) -> None:
    """Fail before any work when a file exists (without force) or the folder is not writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PackNetError(f"output folder {out_dir} is a file")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ParameterError("force", f"{existing[0]} exists{more}; pass $force to overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackNetError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PackNetError(f"output folder {out_dir} is not writable")


def calibration_sets(model: PackNet, tasks: list[int], formats: Iterable[str], calibration: Path | None,
                     count: int = DEFAULT_CALIBRATION_IMAGES, layout: str = DEFAULT_LAYOUT) -> dict:
    """The int8 calibration images of every task the export needs (all of them for the
    multi-task graph), task (1-based) -> ``calibration.CalibrationSet``; every int8 check
    runs here, before any file is written."""
    from .calibration import load_calibration
    from .multitask_int8 import check_supported

    formats = resolve_formats(formats)
    if "multitask" in formats:
        check_supported(model, layout)
    if "multitask" in formats:
        return load_calibration(model, list(range(1, len(model.tasks) + 1)), calibration, count,
                                " (the multitask graph calibrates every task: DIR/<task>/train/ for each)")
    return load_calibration(model, tasks, calibration, count)


def export(model: PackNet, out_dir: Path, tasks: list[int], formats: Iterable[str], opset: int = DEFAULT_OPSET,
           force: bool = False, source_sha256: str | None = None,
           progress: Callable[[str], None] | None = None, layout: str = DEFAULT_LAYOUT,
           ir_version: int | None = None, precision: str = DEFAULT_PRECISION,
           calibration: Path | dict | None = None, calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
           fp16_io: bool = False, activation_type: str = DEFAULT_ACTIVATION_TYPE) -> list[ExportedFile]:
    """Export ``tasks`` (1-based) of ``model`` in ``formats`` (``"all"`` for every one) to
    ``out_dir``; one torch trace in all. ``ir_version`` None writes the lowest the opset needs.

    ``precision``: fp32, fp16 (``fp16_io``: float16 inputs and outputs too) or int8, whose
    activations are calibrated on ``calibration_images`` training images of each task found
    in ``calibration`` (an ImageFolder root with ``train/``, or ``DIR/<task>/train/``; or the
    sets ``calibration_sets`` returned); the images are read before any file is written.
    ``activation_type``: int8 files' activations, uint8 (x86) or int8 (ARM, NPUs).
    """
    check_opset(opset)
    ir_version_for(opset, ir_version)
    check_precision(precision)
    formats = resolve_formats(formats)
    check_activation_type(activation_type, formats)
    if "multitask" in formats:
        check_layout(layout)
        check_layout_opset(layout, opset)
        check_layout_precision(layout, precision)
    check_has_tasks(model)
    check_finite(model)
    calibrated: dict = {}
    if precision == "int8":
        calibrated = calibration if isinstance(calibration, dict) else \
            calibration_sets(model, tasks, formats, calibration, calibration_images, layout)
    plan = output_paths(out_dir, model, tasks, formats, precision)
    prepare_output(out_dir, [p for _, _, p in plan], force)
    context = ExportContext(model, opset, source_sha256, layout, ir_version, precision, calibrated, fp16_io,
                            activation_type)
    written: list[ExportedFile] = []
    for fmt, task, path in plan:
        if progress:
            progress(f"writing {path}")
        if precision == DEFAULT_PRECISION:
            written.append(REGISTRY[fmt].writer()(context, task, path))
        else:
            from .precision import write

            written.append(write(context, fmt, task, path))
    return written
