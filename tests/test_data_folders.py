"""Data folders that cannot give a meaningful run are refused before any work, with one line.

Generated per family: ``test/`` classes that differ from ``train/`` (or from the task's) x
each command that reads a data folder; splits in which every image is unreadable (garbage,
empty files, a 1 x 1,000,000 PNG, a PNG declaring 20,000 x 20,000 pixels) x train or test x
command; and oversized images among good ones, skipped and counted (or named by --strict).
Every refusal leaves the checkpoint and the export folder untouched.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from conftest import TINY_ARCH, make_image_folder
from faults import one_thread  # noqa: F401
from packnet_export.cli.main import app
from PIL import Image
from test_data_faults import error_line
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.checkpoint import PackNet

FAST = ["--epochs", "1", "--finetune-epochs", "0", "--batch-size", "8", "--prune", "0"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    return error_line(result)


@pytest.fixture
def fresh(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    checkpoint.save(PackNet.create(**TINY_ARCH), path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> Path:
    """The session's tiny checkpoint (tasks alpha 3 classes, beta 4, gamma 2): read only."""
    return tiny_checkpoint


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height; its data holds one row (cheap to write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


BAD_IMAGES = {
    "garbage": lambda p: p.write_bytes(b"not an image " * 20),
    "empty": lambda p: p.write_bytes(b""),
    "1x1000000 png": lambda p: Image.new("L", (1_000_000, 1)).save(p),
    "20000x20000 png": lambda p: _png_declaring(p, 20_000, 20_000),
}


def spoil(split: Path, kind: str) -> int:
    """Replace every image of ``split`` by a bad one of ``kind``; the count replaced."""
    images = [p for p in split.rglob("*") if p.is_file()]
    for p in images:
        p.unlink()
        BAD_IMAGES[kind](p.with_suffix(".png"))
    return len(images)


# ------------------------------------------------------------------ family: classes
CLASS_FAULTS = {
    "extra class": lambda root: shutil.copytree(root / "test" / "class_00", root / "test" / "class_99"),
    "missing class": lambda root: shutil.rmtree(root / "test" / "class_01"),
    "renamed class": lambda root: (root / "test" / "class_01").rename(root / "test" / "class_x1"),
}


@pytest.mark.parametrize("fault", list(CLASS_FAULTS))
def test_add_task_refuses_test_classes_unlike_train(fresh, tmp_path, fault):
    data = make_image_folder(tmp_path / "data", 3, per_class=3, test_per_class=1)
    CLASS_FAULTS[fault](data)
    before = fresh.read_bytes()
    line = one_line(run("add-task", fresh, "--name", "t", "--data", data, *FAST))
    assert "other classes" in line and ("class_99" in line or "class_01" in line), line
    assert fresh.read_bytes() == before


@pytest.mark.parametrize("command", ["export", "validate", "eval"])
@pytest.mark.parametrize("fault", list(CLASS_FAULTS))
def test_evaluation_data_with_other_classes_is_refused(trained, tmp_path, command, fault):
    data = make_image_folder(tmp_path / "data", 3, per_class=1, test_per_class=1)  # alpha has 3 classes
    CLASS_FAULTS[fault](data)
    line = one_line(_evaluate(command, trained, data, tmp_path))
    assert "class" in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _evaluate(command: str, ckpt: Path, data: Path, tmp_path: Path):
    if command == "export":
        return run("export", "--checkpoint", ckpt, "--task", "alpha", "--data", data, "-o", tmp_path / "out",
                   "--provider", "cpu")
    if command == "validate":
        out = tmp_path / "v"
        if not (out / "alpha.dense.onnx").exists():
            assert run("export", "--checkpoint", ckpt, "--task", "alpha", "-o", out, "--no-validate").exit_code == 0
        return run("validate", out / "alpha.dense.onnx", "--checkpoint", ckpt, "--data", data, "--provider", "cpu")
    return run("eval", ckpt, "--task", "alpha", "--data", data)


# ------------------------------------------------------------------ family: unreadable splits
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_add_task_refuses_a_split_without_one_readable_image(fresh, tmp_path, split, kind):
    data = make_image_folder(tmp_path / "data", 2, per_class=2, test_per_class=1)
    n = spoil(data / split, kind)
    before = fresh.read_bytes()
    line = one_line(run("add-task", fresh, "--name", "t", "--data", data, *FAST))
    assert f"none of its {n} image(s)" in line and str(data / split) in line, line
    assert fresh.read_bytes() == before


@pytest.mark.parametrize("command", ["export", "validate", "eval"])
@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_evaluation_on_unreadable_test_images_is_refused(trained, tmp_path, command, kind):
    data = make_image_folder(tmp_path / "data", 3, per_class=1, test_per_class=1)
    n = spoil(data / "test", kind)
    line = one_line(_evaluate(command, trained, data, tmp_path))
    assert f"none of its {n} image(s)" in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("fault", ["empty folder", "train only", "missing"])
def test_export_checks_data_before_writing(trained, tmp_path, fault):
    data = tmp_path / "data"
    if fault == "empty folder":
        data.mkdir()
    elif fault == "train only":
        make_image_folder(data, 3, per_class=1, test_per_class=0)
    line = one_line(_evaluate("export", trained, data, tmp_path))
    assert str(data) in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------------ family: oversized images among good ones
@pytest.mark.parametrize("kind", ["1x1000000 png", "20000x20000 png"])
def test_oversized_image_is_skipped_or_named(trained, tmp_path, kind):
    data = make_image_folder(tmp_path / "data", 3, per_class=1, test_per_class=2)
    bad = data / "test" / "class_01" / "huge.png"
    BAD_IMAGES[kind](bad)
    result = run("eval", trained, "--task", "alpha", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped_images"] == 1 and report["images"] == 6
    line = one_line(run("eval", trained, "--task", "alpha", "--data", data, "--strict"))
    assert str(bad) in line and "pixels" in line, line
