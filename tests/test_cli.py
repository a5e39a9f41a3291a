"""The `packnet` command line end to end, on a tiny ImageFolder made here."""

import json

import pytest
from conftest import make_image_folder
from packnet_export.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()
TRAIN = ["--epochs", "1", "--finetune-epochs", "1", "--batch-size", "8", "--lr", "0.05", "--val-fraction", "0.2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = {name: make_image_folder(base / name, classes=n, seed=i) for i, (name, n) in
            enumerate([("flowers", 3), ("cars", 4)])}
    ckpt = base / "m.safetensors"
    assert invoke("init", "--arch", "vgg_mini", "--width", "4", "--image-size", "16", "-o", ckpt).exit_code == 0
    results = []
    for name in data:
        r = invoke("add-task", ckpt, "--name", name, "--data", data[name], *TRAIN, "--json")
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.stdout))
    return ckpt, data, results


def test_add_task_reports_metrics_and_free_capacity(trained):
    _, _, (first, second) = trained
    assert first["task_number"] == 1 and first["classes"] == 3 and first["free_fraction"] == pytest.approx(0.5, 0.01)
    assert second["prune"] == 0.75 and second["free_fraction"] == pytest.approx(0.375, 0.01)
    assert 0 <= second["metrics"]["test_top1"] <= 100


def test_eval_prints_top1_top5_and_count(trained):
    ckpt, data, results = trained
    r = invoke("eval", ckpt, "--task", "cars", "--data", data["cars"], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["images"] == 4 * 3 and out["top1"] == pytest.approx(results[1]["metrics"]["test_top1"])
    assert out["top5"] >= out["top1"]


def test_inspect_counts_owners_per_layer(trained):
    ckpt, _, _ = trained
    r = invoke("inspect", ckpt, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert [t["name"] for t in info["tasks"]] == ["flowers", "cars"]
    for layer in info["layers"]:
        assert layer["free"] + sum(layer["owned"].values()) == layer["weights"]
    assert info["tasks"][1]["used"] == info["tasks"][0]["owned"] + info["tasks"][1]["owned"]
    human = invoke("inspect", ckpt)
    assert human.exit_code == 0 and "free capacity" in human.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "{ckpt}", "--task", "car", "--data", "{data}"], "did you mean 'cars'"),
    (["add-task", "{ckpt}", "--name", "cars", "--data", "{data}"], "already exists"),
    (["add-task", "{ckpt}", "--name", "new", "--data", "/nonexistent/folder"], "does not exist"),
    (["inspect", "/nonexistent.safetensors"], "does not exist"),
    (["init", "--arch", "vgg16_bm", "-o", "{tmp}/x.safetensors"], "did you mean 'vgg16_bn'"),
    (["init", "--arch", "vgg_mini", "-o", "{ckpt}"], "pass --force"),
    (["add-task", "{ckpt}", "--name", "new", "--data", "{data}", "--amp", "fp8"], "'fp8'"),
    (["add-task", "{ckpt}", "--name", "new", "--data", "{data}", "--amp", "fp16"], "use --amp bf16 on a CPU"),
])
def test_bad_input_gives_one_line_and_exit_code_2(trained, tmp_path, args, message):
    ckpt, data, _ = trained
    before = ckpt.read_bytes()
    args = [a.format(ckpt=ckpt, data=data["cars"], tmp=tmp_path) for a in args]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert ckpt.read_bytes() == before, "a failed command must not touch the checkpoint"


def test_every_command_has_help():
    for command in ("init", "add-task", "eval", "inspect"):
        r = invoke(command, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_init_from_a_local_weights_file_then_a_first_task_on_its_own_head(tmp_path):
    """The offline path to ImageNet weights: a state dict on disk, its head kept for task 1."""
    import torch

    from packnet_export import checkpoint, models

    torch.manual_seed(3)
    source = models.build("vgg_mini", 3, {"width": 4})
    weights = tmp_path / "pretrained.pth"
    torch.save(source.state_dict(), weights)
    data = make_image_folder(tmp_path / "d", classes=3)
    ckpt = tmp_path / "m.safetensors"
    r = invoke("init", "--arch", "vgg_mini", "--width", "4", "--image-size", "16", "--weights", weights, "-o", ckpt)
    assert r.exit_code == 0, r.output
    r = invoke("add-task", ckpt, "--name", "first", "--data", data, "--pretrained-head", "--epochs", "0",
               "--finetune-epochs", "0", "--prune", "0")
    assert r.exit_code == 0, r.output
    model = checkpoint.load(ckpt)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.task_module(1)(x), source.eval()(x))


def test_pretrained_goes_through_torchvisions_weights_api(monkeypatch):
    """--pretrained asks torchvision's weights API (a download for users with internet); here it is served locally."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    from packnet_export import models

    local = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: local)
    state, classes = models.pretrained_state_dict("resnet18")
    assert state is local and len(classes) == 1000


def test_pretrained_without_internet_says_what_to_do(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    r = invoke("init", "--arch", "resnet18", "--pretrained", "-o", "/tmp/never-written.safetensors")
    assert r.exit_code == 2 and "--weights PATH" in r.output


def test_a_diverging_run_stops_with_advice_and_leaves_the_checkpoint_as_it_was(tmp_path):
    data = make_image_folder(tmp_path / "flowers", classes=3)
    ckpt = tmp_path / "m.safetensors"
    assert invoke("init", "--arch", "vgg_mini", "--width", "4", "--image-size", "16", "-o", ckpt).exit_code == 0
    before = ckpt.read_bytes()
    r = invoke("add-task", ckpt, "--name", "flowers", "--data", data, "--epochs", "1", "--finetune-epochs", "0",
               "--batch-size", "8", "--lr", "1e6")
    assert r.exit_code == 2
    assert "training diverged" in r.output and "lower --lr" in r.output
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flowers", "m.safetensors"]
