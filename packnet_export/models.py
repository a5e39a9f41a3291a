"""Architecture registry.

Every architecture is a plain ``nn.Module`` builder plus the dotted path of its classifier
``nn.Linear`` (the per-task *head*). Everything else in the network is the shared backbone:
its conv and linear weights are *prunable* (they carry an owner mask), and its biases and
batch-norm tensors are *norm/bias* tensors (frozen after task 1, or kept per task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PackNetError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    head: str
    """Dotted path of the classifier ``nn.Linear`` that is replaced per task."""
    default_image_size: int
    torchvision_name: str | None = None
    """Name in ``torchvision.models`` whose weights API serves ImageNet weights."""
    description: str = ""


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.name] = spec
    return spec


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        from .errors import closest

        raise PackNetError(
            f"unknown architecture {name!r}{closest(name, ARCHITECTURES)}; "
            f"choose one of: {', '.join(ARCHITECTURES)}"
        ) from None


class VGGMini(nn.Module):
    """A small VGG-style network with batch norm for 32-64 px images on a CPU.

    Six 3x3 convolutions (widths w, 2w, 4w, 4w, 8w, 8w), four max-pools, global average
    pooling and one linear head. With w=16 it has ~0.4 M weights and trains at several
    hundred images per second on two CPU cores at 48 px.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M"]
        layers: list[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = f"build_{name}"
    return build


register(ArchSpec("vgg_mini", VGGMini, "fc", 48, None, "small VGG-style CNN with BN for 32-64 px on a CPU"))
register(ArchSpec("vgg16", _torchvision_builder("vgg16"), "classifier.6", 224, "vgg16", "VGG-16 (torchvision)"))
register(
    ArchSpec("vgg16_bn", _torchvision_builder("vgg16_bn"), "classifier.6", 224, "vgg16_bn", "VGG-16 with BN")
)
register(ArchSpec("resnet18", _torchvision_builder("resnet18"), "fc", 224, "resnet18", "ResNet-18 (torchvision)"))
register(ArchSpec("resnet50", _torchvision_builder("resnet50"), "fc", 224, "resnet50", "ResNet-50 (torchvision)"))
register(
    ArchSpec(
        "densenet121", _torchvision_builder("densenet121"), "classifier", 224, "densenet121", "DenseNet-121"
    )
)


def build(arch: str, num_classes: int, arch_kwargs: dict | None = None) -> nn.Module:
    """Build an architecture with a head of ``num_classes`` outputs."""
    spec = get_arch(arch)
    return spec.builder(num_classes=num_classes, **(arch_kwargs or {}))


def head_keys(arch: str) -> tuple[str, str]:
    head = get_arch(arch).head
    return f"{head}.weight", f"{head}.bias"


def prunable_keys(module: nn.Module, arch: str) -> list[str]:
    """State-dict keys of the conv and linear weights of the backbone (the head excluded)."""
    head = get_arch(arch).head
    keys = []
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)) and name != head:
            keys.append(f"{name}.weight")
    return keys


def split_state_keys(module: nn.Module, arch: str) -> tuple[list[str], list[str], list[str]]:
    """Partition a module's state-dict keys into (prunable, norm/bias, head)."""
    heads = list(head_keys(arch))
    prunable = prunable_keys(module, arch)
    taken = set(prunable) | set(heads)
    others = [k for k in module.state_dict() if k not in taken]
    return prunable, others, [k for k in heads if k in module.state_dict()]


def pretrained_state_dict(arch: str, weights: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ImageNet weights through torchvision's weights API (needs internet the first time).

    Returns the state dict and the class names that the weights' metadata lists.
    """
    import torchvision

    spec = get_arch(arch)
    if spec.torchvision_name is None:
        raise PackNetError(f"{arch} has no torchvision pretrained weights; use --weights PATH instead")
    enum = torchvision.models.get_model_weights(spec.torchvision_name)
    w = enum[weights] if weights else enum.DEFAULT
    try:
        state = w.get_state_dict(progress=True)
    except Exception as exc:  # network errors are many and varied
        raise PackNetError(
            f"could not download {w} ({exc.__class__.__name__}: {exc}); "
            "download the file elsewhere and pass it with --weights PATH"
        ) from None
    return state, list(w.meta.get("categories") or [])
