"""Calibration images for int8: a task's own training images, preprocessed as in evaluation.

The activation ranges of an int8 graph are measured on these images (onnxruntime's MinMax
calibrator), so they must come from the distribution the task sees: its own training images
(``DIR/train/<class>/``, or ``DIR/<task>/train/<class>/`` when several tasks are calibrated),
resized, cropped and normalized exactly as the evaluation does (``data.eval_transform`` with
the checkpoint's image size, mean and std). The choice is deterministic, so two exports of
the same checkpoint give the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import data as data_mod
from ..checkpoint import PackNet
from ..errors import PackNetError, ParameterError
from .formats import DEFAULT_CALIBRATION_IMAGES

"""Enough for stable MinMax ranges on the networks here; 256 images at 224 px take seconds."""
CALIBRATION_BATCH = 32
CALIBRATION_SEED = 0


class CalibrationError(ParameterError):
    """Calibration images are missing, empty or unreadable: nothing was written.

    ``parameter`` is ``calibration`` (or ``calibration_images``), the one to change.
    """

    def __init__(self, message: str, parameter: str = "calibration") -> None:
        super().__init__(parameter, message)

    def __reduce__(self):
        return type(self), (self.template, self.parameter)


# ----------------------------------------------------------------- calibration
def calibration_folder(root: str | Path, task: str, several: bool) -> Path:
    """The ImageFolder root (holding ``train/``) whose training images calibrate ``task``.

    ``root/<task>/train`` when it exists; else ``root/train`` when only one task is
    calibrated (with several tasks one folder cannot serve them all: their classes differ).
    """
    root = Path(root)
    if not root.is_dir():
        raise CalibrationError(f"$calibration {root} is not a folder")
    if (root / task / "train").is_dir():
        return root / task
    if not several and (root / "train").is_dir():
        return root
    expected = f"{root}/{task}/train/<class>/<image>" if several else \
        f"{root}/train/<class>/<image> or {root}/{task}/train/<class>/<image>"
    raise CalibrationError(f"$calibration {root} has no training images for task {task!r}; expected {expected}")


@dataclass
class CalibrationSet:
    """A task's calibration images (float32 ``[n, 3, H, W]``, preprocessed) and their labels."""

    images: np.ndarray
    labels: np.ndarray
    folder: Path

    def describe(self) -> dict:
        return {"calibration_images": int(len(self.images)), "calibration_folder": str(self.folder / "train")}


def calibration_images(model: PackNet, task: int, folder: str | Path, count: int = DEFAULT_CALIBRATION_IMAGES,
                       seed: int = CALIBRATION_SEED) -> CalibrationSet:
    """``count`` training images of ``folder`` (``folder/train/<class>/``), preprocessed as in
    evaluation (the task's image size, mean and std).

    The choice is deterministic: a permutation seeded with ``seed`` over every image, the
    first ``count`` that decode. The classes must be the task's: images of another task
    would calibrate the ranges of a distribution the graph never sees.
    """
    if count < 1:
        raise CalibrationError(f"$calibration_images must be at least 1, got {count}", "calibration_images")
    info = model.tasks[task - 1]
    try:
        split = data_mod.load_split(folder, "train", model.image_size, model.mean, model.std)
    except PackNetError as exc:
        raise CalibrationError(f"calibration images for task {info.name!r}: {exc}") from None
    if split.classes != list(info.classes):
        raise CalibrationError(f"{folder}/train has classes {split.classes[:4]}..., but task {info.name!r} has "
                               f"{list(info.classes)[:4]}...; pass the task's own training images to $calibration")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for index in order:
        x, y = split[index]
        if x is not None:
            images.append(x)
            labels.append(y)
            if len(images) == count:
                break
    if not images:
        raise CalibrationError(f"{folder}/train holds no readable image to calibrate task {info.name!r}")
    return CalibrationSet(torch.stack(images).numpy(), np.array(labels, dtype=np.int64), Path(folder))


def load_calibration(model: PackNet, tasks: list[int], root: str | Path | None,
                     count: int = DEFAULT_CALIBRATION_IMAGES, why: str = "") -> dict[int, CalibrationSet]:
    """Calibration sets of ``tasks`` (1-based) from ``root``; raises before anything is written.

    ``why`` is appended to a missing folder's message (e.g. that the multi-task graph needs
    every task's images).
    """
    if root is None:
        raise CalibrationError("$precision int8 needs calibration images: pass $calibration DIR (an ImageFolder "
                               "root with train/, or DIR/<task>/train/ for several tasks)")
    several = len(tasks) > 1
    sets = {}
    for k in tasks:
        try:
            folder = calibration_folder(root, model.tasks[k - 1].name, several)
        except CalibrationError as exc:
            raise CalibrationError(f"{exc.template}{why}", exc.parameter) from None
        sets[k] = calibration_images(model, k, folder, count)
    return sets


def calibration_reader(images: np.ndarray, batch: int = CALIBRATION_BATCH):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``images`` in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class ImageBatches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(range(0, len(images), batch))

        def get_next(self) -> dict | None:
            start = next(self._batches, None)
            return None if start is None else {"input": images[start:start + batch]}

        def __len__(self) -> int:
            return -(-len(images) // batch)

    return ImageBatches()
