"""Shared fixtures: tiny ImageFolder data made on the fly, and a tiny trained multi-task model.

Everything here runs in seconds on a CPU. Tests that need the real images of
``../shared/data/finegrained-mini`` use ``requires_shared`` and skip where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from packnet_export import checkpoint
from packnet_export.checkpoint import PackNet
from packnet_export.data import write_synthetic_image_folder
from packnet_export.training import TrainConfig, add_task

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "finegrained-mini"
requires_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/finegrained-mini is absent")

TINY_ARCH = {"arch": "vgg_mini", "arch_kwargs": {"width": 4}, "image_size": 16}
TINY_TASKS = [("alpha", 3), ("beta", 4), ("gamma", 2)]
TINY_CONFIG = dict(epochs=2, finetune_epochs=1, lr=0.05, finetune_lr=0.01, batch_size=8, val_fraction=0.2)


def make_image_folder(root: Path, classes: int, per_class: int = 8, test_per_class: int = 3, size: int = 20,
                      seed: int = 0) -> Path:
    """An ImageFolder tree whose classes differ in colour, so a tiny network can learn them."""
    return write_synthetic_image_folder(root, classes, per_class, test_per_class, size, seed)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Data folders for the tasks of ``TINY_TASKS``."""
    base = tmp_path_factory.mktemp("data")
    return {name: make_image_folder(base / name, classes, seed=i) for i, (name, classes) in enumerate(TINY_TASKS)}


def train_tiny(data: dict[str, Path], per_task_norm: bool = False, tasks=TINY_TASKS,
               snapshots: list | None = None, **config) -> PackNet:
    """A vgg_mini (width 4, 16 px) with the tasks of ``tasks`` trained for a few steps."""
    model = PackNet.create(per_task_norm=per_task_norm, **TINY_ARCH)
    for name, _ in tasks:
        model = add_task(model, name, data[name], TrainConfig(**{**TINY_CONFIG, **config}))
        if snapshots is not None:
            snapshots.append(model)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_data) -> PackNet:
    """Three tasks (3, 4 and 2 classes), shared batch norm. Do not modify it."""
    return train_tiny(tiny_data)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` saved to a file. Copy it before modifying."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    checkpoint.save(tiny_model, path)
    return path


@pytest.fixture
def probe_inputs() -> torch.Tensor:
    """A fixed batch of random inputs at the tiny model's size."""
    return torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
