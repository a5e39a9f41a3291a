"""Hostile and interrupted ONNX files: external data stays in the model's folder, and a killed
export leaves no partial ``.onnx`` behind (the previous file, if any, intact)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from faults import (
    ENV,
    REPO,
    finish,
    one_thread,  # noqa: F401
    wait_for,
)
from onnx import TensorProto, numpy_helper
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.exporter import pipeline


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    """Task alpha of the tiny model exported (dense) to a folder of its own."""
    folder = tmp_path_factory.mktemp("exports")
    files = pipeline.export(checkpoint.load(tiny_checkpoint), folder, [1], ["dense"])
    return files[0].path


def with_external_weight(source: Path, target: Path, location: str, data_file: Path) -> Path:
    """``source`` with its first initializer's bytes moved to ``data_file``, referenced as ``location``."""
    proto = onnx.load(str(source))
    tensor = proto.graph.initializer[0]
    data = numpy_helper.to_array(tensor).tobytes()
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        tensor.external_data.add(key=key, value=value)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(proto.SerializeToString())
    return target


def validate(path: Path, tiny_checkpoint: Path):
    return CliRunner().invoke(app, ["validate", str(path), "--checkpoint", str(tiny_checkpoint), "--provider", "cpu"])


def test_external_data_inside_the_folder_is_read(exported, tiny_checkpoint, tmp_path):
    """The legitimate case: a sidecar next to the graph."""
    model = with_external_weight(exported, tmp_path / "m" / "alpha.onnx", "alpha.onnx.data",
                                 tmp_path / "m" / "alpha.onnx.data")
    result = validate(model, tiny_checkpoint)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("escape", ["parent", "nested parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(exported, tiny_checkpoint, tmp_path, escape):
    secret = tmp_path / "secret.bin"
    folder = tmp_path / "m"
    location = {"parent": "../secret.bin", "nested parent": "sub/../../secret.bin", "absolute": str(secret),
                "symlink": "link.bin"}[escape]
    model = with_external_weight(exported, folder / "alpha.onnx", location, secret)
    if escape == "symlink":
        os.symlink(secret, folder / "link.bin")
    result = validate(model, tiny_checkpoint)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "outside the model's folder" in lines[0], result.stderr
    report = CliRunner().invoke(app, ["report", str(tiny_checkpoint), "--exports", str(folder)])
    assert report.exit_code == 2, report.output
    assert "outside the model's folder" in report.stderr  # one checker, one message


KILL_MID_WRITE = r"""
import sys, time
from packnet_export.exporter import writer
original, written = writer._as_array, []
def slow(tensor):  # pause inside the write of the file, after a few tensors
    written.append(1)
    if len(written) == 3:
        print("PAUSED", flush=True)
        time.sleep(120)
    return original(tensor)
writer._as_array = slow
from packnet_export.cli.export import app
app(sys.argv[1:])
"""


def test_sigkill_during_export_leaves_the_previous_file(exported, tiny_checkpoint, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    previous = folder / exported.name
    previous.write_bytes(exported.read_bytes())
    before = previous.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, "--checkpoint", str(tiny_checkpoint),
                             "--task", "alpha", "-o", str(folder), "--force", "--no-validate"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    paused = []
    wait_for(lambda: paused.append(proc.stdout.readline()) or "PAUSED" in paused[-1], proc)
    temps = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert temps and all(t.startswith(f".{previous.name}.") for t in temps), temps  # it was mid-write
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert previous.read_bytes() == before
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == [previous.name], visible  # no partial file or sidecar under a real name
    onnx.checker.check_model(str(previous))
