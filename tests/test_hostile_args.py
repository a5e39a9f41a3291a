"""Generated from the typer app's parameter lists: every option of every command, hostile values.

Each case runs the command in process (typer's CliRunner) in a working folder of its own,
and asserts what a user relies on: exit 0 with a readable result, or exit 2 with one
``error:`` line and no file created or changed; never a traceback, a hang, a control
character sent to the terminal, or a checkpoint that ``packnet inspect`` then refuses.
A new option or command is covered without editing this file (``hostile.commands()``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from faults import one_thread  # noqa: F401
from hostile import (
    BASE,
    argv_for,
    check_outcome,
    commands,
    extended_value_cases,
    fill_workdir,
    invoke,
    make_special,
    no_hang,
    snapshot,
    special_cases,
    value_cases,
)

from packnet_export import checkpoint

PLACEHOLDER = Path("/data")
VALUE_CASES = value_cases(PLACEHOLDER)
SPECIAL_CASES = special_cases(PLACEHOLDER)
EXTENDED_CASES = extended_value_cases(PLACEHOLDER)


@pytest.fixture(scope="module")
def sources(tiny_checkpoint, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """What a working folder holds: the tiny checkpoint, one exported graph, a junk import source."""
    base = tmp_path_factory.mktemp("hostile-sources")
    exports = base / "exports"
    result = invoke(["export", "--checkpoint", str(tiny_checkpoint), "--task", "alpha", "-o", str(exports),
                     "--no-validate"])
    assert result.exit_code == 0, result.output
    junk = base / "official.pt"
    junk.write_bytes(b"not a checkpoint")
    return {"model.safetensors": tiny_checkpoint, "alpha.dense.onnx": exports / "alpha.dense.onnx",
            "official.pt": junk}


@pytest.fixture
def workdir(tmp_path, sources, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    fill_workdir(work, sources)
    monkeypatch.chdir(work)
    return work


def test_every_command_has_a_base_call():
    """A new command needs its smallest valid call in ``hostile.BASE`` (the one edit it needs)."""
    assert set(commands()) <= set(BASE), set(commands()) - set(BASE)


def test_base_calls_succeed(workdir, tiny_data):
    """Each base call works, so that a refusal in the generated cases is the hostile value's doing."""
    for name, cmd in commands().items():
        if name == "import":  # the base's source is junk on purpose: import refuses it, after the options
            continue
        result = invoke(argv_for(name, cmd, None, None, tiny_data["alpha"]))
        assert result.exit_code == 0, f"{name}: {result.output[-1500:]}"


def _written_checkpoints_load(before: dict, work: Path) -> None:
    """Rule: no command writes a checkpoint that ``packnet inspect`` refuses."""
    for name, state in snapshot(work).items():
        if name.endswith(".safetensors") and before.get(name) != state:
            checkpoint.load(work / name)
            assert invoke(["inspect", str(work / name)]).exit_code == 0


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c.id for c in VALUE_CASES])
def test_hostile_option_value(case, workdir, tiny_data):
    _run_value_case(case, workdir, tiny_data)


@pytest.mark.skipif(not os.environ.get("PACKNET_HOSTILE_LONG"), reason="the longer run: PACKNET_HOSTILE_LONG=1")
@pytest.mark.parametrize("case", EXTENDED_CASES, ids=[c.id for c in EXTENDED_CASES])
def test_hostile_option_value_extended(case, workdir, tiny_data):
    """The longer run (``PACKNET_HOSTILE_LONG=1 pytest tests/test_hostile_args.py``): range edges, odd spellings."""
    _run_value_case(case, workdir, tiny_data)


def _run_value_case(case, workdir, tiny_data) -> None:
    argv = [a.replace(str(PLACEHOLDER), str(tiny_data["alpha"])) for a in case.argv]
    before = snapshot(workdir)
    with no_hang(120):
        result = invoke(argv)
    after = snapshot(workdir)
    check_outcome(result, before, after, allowed=(0, 1, 2) if case.command in ("export", "validate") else (0, 2))
    if result.exit_code == 0:
        _written_checkpoints_load(before, workdir)


@pytest.mark.parametrize("case", SPECIAL_CASES, ids=[c.id for c in SPECIAL_CASES])
def test_special_file_as_path(case, workdir, tiny_data):
    """FIFO, /dev/null, a folder, a symlink loop, a 10 GB sparse file, a socket: never a hang."""
    cmd = commands()[case.command]
    param = next(p for p in cmd.params if (p.name == case.param or case.param in getattr(p, "opts", ())))
    special = make_special(case.value, workdir)
    kind = stat.S_IFMT(os.lstat(special).st_mode)
    argv = [a.replace(str(PLACEHOLDER), str(tiny_data["alpha"]))
            for a in argv_for(case.command, cmd, param, special, PLACEHOLDER)]
    before = snapshot(workdir)
    with no_hang(60):
        result = invoke(argv)
    after = snapshot(workdir)
    check_outcome(result, before, after, allowed=(0, 1, 2) if case.command in ("export", "validate") else (0, 2))
    if case.value != "sparse 10 GB":  # a FIFO, device, socket or link is never replaced by an output
        assert stat.S_IFMT(os.lstat(special).st_mode) == kind


# ------------------------------------------------ commands that write checkpoints
WRITERS = [
    ["init", "--arch", "vgg_mini", "--width", "4", "--image-size", "16", "--seed", str(2**63 - 1), "-o",
     "edge.safetensors"],
    ["add-task", "model.safetensors", "--name", "[bold]x[red]", "--data", "{data}", "--epochs", "1",
     "--finetune-epochs",
     "1", "--lr", "10", "--finetune-lr", "1e-12", "--momentum", "0.999", "--weight-decay", "0.5",
     "--lr-decay-every", "1", "--batch-size", "1", "--val-fraction", "0.9", "--seed", str(2**63 - 1)],
    ["add-task", "model.safetensors", "--name", "[bold]x :smile: \u00e9\u4e2d", "--data", "{markup_data}",
     "--epochs", "1", "--finetune-epochs", "0", "--prune", "0", "-o", "second.safetensors"],
]


@pytest.fixture(scope="module")
def markup_data(tmp_path_factory) -> Path:
    """An ImageFolder whose class names are terminal markup."""
    from conftest import make_image_folder

    root = make_image_folder(tmp_path_factory.mktemp("markup") / "data", 2, per_class=3, test_per_class=1)
    for split in ("train", "test"):
        for old, new in zip(sorted((root / split).iterdir()), ["[bold", "[red]b\x1b[31m"]):
            old.rename(old.with_name(new))
    return root


@pytest.mark.parametrize("argv", WRITERS, ids=["init", "add-task extreme values", "add-task markup names"])
def test_written_checkpoints_are_readable(argv, workdir, tiny_data, markup_data):
    argv = [a.replace("{data}", str(tiny_data["alpha"])).replace("{markup_data}", str(markup_data)) for a in argv]
    before = snapshot(workdir)
    result = invoke(argv)
    check_outcome(result, before, snapshot(workdir))
    _written_checkpoints_load(before, workdir)
    if result.exit_code == 0:
        written = [workdir / n for n, s in snapshot(workdir).items() if n.endswith(".safetensors")
                   and before.get(n) != s]
        assert written, result.output
        for path in written:
            shown = invoke(["inspect", str(path)])
            assert shown.exit_code == 0 and "Traceback" not in shown.output
            model = checkpoint.load(path)
            for k in range(1, len(model.tasks) + 1):
                x = torch.zeros(1, 3, model.image_size, model.image_size)
                assert torch.isfinite(model.task_module(k)(x)).all()
