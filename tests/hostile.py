"""Generators of hostile command lines, from the typer apps' own parameter lists.

``commands()`` walks click's command tree of ``packnet`` (``typer.main.get_command``), so a
new command or option is exercised by the generated tests without editing them; only a new
*required* parameter needs an entry in ``BASE`` (the smallest valid call of each command).
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import stat
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import typer.main
from packnet_export.cli.main import app
from typer.core import TyperArgument
from typer.testing import CliRunner

# the smallest valid call of each command, run in a working folder that holds these names
BASE: dict[str, tuple[list[str], dict[str, str]]] = {
    "init": ([], {"--arch": "vgg_mini", "--width": "4", "--image-size": "16", "--output": "new.safetensors"}),
    "add-task": (["model.safetensors"], {"--name": "new", "--data": "{data}", "--epochs": "0",
                                         "--finetune-epochs": "0", "--batch-size": "16", "--val-fraction": "0"}),
    "eval": (["model.safetensors"], {"--task": "alpha", "--data": "{data}"}),
    "inspect": (["model.safetensors"], {}),
    "report": (["model.safetensors"], {}),
    "import": (["official.pt"], {"--output": "imported.safetensors"}),
    "export": ([], {"--checkpoint": "model.safetensors", "--task": "alpha", "--output": "exports",
                    "--no-validate": None}),
    "validate": (["alpha.dense.onnx"], {"--checkpoint": "model.safetensors"}),
}

NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e308", str(2**64), ""]
TEXTS = ["", "[/]", "[bold]x", "a\x1b[31mb\x07c", "x" * 5000]


@dataclass
class Case:
    command: str
    param: str
    value: str
    argv: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        shown = self.value if len(self.value) < 20 else f"{self.value[:8]}..{len(self.value)}"
        return f"{self.command} {self.param}={shown.encode('unicode_escape').decode()}"


def commands() -> dict:
    """Name -> click command of every ``packnet`` command."""
    root = typer.main.get_command(app)
    return dict(root.commands)  # type: ignore[attr-defined]


def flag(param) -> str | None:
    """The long option of ``param`` (None for an argument)."""
    if isinstance(param, TyperArgument):
        return None
    return max(param.opts, key=len)


def takes_value(param) -> bool:
    return not getattr(param, "is_flag", False) and param.name != "help"


def value_type(param) -> type:
    """The Python type a parameter's values convert to (``X | None`` and ``list[X]`` unwrapped)."""
    annotation = param.type_descriptor.annotation
    while typing.get_args(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def is_path(param) -> bool:
    return value_type(param) is Path


def is_number(param) -> bool:
    return value_type(param) in (int, float)


def is_choice(param) -> bool:
    t = value_type(param)
    return (isinstance(t, type) and issubclass(t, enum.Enum)) or typing.get_origin(t) is typing.Literal


def argv_for(command: str, cmd, param, value: str | None, data: Path) -> list[str]:
    """``BASE[command]`` with ``param`` set to ``value`` (added when the base lacks it)."""
    positional, options = BASE[command]
    positional = list(positional)
    options = dict(options)
    if param is not None:
        if isinstance(param, TyperArgument):
            index = [p for p in cmd.params if isinstance(p, TyperArgument)].index(param)
            while len(positional) <= index:
                positional.append("")
            positional[index] = value  # type: ignore[call-overload]
        else:
            options[flag(param)] = value  # type: ignore[index]
    argv = [command, *positional]
    for key, v in options.items():
        argv += [key] if v is None else [key, v.replace("{data}", str(data))]
    return argv


def value_cases(data: Path) -> list[Case]:
    """Every value-taking parameter of every command, with the hostile values of its type."""
    cases = []
    for name, cmd in commands().items():
        for param in cmd.params:
            if not takes_value(param):
                continue
            values = NUMBERS if is_number(param) else TEXTS
            if is_choice(param):
                values = TEXTS + ["nan"]
            for value in values:
                cases.append(Case(name, flag(param) or param.name, value,  # type: ignore[arg-type]
                                  argv_for(name, cmd, param, value, data)))
    return cases


SPECIAL_KINDS = ("fifo", "device", "folder", "symlink loop", "sparse 10 GB", "socket")


def make_special(kind: str, folder: Path) -> str:
    """A special file of ``kind`` inside ``folder``; its path."""
    path = folder / f"special-{kind.replace(' ', '-')}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        return "/dev/null"
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink loop":
        path.symlink_to(path.with_name(path.name + "-b"))
        path.with_name(path.name + "-b").symlink_to(path)
    elif kind == "sparse 10 GB":
        with open(path, "wb") as f:
            f.truncate(10 << 30)
    elif kind == "socket":
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    return str(path)


def special_cases(data: Path) -> list[Case]:
    """Every path parameter of every command, given each kind of special file."""
    cases = []
    for name, cmd in commands().items():
        for param in cmd.params:
            if takes_value(param) and is_path(param):
                for kind in SPECIAL_KINDS:
                    cases.append(Case(name, flag(param) or param.name, kind))  # argv made per case
    return cases


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` with what identifies its content (inode, size, mtime, kind)."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for entry in dirs + files:
            p = Path(root) / entry
            st = p.lstat()
            state[str(p.relative_to(folder))] = (st.st_ino, st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode))
    return state


def fill_workdir(folder: Path, sources: dict[str, Path]) -> None:
    for name, src in sources.items():
        if src.is_dir():
            shutil.copytree(src, folder / name)
        else:
            shutil.copy(src, folder / name)


class Hang(Exception):
    pass


@contextmanager
def no_hang(seconds: int) -> Iterator[None]:
    """Fail (instead of blocking the suite) if the body takes more than ``seconds``."""
    def alarm(signum, frame):  # noqa: ARG001
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


runner = CliRunner()


def invoke(argv: list[str]):
    return runner.invoke(app, argv, catch_exceptions=True)


def check_outcome(result, before: dict, after: dict, allowed: tuple[int, ...] = (0, 2)) -> None:
    """Exit 0 with readable output, or exit 2 with one ``error:`` line and nothing written."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"exception escaped:\n{tb[-3000:]}")
    assert result.exit_code in allowed, f"exit {result.exit_code}: {result.output[-2000:]}"
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), f"not one error line: {result.stderr[-2000:]!r}"
        assert len(lines[0]) < 700, lines[0]  # cli.common.print_error elides a huge quoted value
        assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"
    for text in (result.stdout, result.stderr):
        assert "Traceback" not in text
        assert "\x1b[31m" not in text and "\x07" not in text, "a control character reached the terminal"


# the slow run's extra values: edges of each range, spellings that parse oddly
MORE_NUMBERS = ["-0", "1e-320", "0.999999999", "1", "2", "65537", "0x10", " 1", "1_000", "+inf", "NaN", "1e-6"]
MORE_TEXTS = [" ", "-", "--help", ".", "..", "/", "~", "$HOME", "%s", "{}", "\u202e", "\ud800".encode(
    "utf-8", "surrogatepass").decode("utf-8", "replace"), "a" * 256, "[/" * 1000, "cuda", "cpu:0", "mps", "meta"]


def extended_value_cases(data: Path) -> list[Case]:
    """``value_cases`` with the slow run's extra values (``PACKNET_HOSTILE_LONG=1``)."""
    cases = []
    for name, cmd in commands().items():
        for param in cmd.params:
            if takes_value(param):
                for value in (MORE_NUMBERS if is_number(param) else MORE_TEXTS):
                    cases.append(Case(name, flag(param) or param.name, value,  # type: ignore[arg-type]
                                      argv_for(name, cmd, param, value, data)))
    return cases
