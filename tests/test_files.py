"""Special files as inputs and outputs: refused by a stat, never opened (a FIFO would hang)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from packnet_export import checkpoint
from packnet_export.errors import PackNetError
from packnet_export.files import output_file, output_folder, regular_file, shown


def special_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of path that is not a readable regular file, and a word its error must hold."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop_a, loop_b = tmp_path / "loop_a", tmp_path / "loop_b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    sock = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.close()
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"x")
    return {
        "fifo": (fifo, "FIFO"),
        "device": (Path("/dev/null"), "device"),
        "folder": (tmp_path, "folder"),
        "socket": (sock, "socket"),
        "symlink loop": (loop_a, "loop"),
        "missing": (tmp_path / "missing.safetensors", "does not exist"),
        "name too long": (tmp_path / ("n" * 300), "too long"),
        "path too long": (Path("/".join(["d" * 200] * 30)), "too long"),
        "file as folder": (a_file / "x.safetensors", "not a folder"),
    }


KINDS = ["fifo", "device", "folder", "socket", "symlink loop", "missing", "name too long", "path too long",
         "file as folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_regular_file_refuses_with_one_line_naming_the_parameter(tmp_path, kind):
    path, word = special_paths(tmp_path)[kind]
    with pytest.raises(PackNetError) as caught:
        regular_file(path, "--thing")
    message = str(caught.value)
    assert message.startswith("--thing") and word in message and "\n" not in message
    assert len(message) < 400


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_load_refuses_special_files(tmp_path, kind):
    path, word = special_paths(tmp_path)[kind]
    with pytest.raises(PackNetError, match=word):
        checkpoint.load(path)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "socket", "name too long", "path too long",
                                  "file as folder"])
def test_output_file_refuses_what_a_rename_must_not_replace(tmp_path, kind):
    path, _ = special_paths(tmp_path)[kind]
    with pytest.raises(PackNetError) as caught:
        output_file(path, "--output")
    assert "\n" not in str(caught.value)


def test_output_file_accepts_a_new_or_regular_file(tmp_path):
    assert output_file(tmp_path / "new.safetensors", "-o") == tmp_path / "new.safetensors"
    (tmp_path / "old").write_bytes(b"")
    assert output_file(tmp_path / "old", "-o") == tmp_path / "old"


def test_output_folder(tmp_path):
    assert output_folder(tmp_path / "a" / "b", "--output") == tmp_path / "a" / "b"
    (tmp_path / "f").write_bytes(b"")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub", Path("/dev/null"), tmp_path / ("n" * 300)):
        with pytest.raises(PackNetError):
            output_folder(bad, "--output")


def test_sparse_file_of_zeros_is_refused_before_mapping(tmp_path):
    """10 GB of holes: the header claims 0 bytes; refused after reading 8 bytes."""
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.truncate(10 << 30)
    with pytest.raises(PackNetError, match="header claims 0 bytes"):
        checkpoint.load(sparse)


def test_shown_keeps_messages_on_one_line():
    assert shown("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    long = shown("x" * 5000)
    assert len(long) < 300 and "5000 characters" in long


@pytest.mark.parametrize("args", [["inspect", "{p}"], ["eval", "{p}", "--task", "a", "--data", "{d}"],
                                  ["export", "--checkpoint", "{p}", "--task", "a", "-o", "{d}/out"],
                                  ["add-task", "{p}", "--name", "a", "--data", "{d}"], ["report", "{p}"]])
def test_commands_refuse_a_fifo_checkpoint_at_once(tmp_path, args):
    from packnet_export.cli.main import app
    from typer.testing import CliRunner

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    result = CliRunner().invoke(app, [a.format(p=fifo, d=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "FIFO" in result.output and result.output.strip().count("\n") == 0
