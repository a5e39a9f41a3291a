"""What every command shares: error handling, the consoles, progress bars, JSON output."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from packnet_export.errors import PackNetError
from packnet_export.training import Observer

# Messages and progress go to stderr so that stdout carries only results (and --json).
err = Console(stderr=True, highlight=False)
# piped or redirected output is read in files and wide editors, not 80-column terminals
out = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def handle_errors(func: F) -> F:
    """Turn a ``PackNetError`` into its one-line message and exit code; Ctrl-C into 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return func(*args, **kwargs)
        except PackNetError as exc:
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """One JSON object on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    return str(value)


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
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(name, total=epochs * steps, loss="")

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
        best = "  [green]best[/]" if record.get("best") else ""
        err.print(f"{record['phase']:>8} epoch {record['epoch']:3d}  lr {record['lr']:.1e}  "
                  f"loss {record['loss']:.4f}{val}{best}")

    def message(self, text: str) -> None:
        if self.enabled:
            err.print(text)

    def end_phase(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.running_loss = math.nan
