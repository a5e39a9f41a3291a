"""``packnet import``: official PackNet checkpoints and Avalanche state dicts.

The released official checkpoints cannot be downloaded here, so the fixtures rebuild the
format from the public code (github.com/arunmallya/packnet, src/networks.py and src/main.py):
a ``networks`` module with the same classes and layout, masks keyed by position in
``model.shared.modules()``, and ``torch.save`` in the legacy (non-zip) format. The reference
logits are computed the way the official ``Manager.eval`` does (mask, restore biases, the
dataset's classifier). Avalanche's fixture wraps a network the way ``PackNetModel.wrap`` does,
so its state dict has the real key layout.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packnet_export.cli.main import app
from torch import nn
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.errors import PackNetError
from packnet_export.importers import import_file

runner = CliRunner()

NETWORKS = '''
"""Stand-ins for the official src/networks.py (same classes, same module layout; no download)."""
import torch.nn as nn
from torchvision import models


class View(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, input):
        return input.view(*self.shape)


class ModifiedVGG16(nn.Module):
    def __init__(self, make_model=True):
        super().__init__()
        if make_model:
            self.make_model()

    def _vgg(self):
        return models.vgg16()

    def make_model(self):
        vgg = self._vgg()
        self.datasets, self.classifiers = [], nn.ModuleList()
        fc6, fc7, head = [m for m in vgg.classifier.children() if isinstance(m, nn.Linear)]
        self.datasets.append("imagenet")
        self.classifiers.append(head)
        features = list(vgg.features.children())
        features.extend([View(-1, 25088), fc6, nn.ReLU(inplace=True), nn.Dropout(), fc7, nn.ReLU(inplace=True),
                         nn.Dropout()])
        self.shared = nn.Sequential(*features)
        self.classifier = None

    def add_dataset(self, dataset, num_outputs, width=4096):
        if dataset not in self.datasets:
            self.datasets.append(dataset)
            self.classifiers.append(nn.Linear(width, num_outputs))

    def set_dataset(self, dataset):
        self.classifier = self.classifiers[self.datasets.index(dataset)]


class ModifiedVGG16BN(ModifiedVGG16):
    def _vgg(self):
        return models.vgg16_bn()


class ModifiedResNet(ModifiedVGG16):
    def make_model(self):
        resnet = models.resnet50()
        self.datasets, self.classifiers = [], nn.ModuleList()
        self.shared = nn.Sequential()
        for name, module in resnet.named_children():
            if name != "fc":
                self.shared.add_module(name, module)
        self.datasets.append("imagenet")
        self.classifiers.append(resnet.fc)
        self.classifier = None


class ModifiedDenseNet(ModifiedVGG16):
    def make_model(self):
        densenet = models.densenet121()
        self.datasets, self.classifiers = [], nn.ModuleList()
        self.shared = densenet.features
        self.datasets.append("imagenet")
        self.classifiers.append(densenet.classifier)
        self.classifier = None
'''

DATASETS = [("cubs", 5), ("cars", 4)]  # after "imagenet", as in the paper's sequence


@pytest.fixture
def networks(tmp_path, monkeypatch):
    """A temporary module named ``networks`` holding the official class names."""
    folder = tmp_path / "official_src"
    folder.mkdir()
    (folder / "networks.py").write_text(textwrap.dedent(NETWORKS))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "networks", raising=False)
    import networks as module

    yield module
    sys.modules.pop("networks", None)


def _official_checkpoint(net, width: int, train_biases: bool, seed: int = 0) -> dict:
    """What three runs of the official main.py leave: imagenet (1), cubs (2), cars (3)."""
    g = torch.Generator().manual_seed(seed)
    for name, n in DATASETS:
        net.add_dataset(name, n, width)
    dataset2idx = {"imagenet": 1, "cubs": 2, "cars": 3}
    previous_masks, dataset2biases = {}, {name: {} for name in dataset2idx}
    with torch.no_grad():
        for i, m in enumerate(net.shared.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                previous_masks[i] = torch.randint(0, 4, m.weight.shape, generator=g).to(torch.uint8)
                m.weight[previous_masks[i].eq(0)] = 0.0
                if m.bias is not None:
                    for name in dataset2idx:
                        dataset2biases[name][i] = m.bias + 0.05 * torch.randn(m.bias.shape, generator=g)
            elif isinstance(m, nn.BatchNorm2d):  # trained statistics, so that batch norm matters
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    import argparse

    args = argparse.Namespace(dataset="cars", arch="vgg16", train_biases=train_biases, train_bn=False,
                              prune_perc_per_layer=0.75, lr=1e-3)
    ckpt = {"args": args, "epoch": 3, "accuracy": 91.25, "errors": [8.75, 1.5], "dataset2idx": dataset2idx,
            "previous_masks": previous_masks, "model": net}
    if train_biases:
        ckpt["dataset2biases"] = dataset2biases
    net.set_dataset("cars")  # main.py leaves the last dataset's classifier active
    return ckpt


def _official_logits(ckpt: dict, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    """Manager.eval for each dataset, last first (its in-place masking only removes weights)."""
    net = ckpt["model"].eval()
    out = {}
    with torch.no_grad():
        for name, idx in sorted(ckpt["dataset2idx"].items(), key=lambda kv: -kv[1]):
            for i, m in enumerate(net.shared.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    mask = ckpt["previous_masks"][i]
                    m.weight[mask.eq(0)] = 0.0
                    m.weight[mask.gt(idx)] = 0.0
                    if "dataset2biases" in ckpt and m.bias is not None:
                        m.bias.copy_(ckpt["dataset2biases"][name][i])
            net.set_dataset(name)
            out[name] = forward(net, x)
    return out


def _vgg_forward(net, x):
    for m in net.shared.children():
        if type(m).__name__ == "View":
            # torchvision's VGG pools to 7x7 here, a no-op at the official 224 px; it lets 32 px run
            x = F.adaptive_avg_pool2d(x, 7)
        x = m(x)
    return net.classifier(x.view(x.size(0), -1))


def _resnet_forward(net, x):
    return net.classifier(net.shared(x).view(x.size(0), -1))


def _densenet_forward(net, x):
    # official: F.avg_pool2d(kernel_size=7), equal to the global pool at 224 px (7x7 features)
    out = F.adaptive_avg_pool2d(F.relu(net.shared(x)), 1)
    return net.classifier(out.view(x.size(0), -1))


def _assert_same_logits(model, expected: dict[str, torch.Tensor], x: torch.Tensor, light: bool = False) -> None:
    """Each task's logits equal the source's. ``light``: run ``model.task_state_dict(k)`` through
    one network built on the meta device (what ``task_module`` does, without initialising a
    138 M-weight VGG-16 per task on a shared two-core machine; VGG has no buffers to miss)."""
    if light:
        from packnet_export import models

        with torch.device("meta"):
            skeleton = models.build(model.arch, 10).eval()
    with torch.no_grad():
        for name, ref in expected.items():
            if light:
                got = torch.func.functional_call(skeleton, model.task_state_dict(model.task_number(name)), (x,))
            else:
                got = model.task_module(name)(x)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"task {name}")


def test_official_vgg16_legacy_file_with_per_task_biases(networks, tmp_path):
    net = networks.ModifiedVGG16()
    ckpt = _official_checkpoint(net, 4096, train_biases=True)
    source = tmp_path / "cars_final.pt"
    torch.save(ckpt, source, _use_new_zipfile_serialization=False)  # PyTorch 0.2's format
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _official_logits(ckpt, x, _vgg_forward)
    masks = {i: m.clone() for i, m in ckpt["previous_masks"].items()}
    del ckpt, net

    model = import_file(source)
    assert model.arch == "vgg16" and model.per_task_norm  # the biases differ per dataset
    assert model.task_names == ["imagenet", "cubs", "cars"]
    assert [t.num_classes for t in model.tasks] == [1000, 5, 4]
    assert model.image_size == 224 and model.mean == checkpoint.IMAGENET_MEAN
    # fc6 is module 33 of shared.modules() (the Sequential itself is 0, View is 32)
    assert torch.equal(model.owners["classifier.0.weight"], masks[33])
    assert torch.equal(model.owners["features.0.weight"], masks[1])
    assert model.tasks[2].metrics == {"test_top1": 91.25, "test_top5": 98.5}
    _assert_same_logits(model, expected, x, light=True)


def test_official_resnet50_zip_file_shared_biases(networks, tmp_path):
    net = networks.ModifiedResNet()
    ckpt = _official_checkpoint(net, 2048, train_biases=False, seed=1)
    source = tmp_path / "resnet.pt"
    torch.save(ckpt, source)  # the zip format of PyTorch >= 1.6 is read the same way
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = _official_logits(ckpt, x, _resnet_forward)

    masks = ckpt["previous_masks"]
    del ckpt, net

    out = tmp_path / "imported.safetensors"
    result = runner.invoke(app, ["import", str(source), "-o", str(out), "--from", "official", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["source"] == "official" and summary["arch"] == "resnet50" and not summary["per_task_norm"]
    assert [(t["name"], t["classes"]) for t in summary["tasks"]] == [("imagenet", 1000), ("cubs", 5), ("cars", 4)]
    model = checkpoint.load(out)
    _assert_same_logits(model, expected, x)

    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert [t["owned"] for t in info["tasks"]] == [sum(int((m == k).sum()) for m in masks.values()) for k in (1, 2, 3)]
    assert info["free"] == sum(int((m == 0).sum()) for m in masks.values())

    # class names from a text file and from an ImageFolder root; default: output indices
    names = tmp_path / "cars.txt"
    names.write_text("audi\nbmw\nfiat\nvolvo\n")
    cubs = tmp_path / "cubs_train"
    for c in ("wren", "albatross", "crow", "finch", "gull"):
        (cubs / c).mkdir(parents=True)
    again = runner.invoke(app, ["import", str(source), "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    named = runner.invoke(app, ["import", str(source), "-o", str(out), "--force", "--classes", f"cars={names}",
                                "--classes", f"cubs={cubs}"])
    assert named.exit_code == 0, named.output
    model = checkpoint.load(out)
    assert model.tasks[2].classes == ["audi", "bmw", "fiat", "volvo"]
    assert model.tasks[1].classes == ["albatross", "crow", "finch", "gull", "wren"]
    assert model.tasks[0].classes[:2] == ["000", "001"]
    wrong = runner.invoke(app, ["import", str(source), "-o", str(tmp_path / "n.safetensors"),
                                "--classes", f"cubs={names}"])
    assert wrong.exit_code == 2 and "5 outputs" in wrong.output


def test_official_densenet_cuda_saved_old_layer_names(networks, tmp_path, monkeypatch):
    """Old torchvision named DenseNet layers "norm.1"; the file was written from a GPU."""
    net = networks.ModifiedDenseNet()
    ckpt = _official_checkpoint(net, 1024, train_biases=False, seed=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    saved = {k: v.clone() for k, v in net.shared.state_dict().items()}
    expected = _official_logits(ckpt, x, _densenet_forward)
    net.shared.load_state_dict(saved)  # the official eval masks in place; save the unmasked network
    for m in net.shared.modules():
        if type(m).__name__ == "_DenseLayer":
            m._modules = type(m._modules)((k[:-1] + "." + k[-1] if k[-1] in "12" else k, v)
                                          for k, v in m._modules.items())
    assert any(".norm.1." in k for k in net.state_dict())
    source = tmp_path / "densenet.pt"
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(ckpt, source, _use_new_zipfile_serialization=False)
    monkeypatch.undo()

    model = import_file(source)
    assert model.arch == "densenet121"
    _assert_same_logits(model, expected, x)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [False, True])
def test_malicious_file_is_refused_without_running_it(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker), "previous_masks": {1: torch.ones(2, dtype=torch.uint8)},
                "dataset2idx": {"a": 1}}, source, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(PackNetError, match=r"refusing to load (posix|os|nt)\.system"):
        import_file(source)
    result = runner.invoke(app, ["import", str(source), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert "system" in result.output and not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()


def test_unknown_network_class_is_refused(tmp_path):
    source = tmp_path / "other.pt"
    torch.save({"model": nn.GRU(2, 2), "previous_masks": {}, "dataset2idx": {}}, source,
               _use_new_zipfile_serialization=False)
    with pytest.raises(PackNetError, match=r"torch\.nn\.modules\.rnn\.GRU"):
        import_file(source)


# ------------------------------------------------------------------ Avalanche
class _PackNetModule(nn.Module):
    """The buffers of avalanche.models.packnet.PackNetModule, registered in the same order."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_state", torch.tensor(0, dtype=torch.int))
        self.register_buffer("_active_task", torch.tensor(0, dtype=torch.int))
        self.register_buffer("_task_count", torch.tensor(0, dtype=torch.int))


class _PnLayer(_PackNetModule):
    """WeightAndBiasPackNetModule's state: the layer under .wrappee, then its mask buffers."""

    def __init__(self, wrappee: nn.Module) -> None:
        super().__init__()
        self.wrappee = wrappee
        self.register_buffer("PRUNED_CODE", torch.tensor(255, dtype=torch.int))
        self.register_buffer("task_index", torch.ones_like(wrappee.weight).byte() * self._task_count)
        self.register_buffer("visible_mask", torch.ones_like(self.task_index, dtype=torch.bool))
        self.register_buffer("unfrozen_mask", torch.ones_like(self.task_index, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrappee(x)  # the test masks the weights in place, as activate_task's view does


def _wrap(module: nn.Module) -> nn.Module:
    """PackNetModel.wrap: wrap Linear/Conv, recurse into Sequential by index, else by name."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return _PnLayer(module)
    if isinstance(module, nn.Sequential):
        for i, sub in enumerate(module):
            module[i] = _wrap(sub)
        return module
    for name, sub in module.named_children():
        setattr(module, name, _wrap(sub))
    return module


class _PackNetModel(_PackNetModule):
    def __init__(self, wrappee: nn.Module) -> None:
        super().__init__()
        self.wrappee = _wrap(wrappee)


def test_avalanche_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.vgg16(num_classes=6)
    model = _PackNetModel(net)
    g = torch.Generator().manual_seed(5)
    n_tasks = 2
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _PackNetModule):
                m._task_count.fill_(n_tasks)
                m._state.fill_(2)  # EVAL
            if isinstance(m, _PnLayer):
                # two finished tasks (0, 1); 2 = pruned by task 1 and handed to the next task
                m.task_index.copy_(torch.randint(0, n_tasks + 1, m.task_index.shape, generator=g))
    state = model.state_dict()
    assert "wrappee.features.0.wrappee.weight" in state and "wrappee.classifier.6.task_index" in state
    source = tmp_path / "avalanche.pth"
    torch.save(state, source)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    expected = {}
    with torch.no_grad():
        for t in reversed(range(n_tasks)):  # activate_task(t): weights with task_index <= t
            for m in model.modules():
                if isinstance(m, _PnLayer):
                    m.wrappee.weight[m.task_index.gt(t)] = 0.0
            expected[f"task_{t}"] = net.eval()(x)

    out = tmp_path / "imported.safetensors"
    result = runner.invoke(app, ["import", str(source), "--from", "avalanche", "--arch", "vgg16",
                                 "--image-size", "32", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    imported = checkpoint.load(out)
    assert imported.task_names == ["task_0", "task_1"] and imported.image_size == 32
    _assert_same_logits(imported, expected, x, light=True)
    owner = imported.owners["features.0.weight"]
    index = state["wrappee.features.0.task_index"]
    assert torch.equal(owner == 0, index == n_tasks)

    no_arch = runner.invoke(app, ["import", str(source), "-o", str(tmp_path / "x.safetensors")])
    assert no_arch.exit_code == 2 and "--arch" in no_arch.output
