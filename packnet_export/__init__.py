"""packnet-export: PackNet multi-task networks, trained once and exported to ONNX per task."""

from .checkpoint import PackNet, TaskInfo, load, save
from .errors import PackNetError
from .training import TrainConfig, add_task, evaluate_task

__version__ = "0.1.0"
__all__ = ["PackNet", "TaskInfo", "load", "save", "PackNetError", "TrainConfig", "add_task", "evaluate_task"]
