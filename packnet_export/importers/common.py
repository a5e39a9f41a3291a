"""What both importers share: the target architecture's layout, class names, prune fractions."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import masks, models
from ..errors import PackNetError


def reference_layout(arch: str, num_classes: int = 10) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(state dict on the meta device, prunable keys, head keys) of ``arch``: shapes only, no memory."""
    with torch.device("meta"):
        module = models.build(arch, num_classes)
    prunable, _, head = models.split_state_keys(module, arch)
    return module.state_dict(), prunable, head


def default_classes(n: int) -> list[str]:
    """Zero-padded output indices ("000".."999"): they sort like the outputs they name."""
    width = len(str(max(n - 1, 0)))
    return [f"{i:0{width}d}" for i in range(n)]


def read_class_names(source: str | os.PathLike) -> list[str]:
    """Class names from an ImageFolder root (its sorted subfolders, as torchvision's
    ``ImageFolder`` numbers them) or from a text file (one name per line)."""
    path = Path(source)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_dir())
        if not names:
            raise PackNetError(f"{path} has no class subfolders")
        return names
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise PackNetError(f"{path} lists no class names")
        return names
    raise PackNetError(f"class list {path} does not exist")


def task_classes(name: str, outputs: int, given: dict[str, list[str]]) -> list[str]:
    if name not in given:
        return default_classes(outputs)
    names = given[name]
    if len(names) != outputs:
        raise PackNetError(f"task {name!r} has {outputs} outputs but {len(names)} class names were given")
    if len(set(names)) != len(names):
        raise PackNetError(f"the class names given for task {name!r} repeat a name")
    return list(names)


def check_class_options(given: dict[str, list[str]], task_names: list[str]) -> None:
    unknown = sorted(set(given) - set(task_names))
    if unknown:
        raise PackNetError(f"--classes names task {unknown[0]!r}, but the file's tasks are: {', '.join(task_names)}")


def prune_fractions(owners: dict[str, torch.Tensor], num_tasks: int) -> list[float]:
    """The share of its weights each task freed when it was pruned.

    Task k trained on every weight not owned by tasks 1..k-1; what it did not keep is now
    owned by a later task or free.
    """
    counts = torch.zeros(num_tasks + 1, dtype=torch.long)
    for o in owners.values():
        counts += torch.bincount(o.flatten().long(), minlength=num_tasks + 1)[: num_tasks + 1]
    out = []
    for k in range(1, num_tasks + 1):
        later = int(counts[k + 1:].sum()) + int(counts[0])
        trained = later + int(counts[k])
        out.append(later / trained if trained else 0.0)
    return out


def zero_free(shared: dict[str, torch.Tensor], owners: dict[str, torch.Tensor]) -> None:
    """Set free weights to zero, as PackNet's pruning leaves them (no task reads them)."""
    for k, o in owners.items():
        shared[k] = torch.where(o == masks.FREE, torch.zeros((), dtype=shared[k].dtype), shared[k])


def check_shapes(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    for k, ref in reference.items():
        if k in state and tuple(state[k].shape) != tuple(ref.shape):
            raise PackNetError(f"{what}: {k} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}")
