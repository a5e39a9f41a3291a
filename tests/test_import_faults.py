"""Broken imports: every defect of an Avalanche state dict, an official checkpoint or an import
option is one ``error:`` line and exit 2, checked before anything is written; a good
checkpoint under ``-o`` is never replaced by a failing import (``--force``).

The cases are generated per family from one valid file of each source: an Avalanche
``PackNetModel`` around vgg_mini (a tiny network; the importer takes any registered
architecture) and an official DenseNet-121 checkpoint written the PyTorch 0.2 way
(``legacy_pickle``), unpickled once and mutated per case.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from legacy_pickle import legacy_save
from packnet_export.cli.main import app
from test_import import _PackNetModel, _PackNetModule, _PnLayer
from test_import_legacy import official_checkpoint
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.errors import PackNetError
from packnet_export.importers import official
from packnet_export.importers.safe_pickle import torch_load
from packnet_export.models import VGGMini

N_TASKS = 2


def avalanche_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A valid Avalanche state dict: vgg_mini wrapped, two finished tasks."""
    torch.manual_seed(seed)
    model = _PackNetModel(VGGMini(num_classes=3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _PackNetModule):
                m._task_count.fill_(N_TASKS)
            if isinstance(m, _PnLayer):
                m.task_index.copy_(torch.randint(0, N_TASKS + 1, m.task_index.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


WEIGHT = "wrappee.features.0.wrappee.weight"
INDEX = "wrappee.features.0.task_index"
HEAD_W, HEAD_B = "wrappee.fc.wrappee.weight", "wrappee.fc.wrappee.bias"


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


def _nan_at(key, value=float("nan")):
    def mutate(s):
        s[key] = s[key].clone()
        s[key].view(-1)[-1] = value
    return mutate


AVALANCHE_FAULTS = {
    **{f"_task_count={label}": _set("_task_count", value) for label, value in {
        "300": torch.tensor(300), "256": torch.tensor(256), "1e12": torch.tensor(10**12), "0": torch.tensor(0),
        "-1": torch.tensor(-1), "nan": torch.tensor(float("nan")), "1.5": torch.tensor(1.5),
        "two values": torch.tensor([2, 2]), "bool": torch.tensor(True)}.items()},
    **{f"task_index={label}": _set(INDEX, value) for label, value in {
        "-1": torch.full((16, 3, 3, 3), -1, dtype=torch.int64), "300": torch.full((16, 3, 3, 3), 300),
        "nan": torch.full((16, 3, 3, 3), float("nan")), "float": torch.zeros(16, 3, 3, 3),
        "flattened": torch.zeros(432, dtype=torch.uint8), "transposed": torch.zeros(3, 16, 3, 3, dtype=torch.uint8),
        "scalar": torch.tensor(0, dtype=torch.uint8)}.items()},
    "weight nan": _nan_at(WEIGHT), "weight inf": _nan_at(WEIGHT, float("inf")),
    "bn weight nan": _nan_at("wrappee.features.1.weight"),
    "weight int": _set(WEIGHT, torch.zeros(4, 3, 3, 3, dtype=torch.int64)),
    "weight missing": lambda s: s.pop(WEIGHT),
    "head 0 classes": lambda s: (s.__setitem__(HEAD_W, torch.zeros(0, 128)), s.__setitem__(HEAD_B, torch.zeros(0)),
                                 s.__setitem__("wrappee.fc.task_index", torch.zeros(0, 128, dtype=torch.uint8))),
    "head bias wrong shape": _set(HEAD_B, torch.zeros(5)),
    "head bias nan": _nan_at(HEAD_B),
    "non-string key": _set(7, torch.zeros(1)),
}


@pytest.fixture(scope="module")
def good_avalanche(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("avalanche")
    state = avalanche_state()
    path = folder / "good.pth"
    torch.save(state, path)
    return path, state


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


AVALANCHE = ["--from", "avalanche", "--arch", "vgg_mini"]


def test_the_valid_avalanche_file_imports(good_avalanche, tmp_path):
    path, _ = good_avalanche
    result = run("import", path, *AVALANCHE, "--image-size", "32", "-o", tmp_path / "ok.safetensors")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fault", list(AVALANCHE_FAULTS))
def test_avalanche_fault_is_refused_before_writing(good_avalanche, tmp_path, fault):
    _, state = good_avalanche
    state = dict(state)
    AVALANCHE_FAULTS[fault](state)
    source = tmp_path / "bad.pth"
    torch.save(state, source)
    out = tmp_path / "out.safetensors"
    one_error_line(run("import", source, *AVALANCHE, "--image-size", "32", "-o", out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _binary(tmp_path):
    path = tmp_path / "classes.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return f"task_0={path}"


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    return f"task_0={tmp_path / 'fifo'}"


OPTION_FAULTS = {
    **{f"--image-size {v}": ["--image-size", v] for v in ("0", "5", "-48", "31", "2049", "100000")},
    **{f"--mean {v}": ["--mean", v] for v in ("nan,0,0", "inf,1,1", "1,2", "a,b,c")},
    **{f"--std {v}": ["--std", v] for v in ("0,1,1", "inf,1,1", "-1,1,1", "nan,1,1")},
    **{f"--task-names {v!r}": ["--task-names", v] for v in (" ,b", "a,a", ",", "a\x01,b", "a,b,c")},
    "--classes binary file": lambda tmp: ["--classes", _binary(tmp)],
    "--classes fifo": lambda tmp: ["--classes", _fifo(tmp)],
    "--classes missing": lambda tmp: ["--classes", f"task_0={tmp / 'absent.txt'}"],
    "--classes unknown task": lambda tmp: (tmp.joinpath("names.txt").write_text("a\nb\nc\n"),
                                           ["--classes", f"nope={tmp / 'names.txt'}"])[1],
}


@pytest.mark.parametrize("fault", list(OPTION_FAULTS))
def test_bad_import_option_is_refused_naming_it(good_avalanche, tmp_path, fault):
    path, _ = good_avalanche
    option = OPTION_FAULTS[fault]
    args = option(tmp_path) if callable(option) else option
    out = tmp_path / "out.safetensors"
    base = [] if "--image-size" in args else ["--image-size", "32"]
    line = one_error_line(run("import", path, *AVALANCHE, *base, *args, "-o", out))
    assert fault.split()[0] in line or "class list" in line or "--classes" in line, line
    assert not out.exists()


@pytest.mark.parametrize("fault", ["weight nan", "_task_count=300", "head 0 classes"])
def test_force_never_replaces_a_good_checkpoint_with_a_bad_import(good_avalanche, tmp_path, fault):
    path, state = good_avalanche
    out = tmp_path / "model.safetensors"
    assert run("import", path, *AVALANCHE, "--image-size", "32", "-o", out).exit_code == 0
    before = out.read_bytes()
    state = dict(state)
    AVALANCHE_FAULTS[fault](state)
    torch.save(state, tmp_path / "bad.pth")
    one_error_line(run("import", tmp_path / "bad.pth", *AVALANCHE, "--image-size", "32", "-o", out, "--force"))
    assert out.read_bytes() == before
    checkpoint.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "model.safetensors"]


# ------------------------------------------------------------------ official checkpoints
@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory) -> dict:
    """An official DenseNet-121 checkpoint (PyTorch 0.2 bytes), unpickled once."""
    path = tmp_path_factory.mktemp("official") / "final.pt"
    path.write_bytes(official_checkpoint("densenet121", train_biases=True, seed=5)[0])
    return torch_load(path)


def _first_conv(ckpt):
    return ckpt["model"].children["shared"].children["conv0"]


def _shared_module_positions(ckpt):
    return sorted(ckpt["previous_masks"])


def _mask(ckpt, value):
    key = _shared_module_positions(ckpt)[0]
    ckpt["previous_masks"] = {**ckpt["previous_masks"], key: value(ckpt["previous_masks"][key])}


def _biases(ckpt, mutate):
    ckpt["dataset2biases"] = copy.copy(ckpt["dataset2biases"])
    mutate(ckpt["dataset2biases"])


def _param(ckpt, name, value):
    conv = copy.copy(_first_conv(ckpt))
    conv._parameters = {**conv._parameters, name: value}
    shared = copy.copy(ckpt["model"].children["shared"])
    shared._modules = {**shared._modules, "conv0": conv}
    net = copy.copy(ckpt["model"])
    net._modules = {**net._modules, "shared": shared}
    ckpt["model"] = net


def _model_attr(ckpt, name, value, on_shared=False):
    net = copy.copy(ckpt["model"])
    if on_shared:
        shared = copy.copy(net.children["shared"])
        setattr(shared, name, value)
        net._modules = {**net._modules, "shared": shared}
    else:
        setattr(net, name, value)
    ckpt["model"] = net


def _bias_entry(ckpt):
    name = "cubs"
    return name, next(iter(ckpt["dataset2biases"][name]))


OFFICIAL_FAULTS = {
    **{f"dataset2idx={label}": lambda c, v=v: c.__setitem__("dataset2idx", {**c["dataset2idx"], "cars": v})
       for label, v in {"'x'": "x", "1.5": 1.5, "list": [3], "None": None, "True": True, "0": 0, "256": 256,
                        "-1": -1, "repeated": 2}.items()},
    "dataset2idx a list": lambda c: c.__setitem__("dataset2idx", [["cars", 1]]),
    "dataset2idx key not a string": lambda c: c.__setitem__("dataset2idx", {1: 1}),
    "dataset2biases a list": lambda c: c.__setitem__("dataset2biases", [1, 2]),
    "dataset2biases entry a string": lambda c: _biases(c, lambda b: b.__setitem__("cubs", "x")),
    "dataset2biases for a bias-free layer": lambda c: _biases(c, lambda b: b.__setitem__("cubs", {
        _shared_module_positions(c)[0]: torch.zeros(64)})),
    "dataset2biases not a tensor": lambda c: _biases(c, lambda b: b.__setitem__("cubs", {
        **b["cubs"], _shared_module_positions(c)[0]: "bias"})),
    "dataset2biases key a string": lambda c: _biases(c, lambda b: b.__setitem__("cubs", {"conv0": torch.zeros(1)})),
    "shared._modules a list": lambda c: _model_attr(c, "_modules", [1, 2], on_shared=True),
    "model.datasets None": lambda c: _model_attr(c, "datasets", None),
    "model.datasets of ints": lambda c: _model_attr(c, "datasets", [1, 2, 3]),
    "parameter a string": lambda c: _param(c, "weight", "weights"),
    "parameter nan": lambda c: _param(c, "weight", torch.full_like(_first_conv(c).parameters["weight"], float("nan"))),
    "parameter int": lambda c: _param(c, "weight", torch.zeros_like(_first_conv(c).parameters["weight"],
                                                                    dtype=torch.int64)),
    "mask float": lambda c: _mask(c, lambda m: m.float()),
    "mask nan": lambda c: _mask(c, lambda m: torch.full(m.shape, float("nan"))),
    "mask 300": lambda c: _mask(c, lambda m: torch.full(m.shape, 300, dtype=torch.int64)),
    "mask -1": lambda c: _mask(c, lambda m: torch.full(m.shape, -1, dtype=torch.int64)),
    "mask wrong shape": lambda c: _mask(c, lambda m: m.flatten()),
    "mask a string": lambda c: _mask(c, lambda m: "mask"),
    "previous_masks a list": lambda c: c.__setitem__("previous_masks", [1]),
    "model a dict": lambda c: c.__setitem__("model", {"shared": 1}),
}


def test_the_valid_official_checkpoint_converts(official_ckpt):
    model = official.convert(dict(official_ckpt))
    assert model.task_names == ["imagenet", "cubs", "cars"]


@pytest.mark.parametrize("fault", list(OFFICIAL_FAULTS))
def test_official_fault_is_refused(official_ckpt, fault):
    ckpt = dict(official_ckpt)
    OFFICIAL_FAULTS[fault](ckpt)
    with pytest.raises(PackNetError) as caught:
        official.convert(ckpt)
    assert "\n" not in str(caught.value)


def test_official_fault_through_the_command_line(tmp_path):
    """An official-looking file (PyTorch 0.2 bytes) whose model is not a network: one line, exit 2."""
    source = tmp_path / "final.pt"
    source.write_bytes(legacy_save({"model": None, "previous_masks": {1: None}, "dataset2idx": {"a": 1.5}}))
    out = tmp_path / "out.safetensors"
    line = one_error_line(run("import", source, "-o", out))
    assert "model" in line, line
    assert not out.exists()
