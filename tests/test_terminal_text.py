"""Names and paths that look like terminal markup or hold control characters print literally.

A task or class name such as ``[bold]x`` or a path such as ``[/]model.safetensors`` used to be
read as rich markup (``MarkupError`` for ``[/]``, silently restyled text otherwise); an escape
sequence in a class name reached the terminal. The consoles in ``cli.common`` render every
string literally, so every command that prints a name is covered at once; these tests run
each such command on a checkpoint whose names and path are all hostile.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from faults import one_thread  # noqa: F401
from hostile import invoke

from packnet_export import checkpoint

TASK_NAMES = ["[bold]x", "[red]:smile:[link=x]y", "n" * 200]
CLASS_NAMES = [["[bold", "b\x1b[31mb", "[/]"], ["[blink]d", "c", "e\tf", "g"], ["h" * 1000, "[i]"]]


@pytest.fixture(scope="module")
def hostile_ckpt(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with markup task and class names, saved as ``[/]model.safetensors``."""
    model = copy.copy(tiny_model)
    model.tasks = [copy.replace(t, name=n, classes=c) if hasattr(copy, "replace") else
                   type(t)(n, c, t.prune, t.metrics, t.training)
                   for t, n, c in zip(tiny_model.tasks, TASK_NAMES, CLASS_NAMES)]
    folder = tmp_path_factory.mktemp("markup") / "["
    folder.mkdir()
    path = folder / "]model.safetensors"
    checkpoint.save(model, path)
    return path


@pytest.fixture
def markup_data(tiny_data, tmp_path) -> Path:
    """Task 2's images under its hostile class names (folder names can hold all but '/')."""
    root = tmp_path / "[data]"
    shutil.copytree(tiny_data["beta"], root)
    for split in ("train", "test"):
        for old, new in zip(sorted((root / split).iterdir()), CLASS_NAMES[1]):
            old.rename(old.with_name(new))
    return root


def _assert_literal(result, *expected: str) -> None:
    assert result.exit_code == 0, result.output[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.stdout + result.stderr
    assert "\x1b[31m" not in text, "an escape sequence from a name reached the terminal"
    unwrapped = text.replace("\n", "")  # the test console wraps at 80 columns
    for piece in expected:
        assert piece in unwrapped, f"{piece!r} not printed literally in:\n{text[-3000:]}"


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_inspect(hostile_ckpt, extra):
    result = invoke(["inspect", str(hostile_ckpt), *extra])
    _assert_literal(result, "[bold]x", "[red]:smile:" if not extra else "[red]:smile:")
    if extra:
        assert json.loads(result.stdout)["tasks"][0]["name"] == "[bold]x"
    else:
        assert "[/]model.safetensors" in result.stdout.replace("\n", "")


@pytest.mark.parametrize("extra", [[], ["--per-layer"]])
def test_report(hostile_ckpt, extra, tmp_path):
    md = tmp_path / "[b]report.md"
    result = invoke(["report", str(hostile_ckpt), *extra, "--markdown", str(md)])
    _assert_literal(result, "[bold]x", "[b]report.md")
    assert "[bold]x" in md.read_text()


def test_eval(hostile_ckpt, markup_data):
    result = invoke(["eval", str(hostile_ckpt), "--task", TASK_NAMES[1], "--data", str(markup_data)])
    _assert_literal(result, TASK_NAMES[1])


def test_export_and_validate(hostile_ckpt, tmp_path):
    out = tmp_path / "[/]exports"
    result = invoke(["export", "--checkpoint", str(hostile_ckpt), "--task", "[bold]x", "-o", str(out)])
    _assert_literal(result, "[bold]x.dense.onnx")
    onnx_file = out / "[bold]x.dense.onnx"
    result = invoke(["validate", str(onnx_file), "--checkpoint", str(hostile_ckpt)])
    _assert_literal(result, "[bold]x")


def test_errors_quote_names_literally(hostile_ckpt):
    result = invoke(["export", "--checkpoint", str(hostile_ckpt), "--task", "[/]nope", "--no-validate"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "[/]nope" in line and "[bold]x" in line


def test_add_task_prints_and_writes_markup_names(hostile_ckpt, markup_data, tmp_path):
    out = tmp_path / "[red]more.safetensors"
    result = invoke(["add-task", str(hostile_ckpt), "--name", "[green]z", "--data", str(markup_data),
                     "--epochs", "1", "--finetune-epochs", "0", "-o", str(out)])
    _assert_literal(result, "[green]z", "[red]more.safetensors")
    assert checkpoint.load(out).tasks[-1].classes == sorted(CLASS_NAMES[1])
    _assert_literal(invoke(["inspect", str(out)]), "[green]z")
