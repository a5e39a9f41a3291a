"""One place checks every parameter: the Python API and the command line say the same thing.

The library names its parameter (``lr must be ...``); the command line names the flag
(``--lr must be ...``); both before anything is read or written.
"""

from __future__ import annotations

import math

import pytest
import torch
from hostile import invoke

from packnet_export import models, params
from packnet_export.checkpoint import PackNet
from packnet_export.params import ParamError
from packnet_export.training import TrainConfig


@pytest.mark.parametrize("field,value", [
    ("lr", math.nan), ("lr", math.inf), ("lr", -1.0), ("lr", 0.0), ("lr", 1e308), ("finetune_lr", math.nan),
    ("finetune_lr", -1.0), ("momentum", math.nan), ("momentum", -1.0), ("momentum", 1.0), ("weight_decay", math.nan),
    ("weight_decay", -1.0), ("lr_decay_every", 0), ("lr_decay_every", -1), ("val_fraction", -1.0),
    ("val_fraction", math.nan), ("val_fraction", 1.0), ("workers", -1), ("seed", 2**64), ("seed", 2**70),
    ("seed", -1), ("epochs", -1), ("batch_size", 0), ("prune", 5.0), ("prune", -1.0), ("prune", math.nan),
    ("device", "foo"), ("device", ""), ("device", "meta"), ("device", "cuda:99"), ("amp", "fp8"),
    ("epochs", 2.5), ("lr", "0.1"), ("strict", "yes"),
])
def test_train_config_refuses_naming_the_field(field, value):
    with pytest.raises(ParamError) as caught:
        TrainConfig(**{field: value})
    assert caught.value.param == field and str(caught.value).startswith(field)
    assert "\n" not in str(caught.value)


def test_train_config_accepts_the_edges():
    TrainConfig(epochs=0, finetune_epochs=0, lr=10.0, finetune_lr=1e-12, momentum=0.0, weight_decay=0.0,
                prune=0.0, val_fraction=0.0, seed=2**63 - 1, lr_decay_every=1)


def test_devices():
    assert params.device("cpu") == "cpu"
    for bad in ("meta", "", "foo", "cpu:0:1", " cpu", "CUDA"):
        with pytest.raises(ParamError):
            params.device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ParamError, match="no CUDA GPU"):
            params.device("cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ParamError, match="MPS"):
            params.device("mps")


def test_minimum_input_size_is_derived_from_the_network():
    """vgg_mini has four 2x2 max-pools: 16 px is its smallest input; vgg16 has five: 32 px."""
    assert models.min_image_size("vgg_mini", {"width": 4}) == 16
    assert models.min_image_size("vgg16") == 32
    with pytest.raises(ParamError, match="at least 16 for vgg_mini"):
        params.image_size(15, "image_size", "vgg_mini", {"width": 4})
    with pytest.raises(ParamError, match="at least 16"):
        PackNet.create("vgg_mini", 8, {"width": 4})
    for bad in (0, 1, 7, -5, 100000, 2**64):
        with pytest.raises(ParamError):
            params.image_size(bad, "image_size", "vgg_mini", {"width": 4})


@pytest.mark.parametrize("argv,flag", [
    (["init", "--arch", "vgg_mini", "--image-size", "15", "-o", "x.safetensors"], "--image-size"),
    (["init", "--arch", "vgg_mini", "--seed", str(2**64), "-o", "x.safetensors"], "--seed"),
    (["init", "--arch", "vgg_mini", "--width", "0", "-o", "x.safetensors"], "--width"),
    (["init", "--arch", "vgg_nope", "-o", "x.safetensors"], "unknown architecture"),
    (["add-task", "m.safetensors", "--name", "t", "--data", "d", "--lr", "nan"], "--lr"),
    (["add-task", "m.safetensors", "--name", "t", "--data", "d", "--finetune-lr", "-1"], "--finetune-lr"),
    (["add-task", "m.safetensors", "--name", "t", "--data", "d", "--lr-decay-every", "0"], "--lr-decay-every"),
    (["add-task", "m.safetensors", "--name", "t", "--data", "d", "--device", "meta"], "--device"),
    (["add-task", "m.safetensors", "--name", "", "--data", "d"], "--name"),
    (["add-task", "m.safetensors", "--name", "a/b", "--data", "d"], "--name"),
    (["eval", "m.safetensors", "--task", "t", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["eval", "m.safetensors", "--task", "t", "--data", "d", "--split", "val"], "--split"),
    (["add-task", "m.safetensors", "--name", "t", "--data", "d", "--epochs", "1e3"], "--epochs"),
])
def test_command_line_names_the_flag_and_writes_nothing(argv, flag, tmp_path, monkeypatch):
    """Checked before the (absent) checkpoint or data are looked at: the option is the first error."""
    monkeypatch.chdir(tmp_path)
    result = invoke(argv)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error:") and flag in line, line
    assert list(tmp_path.iterdir()) == []
