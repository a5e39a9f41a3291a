"""Reading plain weight files (ImageNet-pretrained state dicts) without running code from them."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PackNetError
from .files import check_safetensors_header, regular_file, shown


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file read with ``weights_only=True``.

    ``weights_only`` makes torch's unpickler refuse anything but tensors and plain
    containers, so a hostile file cannot run code.
    """
    path = regular_file(path, "weights file")  # never open a FIFO or a device
    if path.suffix == ".safetensors":
        check_safetensors_header(path, lambda what: PackNetError(f"cannot read weights from {shown(path)}: {what}"))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PackNetError(f"cannot read weights from {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackNetError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}
