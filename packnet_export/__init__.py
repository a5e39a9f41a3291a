"""packnet-export: PackNet multi-task networks, trained once and exported to ONNX per task.

The public API (keyword-only functions, results as dataclasses; ``docs/python-api.md``)::

    import packnet_export as pn
    model = pn.create("vgg_mini", image_size=32)
    added = pn.add_task(model, "flowers", "data/flowers", pn.TrainConfig(epochs=2), output="model.safetensors")
    files = pn.export("model.safetensors", "exports", tasks=["flowers"], formats="all")

Importing the package is cheap (no torch): the functions import what they need, and the
model classes below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .api import (
    AddedTask,
    Evaluation,
    Inspection,
    LayerOwners,
    StorageReport,
    TaskCheck,
    TaskSummary,
    ValidationReport,
    add_task,
    create,
    evaluate,
    export,
    import_checkpoint,
    inspect,
    load,
    plan,
    report,
    save,
    validate,
)
from .errors import PackNetError, ParameterError, ValidationFailed

if TYPE_CHECKING:
    from .checkpoint import PackNet, TaskInfo
    from .exporter.writer import ExportedFile
    from .training import Observer, TrainConfig

__version__ = "0.1.0"
__all__ = ["AddedTask", "Evaluation", "ExportedFile", "Exports", "Inspection", "LayerOwners", "Observer", "PackNet",
           "PackNetError", "ParameterError", "StorageReport", "TaskCheck", "TaskInfo", "TaskSummary", "TrainConfig",
           "ValidationFailed", "ValidationReport", "add_task", "create", "evaluate", "export", "import_checkpoint",
           "inspect", "load", "plan", "report", "save", "validate"]

_LAZY = {"PackNet": "checkpoint", "TaskInfo": "checkpoint", "TrainConfig": "training", "Observer": "training",
         "ExportedFile": "exporter.writer"}


def __getattr__(name: str):
    """The classes that need torch, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
