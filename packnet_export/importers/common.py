"""What both importers share: the target architecture's layout, class names, prune fractions."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import masks, models, params
from ..errors import PackNetError, ParameterError


def reference_layout(arch: str, num_classes: int = 10) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(state dict on the meta device, prunable keys, head keys) of ``arch``: shapes only, no memory."""
    module = models.build_meta(arch, num_classes)
    prunable, _, head = models.split_state_keys(module, arch)
    return module.state_dict(), prunable, head


MAX_CLASSES = 100_000
"""More outputs than any classification head in use; a bigger head is a forged file."""
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048
"""Inputs the registered networks accept: five stride-2 stages need 32 px; 2048 px is past any
classification network's training size (and its activations already take gigabytes)."""
MAX_CLASS_FILE_BYTES = 16 << 20


def check_tensor(value, what: str, *, integer: bool = False, shape: tuple | None = None) -> torch.Tensor:
    """``value`` as a dense tensor of the expected kind (float, or integer for masks), finite,
    of ``shape`` when given: the checks every imported tensor passes before it is converted."""
    if not isinstance(value, torch.Tensor):
        raise PackNetError(f"{what} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise PackNetError(f"{what} is a {value.layout} tensor, not a dense one")
    if integer and (value.is_floating_point() or value.is_complex()):
        raise PackNetError(f"{what} is a {value.dtype} tensor; it should hold integer task ids")
    if not integer and not value.is_floating_point():
        raise PackNetError(f"{what} is a {value.dtype} tensor, not floating point")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise PackNetError(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not integer and value.numel() and not bool(torch.isfinite(value).all()):
        raise PackNetError(f"{what} holds NaN or infinite values")
    return value


def check_head(weight, bias, what: str, in_width: int | None = None) -> int:
    """The number of classes of a classifier head (weight, bias), refusing empty or forged ones."""
    check_tensor(weight, f"{what} weight")
    if weight.dim() != 2 or (in_width is not None and weight.shape[1] != in_width):
        expected = f"(classes, {in_width})" if in_width is not None else "(classes, features)"
        raise PackNetError(f"{what} weight has shape {tuple(weight.shape)}, expected {expected}")
    classes = weight.shape[0]
    if not 1 <= classes <= MAX_CLASSES:
        raise PackNetError(f"{what} has {classes} classes; a head needs 1 to {MAX_CLASSES:,}")
    check_tensor(bias, f"{what} bias", shape=(classes,))
    return classes


def check_import_options(image_size: int | None, mean, std, task_names: list[str] | None) -> None:
    """The Avalanche import's options, each refused with its option's name."""
    if image_size is not None:
        params.integer(image_size, "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    for param, values in (("mean", mean), ("std", std)):
        if values is not None:
            params.normalization(tuple(values), param, std=param == "std")
    if task_names is not None:
        for name in task_names:
            params.name(name, "task_names")
        if len(set(task_names)) != len(task_names):
            raise ParameterError("task_names", "$task_names names the same task twice")


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
        if path.stat().st_size > MAX_CLASS_FILE_BYTES:
            raise PackNetError(f"class list {path} is larger than {MAX_CLASS_FILE_BYTES >> 20} MB: not a list of names")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise PackNetError(f"class list {path} is not UTF-8 text (one class name per line)") from None
        except OSError as exc:
            raise PackNetError(f"cannot read class list {path}: {exc.strerror}") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise PackNetError(f"{path} lists no class names")
        bad = next((n for n in names if not n.isprintable()), None)
        if bad is not None:
            raise PackNetError(f"class list {path} holds {bad[:40]!r}, not a printable class name")
        return names
    if path.exists():
        raise PackNetError(f"class list {path} is not a regular file or folder (a pipe or device?)")
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
        raise ParameterError("classes", f"$classes names task {unknown[0]!r}, but the file's tasks are: "
                             f"{', '.join(task_names)}")


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
