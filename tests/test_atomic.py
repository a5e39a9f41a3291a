"""Atomic outputs and disk faults: a failed or killed write never damages an earlier file.

Every file is written to ``.NAME.<random>.tmp`` beside its target and renamed over it only
once complete. A write that fails (disk full, file too large, no such folder) is a one-line
error (exit 2) and removes its temporary file; a writer killed mid-write can leave one,
which the next successful write of the same name removes once it is an hour old.
"""

from __future__ import annotations

import errno
import os
import resource
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH, make_image_folder
from faults import one_thread  # noqa: F401
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.checkpoint import STALE_TEMP_SECONDS, PackNet
from packnet_export.errors import PackNetError
from packnet_export.training import resume_path_for

FAST = ["--epochs", "2", "--finetune-epochs", "1", "--batch-size", "8", "--lr", "0.05"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def model() -> PackNet:
    return PackNet.create(**TINY_ARCH)


@pytest.fixture
def saved(model, tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    checkpoint.save(model, path)
    return path


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_keeps_the_previous_file(model, saved, monkeypatch):
    """ENOSPC while flushing the new file: a clear error, the old file intact, no temp file left."""
    before = saved.read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(PackNetError, match="No space left on device"):
        checkpoint.save(model, saved)
    result = run("init", "--arch", "vgg_mini", "--width", "4", "-o", saved, "--force")
    assert result.exit_code == 2
    assert "No space left on device" in one_error_line(result)
    assert saved.read_bytes() == before
    assert temp_files(saved.parent) == []


def test_disk_full_during_add_task(saved, tmp_path, monkeypatch):
    """A full disk when add-task saves its epoch: exit 2, the checkpoint untouched."""
    data = make_image_folder(tmp_path / "data", 2, per_class=4, test_per_class=1)
    before = saved.read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)
    result = run("add-task", saved, "--name", "t", "--data", data, *FAST)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "cannot write" in line and "No space left on device" in line
    assert saved.read_bytes() == before
    assert not resume_path_for(saved).exists()
    assert temp_files(tmp_path) == []


def test_file_size_limit_is_a_clear_error(model, saved):
    """A real failing write(2): the file-size limit (EFBIG, like a full quota) in a forked child."""
    before = saved.read_bytes()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only the write under test runs here
        try:
            os.close(read)
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))
            try:
                checkpoint.save(model, saved)
                message = "saved"
            except PackNetError as exc:
                message = f"PackNetError: {exc}"
            except BaseException as exc:  # noqa: BLE001
                message = f"{type(exc).__name__}: {exc}"
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert message.startswith("PackNetError: cannot write") and "File too large" in message, message
    assert saved.read_bytes() == before
    assert temp_files(saved.parent) == []


@pytest.mark.parametrize("where", ["missing folder", "parent is a file"])
def test_unwritable_destination_fails_before_training(saved, tmp_path, where):
    data = make_image_folder(tmp_path / "data", 2, per_class=4, test_per_class=1)
    parent = tmp_path / "absent" if where == "missing folder" else saved
    target = parent / "out.safetensors"
    result = run("init", "--arch", "vgg_mini", "--width", "4", "-o", target)
    assert result.exit_code == 2
    assert str(target) in one_error_line(result)
    result = run("add-task", saved, "--name", "t", "--data", data, "-o", target, "--epochs", "1000")
    assert result.exit_code == 2
    assert str(target) in one_error_line(result)  # the only line: refused before any epoch ran
    assert checkpoint.load(saved).tasks == []


def test_stale_temp_files_are_removed_by_the_next_write(model, saved):
    """A temp file from a writer killed mid-write (an hour old) goes; a fresh one may be live and stays."""
    stale = saved.parent / f".{saved.name}.k1ll3d.tmp"
    fresh = saved.parent / f".{saved.name}.l1v3.tmp"
    other = saved.parent / ".other.safetensors.k1ll3d.tmp"
    for path in (stale, fresh, other):
        path.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    checkpoint.save(model, saved)
    assert not stale.exists()
    assert fresh.exists() and other.exists()
    assert checkpoint.load(saved).arch == "vgg_mini"


def test_written_files_follow_the_umask(model, tmp_path):
    """The temporary file's private 0600 mode does not leak into the result."""
    previous = os.umask(0o022)
    try:
        checkpoint.save(model, tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def _in_child(work) -> tuple[int, str]:
    """Run ``work()`` (returning a string) in a forked child: (exit signal or 0, its answer)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, str(work()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    return (os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0), answer


def test_loaded_model_survives_the_file_being_rewritten_in_place(tiny_checkpoint, tmp_path):
    """``cp other.safetensors model.safetensors`` while a long add-task holds the model: the model in
    memory must not change (nor the process die of SIGBUS), since its tensors are saved at the end."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(tiny_checkpoint.read_bytes())

    def work() -> str:
        model = checkpoint.load(path)
        before = {k: v.clone() for k, v in model.tensors().items()}
        with open(path, "r+b") as f:  # rewritten in place: same inode, other bytes, then shorter
            f.write(bytes(len(before)) * 1000)
            f.truncate(64)
        after = model.tensors()
        return "same" if all(torch.equal(before[k], after[k]) for k in before) else "changed"

    signal_number, answer = _in_child(work)
    assert signal_number == 0, f"killed by signal {signal_number}"
    assert answer == "same"
