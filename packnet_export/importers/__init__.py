"""Import PackNet models trained elsewhere into this toolkit's checkpoint.

* ``official``: the paper's code (github.com/arunmallya/packnet), a pickled model object,
  read with a restricted unpickler that never runs code from the file;
* ``avalanche``: the state dict of Avalanche's ``PackNetModel``.

``import_file`` reads the file once, with the restricted unpickler, and recognises which of
the two it is unless told.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import PackNet
from ..errors import PackNetError, ParameterError
from ..files import output_file, regular_file, shown
from . import avalanche, official
from .common import check_import_options
from .safe_pickle import torch_load

SOURCES = ("auto", "official", "avalanche")


def read_source(path: str | os.PathLike):
    """The object in a ``torch.save`` file (legacy or zip) or a .safetensors state dict."""
    path = regular_file(path, "FILE")  # stat-ed, never opened: a FIFO or device cannot block
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a bad file
            raise PackNetError(f"{path} is not a readable safetensors file ({exc})") from None
    return torch_load(path)


def import_file(path: str | os.PathLike, source: str = "auto", *, arch: str | None = None,
                image_size: int | None = None, task_names: list[str] | None = None,
                classes: dict[str, list[str]] | None = None, mean=None, std=None) -> PackNet:
    """Convert ``path`` into a ``PackNet``. Avalanche files need ``arch`` (the state dict does
    not name its network); official files name theirs, and run at 224 px with ImageNet
    normalization like the official code."""
    if source not in SOURCES:
        raise PackNetError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    check_import_options(image_size, mean, std, task_names)  # before reading a file that may be large
    obj = read_source(path)
    if source == "auto":
        if official.is_official(obj):
            source = "official"
        elif isinstance(obj, dict) and (avalanche.is_avalanche(obj) or any(
                avalanche.is_avalanche(obj.get(k)) for k in ("state_dict", "model_state_dict", "model"))):
            source = "avalanche"
        else:
            raise PackNetError(f"{path} is neither an official PackNet checkpoint (previous_masks, model) nor an "
                               "Avalanche PackNetModel state dict (task_index buffers)")
    name = Path(path).name
    if source == "official":
        if not isinstance(obj, dict):
            raise PackNetError(f"{path} is not an official PackNet checkpoint (not a dict)")
        ignored = [param for param, v in (("arch", arch), ("task_names", task_names), ("mean", mean),
                                          ("std", std), ("image_size", image_size)) if v]
        if ignored:
            raise ParameterError(ignored[0], f"${ignored[0]} applies to Avalanche imports only: an official "
                                 "checkpoint names its architecture and datasets, and runs at 224 px with ImageNet "
                                 "normalization")
        return official.convert(obj, classes, source=name)
    if arch is None:
        raise ParameterError("arch", "an Avalanche state dict does not name its network: pass $arch (e.g. vgg16)")
    kwargs = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    return avalanche.convert(obj, arch, image_size, task_names, classes, source=name, **kwargs)


def write_checkpoint(model: PackNet, output: str | os.PathLike, force: bool = False) -> None:
    """Write ``model`` to ``output`` only once the written file passes ``checkpoint.load``'s
    checks: the import is written beside ``output`` under a hidden name, loaded back, then
    renamed over it. A failing import never replaces a good checkpoint (``--force``)."""
    import contextlib
    import secrets

    from .. import checkpoint

    output = output_file(output, "$output")  # never a folder, FIFO or device; the name fits
    if output.exists() and not force:
        raise ParameterError("force", f"{shown(output)} exists; pass $force to overwrite it")
    staged = output.with_name(f".{output.name}.import-{secrets.token_hex(4)}.tmp")
    try:
        checkpoint.save(model, staged)
        checkpoint.load(staged)  # the same checks every later command runs
        os.replace(staged, output)
    except OSError as exc:
        raise PackNetError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()


__all__ = ["SOURCES", "import_file", "read_source", "write_checkpoint"]
