"""On the real images of ../shared/data/finegrained-mini: train, export, and agree through onnxruntime.

Skipped where ../shared is absent (a user's clone has none).
"""

import json

import pytest
from conftest import SHARED_DATA, requires_shared
from packnet_export.cli.main import app
from typer.testing import CliRunner

pytestmark = [requires_shared, pytest.mark.slow]
runner = CliRunner()


@pytest.fixture(scope="module")
def sketch_model(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("real") / "m.safetensors"
    r = runner.invoke(app, ["init", "--arch", "vgg_mini", "--width", "8", "--image-size", "32", "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["add-task", str(ckpt), "--name", "sketch", "--data", str(SHARED_DATA / "sketch"),
                            "--epochs", "2", "--finetune-epochs", "1", "--lr", "0.02", "--finetune-lr", "0.002",
                            "--batch-size", "64", "--json"])
    assert r.exit_code == 0, r.output
    return ckpt, json.loads(r.stdout)


def test_training_on_real_images_learns_something(sketch_model):
    _, result = sketch_model
    metrics = result["metrics"]
    assert metrics["test_images"] == 400 and metrics["skipped_images"] == 0
    assert metrics["test_top1"] > 100 / 40 * 2, "twice chance on 40 classes"


def test_onnxruntime_reproduces_the_accuracy_on_real_images(sketch_model, tmp_path):
    ckpt, result = sketch_model
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--task", "sketch", "--format", "all",
                            "--data", str(SHARED_DATA / "sketch"), "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    text = json.dumps(report)
    assert "accuracy" in text
    r = runner.invoke(app, ["validate", str(tmp_path / "sketch.dense.onnx"), "--checkpoint", str(ckpt),
                            "--data", str(SHARED_DATA / "sketch"), "--json"])
    assert r.exit_code == 0, r.output
    checked = json.loads(r.stdout)
    accuracies = [e["accuracy"] for e in _entries(checked) if "accuracy" in e]
    assert accuracies and all(a == pytest.approx(result["metrics"]["test_top1"], abs=0.26) for a in accuracies)


def _entries(obj):
    """Every dict in a nested JSON value (the validation report's per-task entries among them)."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _entries(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _entries(v)
