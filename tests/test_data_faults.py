"""Broken data: unreadable images are skipped and counted (or fail the run with --strict), and
missing or empty folders stop the run with a one-line message. Never silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_ARCH, make_image_folder
from faults import one_thread  # noqa: F401
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.checkpoint import PackNet

FAST = ["--epochs", "2", "--finetune-epochs", "1", "--batch-size", "8", "--lr", "0.05"]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single non-empty line a failed command printed."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def fresh(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    checkpoint.save(PackNet.create(**TINY_ARCH), path)
    return path


@pytest.fixture
def broken_data(tmp_path) -> tuple[Path, list[Path]]:
    """Three classes; two unreadable train images and one unreadable test image."""
    root = make_image_folder(tmp_path / "data", 3, per_class=6, test_per_class=2)
    bad = [root / "train" / "class_00" / "garbage.png", root / "train" / "class_01" / "truncated.jpg",
           root / "test" / "class_02" / "empty.png"]
    bad[0].write_bytes(b"this is not an image" * 10)
    good = (root / "train" / "class_01" / "img_000.png").read_bytes()
    bad[1].write_bytes(good[: len(good) // 3])
    bad[2].write_bytes(b"")
    return root, bad


def test_corrupt_images_are_skipped_and_counted(fresh, broken_data):
    data, bad = broken_data
    result = run("add-task", fresh, "--name", "t", "--data", data, *FAST, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    # every bad file is counted once, however many epochs read it
    assert metrics["skipped_images"] == len(bad), metrics
    assert "skipped 3 unreadable image(s) (training, validation and test)" in result.stderr

    model = checkpoint.load(fresh)
    assert model.tasks[0].metrics["skipped_images"] == len(bad)

    ev = run("eval", fresh, "--task", "t", "--data", data, "--json")
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    assert report["skipped_images"] == 1 and report["images"] == 6
    text = run("eval", fresh, "--task", "t", "--data", data)
    assert "(1 unreadable skipped)" in text.stdout


def test_strict_fails_naming_the_file(fresh, broken_data):
    data, bad = broken_data
    before = fresh.read_bytes()
    result = run("add-task", fresh, "--name", "t", "--data", data, *FAST, "--strict")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert any(str(p) in line for p in bad), line
    assert fresh.read_bytes() == before

    trained = make_image_folder(data.parent / "clean", 3, per_class=6, test_per_class=2)
    assert run("add-task", fresh, "--name", "t", "--data", trained, *FAST).exit_code == 0
    ev = run("eval", fresh, "--task", "t", "--data", data, "--strict")
    assert ev.exit_code == 2
    assert str(bad[2]) in error_line(ev)


@pytest.mark.parametrize("fault", ["missing folder", "data is a file", "no train folder", "no class folders",
                                   "class without images", "only non-images"])
def test_missing_or_empty_data_is_a_one_line_error(fresh, tmp_path, fault):
    data = make_image_folder(tmp_path / "data", 2, per_class=3, test_per_class=1)
    if fault == "missing folder":
        data = tmp_path / "absent"
    elif fault == "data is a file":
        data = tmp_path / "file.txt"
        data.write_text("x")
    elif fault == "no train folder":
        shutil.rmtree(data / "train")
    elif fault == "no class folders":
        shutil.rmtree(data / "train")
        (data / "train").mkdir()
    elif fault == "class without images":
        (data / "train" / "class_99").mkdir()
    elif fault == "only non-images":
        for image in (data / "train" / "class_01").iterdir():
            image.rename(image.with_suffix(".txt"))
    before = fresh.read_bytes()
    result = run("add-task", fresh, "--name", "t", "--data", data, *FAST)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert str(data) in line or str(data / "train") in line, line
    assert fresh.read_bytes() == before
    assert not checkpoint.load(fresh).tasks
