"""The export formats, the opset range and the multi-task layouts: one registry, one check each.

The command line's choices, the storage report's file kinds and the docs read this module,
which imports nothing heavy (no torch, no onnx), so ``--help`` can list the choices without
loading the exporter. Each format's writer lives in its own module (``dense``, ``sparse``,
``multitask``), reached through :meth:`Format.writer` and called the same way:
``write(context, task, path) -> ExportedFile``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import PackNetError, ParameterError

DEFAULT_OPSET = 18
MIN_OPSET = 13
"""CumSum (11), Split with sizes as an input, ReduceSum/Unsqueeze with axes as an input,
Pad with pads as an input (13): the sparse and multi-task decodes need them."""
MAX_OPSET = 20
"""The newest opset the torch (TorchScript) exporter writes."""

LAYOUTS = ("branches", "runtime-mask", "portable")
"""Multi-task graph layouts: ``branches`` (dense speed, one weight set per task in memory
once loaded), ``runtime-mask`` (one weight set, masked on every call) and ``portable``
(like runtime-mask, built only of operators every measured edge converter handles)."""
DEFAULT_LAYOUT = "branches"
BRANCHES_MIN_OPSET = 16
"""Below opset 16 onnxruntime optimizes nothing inside the ``If`` branches (no folding of
the masks, no batch-norm fusion): ``branches`` ran 2.3-4.6x the dense graph at opsets 13-15
and 1.1-1.3x at 16 and 18 (sample, batch 1, one run; ``docs/multitask.md``)."""

PRECISIONS = ("fp32", "fp16", "int8")
"""Number formats of the weights: fp32 (as trained), fp16 (half the storage; computes in
float16 where the hardware does), int8 (QDQ static quantization, calibrated on each task's
training images; see ``quantization``)."""
DEFAULT_PRECISION = "fp32"
DEFAULT_CALIBRATION_IMAGES = 256
"""int8: training images per task that calibrate the activations (a fixed, seeded choice)."""
ACTIVATION_TYPES = ("uint8", "int8")
"""int8 files: the type of the quantized activations, both asymmetric (per-tensor scale and
zero point): uint8, what onnxruntime's x86 kernels run fastest (VNNI, AMX), or int8, the
scheme of TFLite's int8 models, which ARM CPUs, NPUs and DSPs run."""
DEFAULT_ACTIVATION_TYPE = "uint8"
DEFAULT_MAX_ACCURACY_DROP = 1.0
"""Top-1 points an int8 file may lose against the fp32 PyTorch model before it fails."""

PROVIDERS = ("auto", "cuda", "cpu")
"""Where validation runs: ``auto`` (CUDA when it really runs, else the CPU with a notice),
``cuda`` (an error when CUDA cannot run) or ``cpu``."""


@dataclass(frozen=True)
class Format:
    name: str
    per_task: bool
    """One file per task (``<task>.<name>.onnx``), else one file for all tasks (``<name>.onnx``)."""
    module: str
    """The module of this package whose ``write(context, task, path)`` writes the file."""
    summary: str

    def file_name(self, task: str | None = None, precision: str = "fp32") -> str:
        """``<task>.<format>.onnx`` or ``<format>.onnx``; other precisions than fp32 add theirs
        before the extension (``cars.dense.int8.onnx``, ``multitask.fp16.onnx``)."""
        stem = f"{task}.{self.name}" if self.per_task else self.name
        return f"{stem}.onnx" if precision == DEFAULT_PRECISION else f"{stem}.{precision}.onnx"

    def writer(self):
        """The format's ``write`` function (imports the exporter: torch and onnx)."""
        return importlib.import_module(f"{__package__}.{self.module}").write


REGISTRY: dict[str, Format] = {f.name: f for f in (
    Format("dense", True, "dense", "one plain graph per task; runs on any runtime"),
    Format("sparse", True, "sparse", "stores only the weights the task uses (+1 bit per weight); onnxruntime "
           "rebuilds the dense weights when it loads the file"),
    Format("multitask", False, "multitask", "every task in one graph; inputs input and task_index"),
)}
FORMATS = tuple(REGISTRY)
ALL = "all"
"""The format choice that means every format."""
FORMAT_CHOICES = (*FORMATS, ALL)


def resolve_formats(formats: str | Iterable[str]) -> list[str]:
    """Format names in registry order, ``"all"`` expanded; an unknown name is an error."""
    names = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in names if f not in FORMAT_CHOICES]
    if unknown:
        raise ParameterError("formats", f"unknown format {unknown[0]!r} in $formats; choose one of: "
                             f"{', '.join(FORMAT_CHOICES)}")
    if ALL in names:
        return list(FORMATS)
    return [f for f in FORMATS if f in names]


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ParameterError("opset", f"$opset {opset} is too old for these graphs: they need opset {MIN_OPSET} "
                             f"or newer (CumSum, Split with sizes as an input); the default is {DEFAULT_OPSET}")
    if opset > MAX_OPSET:
        raise ParameterError("opset", f"$opset {opset} is newer than the torch exporter writes (at most {MAX_OPSET})")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ParameterError("layout", f"unknown $layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ParameterError("precision", f"unknown $precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def check_activation_type(activation_type: str, formats: Iterable[str] = ()) -> None:
    """``activation_type`` is known, and int8 only for the per-task files: onnxruntime (1.31,
    x86) fuses no int8-activation convolution inside the multitask graph's ``If`` branches,
    which would then run dequantized, in float (measured 53x slower on the sample)."""
    if activation_type not in ACTIVATION_TYPES:
        raise ParameterError("activation_type", f"unknown $activation_type {activation_type!r}; choose one of: "
                             f"{', '.join(ACTIVATION_TYPES)}")
    if activation_type == "int8" and "multitask" in formats:
        raise ParameterError("activation_type", "$activation_type int8 applies to the dense and sparse files only "
                             "(onnxruntime runs the multitask graph's int8-activation convolutions in float); "
                             "export the multitask graph with uint8 activations")


def check_layout_precision(layout: str, precision: str) -> None:
    """``portable`` is fp32 only: the fp16 conversion casts its float32 ``task_index`` input too,
    and the graph it writes fails the ONNX checker (nodes out of order)."""
    if layout == "portable" and precision != DEFAULT_PRECISION:
        raise ParameterError("precision", f"the multitask layout 'portable' is written in fp32 only, not "
                             f"{precision}; export it with $precision fp32 (or fp16/int8 dense or sparse files "
                             "per task)")


def check_layout_opset(layout: str, opset: int) -> None:
    """``branches`` needs opset 16: older ones lose onnxruntime's optimizations inside ``If``."""
    if layout == "branches" and opset < BRANCHES_MIN_OPSET:
        raise ParameterError("opset", f"the multitask layout 'branches' needs opset {BRANCHES_MIN_OPSET} or newer "
                             f"(at opset {opset} onnxruntime leaves its branches unoptimized, 2-5x slower); pass "
                             f"$opset {BRANCHES_MIN_OPSET} or newer, or $layout runtime-mask or portable")


def check_has_tasks(model) -> None:
    """A checkpoint made by ``packnet init`` has no task to export yet."""
    if not model.tasks:
        raise PackNetError("the checkpoint has no tasks yet; add one with `packnet add-task`")
