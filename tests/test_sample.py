"""The bundled sample behind the quick start: `packnet-export --task cars` on a fresh clone."""

import json

import pytest
from conftest import REPO, SHARED_DATA, requires_shared
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint

SAMPLE = REPO / "samples" / "packnet-6task.safetensors"
runner = CliRunner()


def test_the_sample_holds_the_six_tasks_in_the_papers_order():
    model = checkpoint.load(SAMPLE)
    assert model.task_names == ["cifar10", "flowers", "cubs", "cars", "wikiart", "sketch"]
    assert [t.num_classes for t in model.tasks] == [10, 102, 100, 196, 10, 40]
    assert SAMPLE.stat().st_size <= 20 * 2**20


def test_quick_start_exports_cars_from_the_sample(tmp_path):
    r = runner.invoke(app, ["export", "--task", "cars", "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cars.dense.onnx").is_file()
    assert "cars" in json.dumps(json.loads(r.stdout))


@requires_shared
@pytest.mark.slow
def test_the_sample_reproduces_its_recorded_accuracy_after_all_six_tasks():
    """Recorded when sketch was trained; the checkpoint must give exactly the same today."""
    model = checkpoint.load(SAMPLE)
    r = runner.invoke(app, ["eval", str(SAMPLE), "--task", "wikiart", "--data", str(SHARED_DATA / "wikiart"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["top1"] == model.tasks[4].metrics["test_top1"]
