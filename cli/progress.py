"""Progress bars for training and evaluation (imports the trainer: only inside commands)."""

from __future__ import annotations

import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from packnet_export.training import Observer

from .common import err, flags_in, printable


class RichObserver(Observer):
    """Progress bars for training and evaluation, and one line per finished epoch."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task_id = None
        self.running_loss = math.nan

    def phase(self, name: str, epochs: int, steps: int) -> None:
        if not self.enabled:
            return
        self.end_phase()
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),  # the description holds a task name
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}", markup=False),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(printable(name), total=epochs * steps, loss="")

    def step(self, loss: float, steps: int = 1) -> None:
        if self.progress is None:
            return
        if not math.isnan(loss):
            keep = 0.9 ** steps  # an exponential average over steps, however many arrive at once
            self.running_loss = loss if math.isnan(self.running_loss) else keep * self.running_loss + (1 - keep) * loss
        self.progress.update(self.task_id, advance=steps,
                             loss="" if math.isnan(self.running_loss) else f"loss {self.running_loss:.3f}")

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        val = f"  val top-1 {record['val_top1']:5.1f}%" if "val_top1" in record else ""
        line = Text(f"{record['phase']:>8} epoch {record['epoch']:3d}  lr {record['lr']:.1e}  "
                    f"loss {record['loss']:.4f}{val}")
        if record.get("best"):
            line.append("  best", style="green")
        err.print(line)

    def message(self, text: str) -> None:
        if self.enabled:
            err.print(flags_in(text))

    def end_phase(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.running_loss = math.nan
