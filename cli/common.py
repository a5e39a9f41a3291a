"""What every command shares: error handling, the consoles, progress bars, JSON output."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from packnet_export.errors import PackNetError, name_parameters

from .options import flag

# Messages and progress go to stderr so that stdout carries only results (and --json).
err = Console(stderr=True, highlight=False)
# piped or redirected output is read in files and wide editors, not 80-column terminals
out = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def handle_errors(func: F | None = None, *, flags: dict[str, str] | None = None):
    """Turn a ``PackNetError`` into its one-line message (parameters named by their flags,
    ``flags`` overriding ``options.FLAGS`` for this command) and exit code; Ctrl-C into 130."""
    if func is None:
        return functools.partial(handle_errors, flags=flags)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return func(*args, **kwargs)
        except PackNetError as exc:
            err.print(f"[bold red]error:[/] {escape(exc.render(lambda p: flag(p, flags)))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def flags_in(text: str, flags: dict[str, str] | None = None) -> str:
    """A library notice with its ``$parameter`` names as this command's flags."""
    return name_parameters(text, lambda p: flag(p, flags))


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
