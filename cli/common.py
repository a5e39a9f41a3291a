"""What every command shares: error handling, the consoles, progress bars, JSON output.

The consoles never read markup from strings and never pass control characters through:
task names, class names and paths come from users and files, and ``[/]`` in a name used to
crash every command that printed it (``rich.errors.MarkupError``), while an escape sequence
in a name could repaint the user's terminal. Colour comes only from ``styled`` pieces.
"""

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
from rich.text import Text

from packnet_export.errors import PackNetError, name_parameters

from .options import flag

try:  # typer 0.2x carries its own click as typer._click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError


def printable(text: str) -> str:
    """``text`` with every control character but newline and tab written as an escape (``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class PlainConsole(Console):
    """A rich ``Console`` that renders every string literally: no markup, no emoji codes, no control codes.

    Every string a command prints (messages, table cells, titles) passes through
    ``render_str``, so fixing it here covers every call site, present and future.
    """

    def render_str(self, text: str, **kwargs) -> Text:
        kwargs["markup"] = False
        kwargs["emoji"] = False
        return super().render_str(printable(text), **kwargs)


def styled(text: str, style: str) -> Text:
    """A coloured piece of a message (the only way to colour output)."""
    return Text(printable(text), style=style)


# Messages and progress go to stderr so that stdout carries only results (and --json).
err = PlainConsole(stderr=True, highlight=False)
# piped or redirected output is read in files and wide editors, not 80-column terminals
out = PlainConsole(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)

MAX_ERROR_CHARS = 600
"""An error line longer than this (one that quotes a 5,000-character value) keeps its two ends."""


def print_error(message: str) -> None:
    """The one ``error:`` line of a failed command: newlines escaped, a huge quoted value elided."""
    message = message.replace("\n", "\\n")
    if len(message) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2 - 10
        message = f"{message[:half]} [...{len(message) - 2 * half:,} characters...] {message[-half:]}"
    err.print(styled("error:", "bold red"), message, soft_wrap=True)

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
            print_error(exc.render(lambda p: flag(p, flags)))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print(styled("interrupted", "yellow"))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def flags_in(text: str, flags: dict[str, str] | None = None) -> str:
    """A library notice with its ``$parameter`` names as this command's flags."""
    return name_parameters(text, lambda p: flag(p, flags))


class _OneLineUsageErrors:
    """Mixed into the apps' click classes: a usage error (a value that is not a number, a missing
    option) is one ``error:`` line and exit 2, like every other input error, not a usage panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            if not standalone_mode:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            if not standalone_mode:
                raise
            where = getattr(exc, "ctx", None)
            hint = f" (see {where.command_path} --help)" if where is not None else ""
            print_error(exc.format_message() + hint)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            err.print(styled("aborted", "yellow"))
            sys.exit(EXIT_INTERRUPTED)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


class Group(_OneLineUsageErrors, typer.core.TyperGroup):
    """``packnet``'s click group."""


class Command(_OneLineUsageErrors, typer.core.TyperCommand):
    """A single-command app's click command (``packnet-export``)."""


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
