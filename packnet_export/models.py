"""Architecture registry: vgg_mini, every torchvision classification model, timm models, your own.

An architecture is a builder (``builder(num_classes=N, **arch_kwargs) -> nn.Module``) under a
name. A checkpoint records only that name and the keyword arguments (JSON): no pickle and no
code, so a network of your own must be registered again (``register_builder``) in the process
that loads its checkpoint. Names resolve in this order:

1. architectures registered in this process: ``vgg_mini`` and those of ``register_builder``;
2. builders that installed packages declare under the entry-point group
   ``packnet_export.architectures`` (the command line sees them too);
3. ``timm/<name>``: ``timm.create_model(name)``, when timm is installed;
4. every name of ``torchvision.models.list_models(module=torchvision.models)``.

The per-task *head* is found from the model itself: the one layer whose output width follows
``num_classes`` (the model is built twice on the meta device with different class counts and
compared). It is the last ``nn.Linear`` of most networks and squeezenet's final 1x1
convolution. Everything else is the shared backbone, split by :func:`split_state_keys` into
*prunable* weights (they carry an owner mask) and *norm/bias* tensors (trained with task 1, then
frozen, or kept per task). ``docs/architectures.md`` lists the rule per layer kind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import PackNetError, ParameterError, closest

ENTRY_POINT_GROUP = "packnet_export.architectures"
TIMM_PREFIX = "timm/"
PROBE_CLASSES = (7, 13)
"""Two class counts the head is told apart by: the layer whose output width follows them."""
MAX_IMAGE_SIZE = 4096

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)
"""Layers whose ``weight`` is prunable, whatever their groups (depthwise and grouped convolutions
too) and wherever they sit (squeeze-excitation, MLP blocks, classifier layers before the head)."""
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
"""``nn.MultiheadAttention``'s own projection matrices: prunable like a Linear's weight (its
``out_proj`` is an ``nn.Linear``)."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    head: str | None = None
    """Dotted path of the per-task classifier layer; None: found from the model (:func:`find_head`)."""
    default_image_size: int = 224
    torchvision_name: str | None = None
    """Name in ``torchvision.models`` whose weights API serves ImageNet weights."""
    description: str = ""
    source: str = "packnet"
    """Where the builder comes from: packnet, torchvision, timm, entry point or user."""


ARCHITECTURES: dict[str, ArchSpec] = {}
"""Architectures registered in this process (``vgg_mini`` and ``register_builder``'s)."""


def register(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.name] = spec
    _clear_caches()
    return spec


def register_builder(name: str, builder: Callable[..., nn.Module], *, head: str | None = None,
                     default_image_size: int = 224, description: str = "", replace: bool = False) -> ArchSpec:
    """Make a network of your own available under ``name`` (Python API; see docs/architectures.md).

    ``builder(num_classes=N, **arch_kwargs)`` must return a fresh ``nn.Module`` whose head has N
    outputs; ``arch_kwargs`` must be JSON values (the checkpoint stores them, never the code).
    ``head`` is the dotted path of that head; without it the head is found from the model.
    Register the same name and builder again before loading a checkpoint made with it.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise PackNetError(f"architecture name {name!r} must be letters, digits, '_', '.' or '-'")
    if not callable(builder):
        raise PackNetError(f"the builder of {name!r} must be a callable returning an nn.Module")
    if name in ARCHITECTURES and not replace:
        raise PackNetError(f"architecture {name!r} is already registered; pass replace=True to replace it")
    if name not in ARCHITECTURES and name in _torchvision_names():
        raise PackNetError(f"{name!r} is a torchvision model; register yours under another name")
    if not 8 <= default_image_size <= MAX_IMAGE_SIZE:
        raise PackNetError(f"default_image_size {default_image_size} is outside 8..{MAX_IMAGE_SIZE}")
    return register(ArchSpec(name, builder, head, default_image_size, None, description, "user"))


def unregister(name: str) -> None:
    """Remove an architecture registered with :func:`register_builder`."""
    if name not in ARCHITECTURES or ARCHITECTURES[name].source != "user":
        raise PackNetError(f"{name!r} was not registered with register_builder")
    del ARCHITECTURES[name]
    _clear_caches()


def get_arch(name: str) -> ArchSpec:
    if not isinstance(name, str):
        raise PackNetError(f"architecture must be a name, not {type(name).__name__}")
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    spec = _entry_point_spec(name)
    if spec is not None:
        return spec
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name.removeprefix(TIMM_PREFIX))
    if name in _torchvision_names():
        return _torchvision_spec(name)
    raise PackNetError(
        f"unknown architecture {name!r}{closest(name, architecture_names())}; `packnet init --list-archs` lists "
        "them; a network of your own: packnet_export.models.register_builder(name, builder) in Python"
    )


def unregistered_message(name: str, arch_kwargs: dict) -> str:
    """What to do about a checkpoint whose architecture this process does not know."""
    return (f"its architecture {name!r} is not registered in this process. If it is a network of your own, "
            f"register its builder before loading: packnet_export.models.register_builder({name!r}, builder) "
            f"(it is called as builder(num_classes=N, **{json.dumps(arch_kwargs)})), or install the package "
            f"that declares it under the entry-point group {ENTRY_POINT_GROUP!r}")


def architecture_names() -> list[str]:
    """Every name :func:`get_arch` resolves, except the ``timm/`` ones (see :func:`list_architectures`)."""
    return [*ARCHITECTURES, *(n for n in _entry_points() if n not in ARCHITECTURES),
            *(n for n in _torchvision_names() if n not in ARCHITECTURES)]


def list_architectures() -> list[dict]:
    """One record per architecture: name, source, default image size, description."""
    out = []
    for name in architecture_names():
        spec = get_arch(name)
        out.append({"name": name, "source": spec.source, "default_image_size": spec.default_image_size,
                    "pretrained": spec.torchvision_name is not None, "description": spec.description})
    return out


def timm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("timm") is not None


# ------------------------------------------------------------------ the built-in ones
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



_AUXILIARY_HEADS_OFF = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}
"""Defaults that leave one head: auxiliary classifiers would be a second num_classes layer, and a
tuple of outputs while training."""


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        import torchvision

        kwargs = {**_AUXILIARY_HEADS_OFF.get(name, {}), **kwargs}
        with warnings.catch_warnings():  # googlenet/inception_v3 warn about a future change of their init
            warnings.simplefilter("ignore", FutureWarning)
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = f"build_{name}"
    return build


@functools.cache
def _torchvision_spec(name: str) -> ArchSpec:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    # the crop its ImageNet weights were evaluated at (224 for most, 240..600 for efficientnet_b1..b7)
    size = int(getattr(weights.transforms, "keywords", {}).get("crop_size", 224))
    params = weights.meta.get("num_params")
    about = f"{params / 1e6:.1f} M parameters" if params else ""
    return ArchSpec(name, _torchvision_builder(name), None, size, name, f"torchvision {about}".strip(), "torchvision")


@functools.cache
def _timm_spec(name: str) -> ArchSpec:
    if not timm_available():
        raise PackNetError(f"timm/{name} needs timm: pip install 'packnet-export[timm]'")
    import timm

    if not timm.is_model(name):
        raise PackNetError(f"timm has no model {name!r}{closest(name, timm.list_models())}")

    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    size = 224
    with contextlib.suppress(Exception):  # the default config is a convenience, not a requirement
        size = int(timm.get_pretrained_cfg(name).input_size[-1])
    return ArchSpec(TIMM_PREFIX + name, build, None, size, None, "timm (timm.create_model)", "timm")


@functools.cache
def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _entry_point_spec(name: str) -> ArchSpec | None:
    ep = _entry_points().get(name)
    if ep is None:
        return None
    try:
        target = ep.load()
    except Exception as exc:  # a broken plugin must not hide the rest
        raise PackNetError(f"architecture {name!r} of entry point {ep.value} does not load: {exc}") from None
    if isinstance(target, ArchSpec):
        return target
    return ArchSpec(name, target, None, 224, None, f"entry point {ep.value}", "entry point")


def _clear_caches() -> None:
    _head_of.cache_clear()
    _min_size_of.cache_clear()
    _runs_at.cache_clear()
    _meta_probe.cache_clear()
    _entry_points.cache_clear()


# ------------------------------------------------------------------ building
def build(arch: str, num_classes: int, arch_kwargs: dict | None = None) -> nn.Module:
    """Build an architecture with a head of ``num_classes`` outputs."""
    spec = get_arch(arch)
    module = spec.builder(num_classes=num_classes, **(arch_kwargs or {}))
    if not isinstance(module, nn.Module):
        raise PackNetError(f"the builder of {arch!r} returned {type(module).__name__}, not an nn.Module")
    return module


_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.empty_strided}


class _TensorsOnMeta(TorchFunctionMode):
    """Creates parameter-like tensors (empty, zeros, ones, ...) on the meta device and leaves the
    rest on the CPU: regnet computes its stage widths with torch.arange(...).tolist(), which
    ``torch.device("meta")`` would make impossible."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_meta(arch: str, num_classes: int, arch_kwargs: dict | None = None) -> nn.Module:
    """``build`` on the meta device: shapes only, no memory and no initialisation cost."""
    try:
        with torch.device("meta"):
            return build(arch, num_classes, arch_kwargs)
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" not in str(exc):
            raise
    with _TensorsOnMeta():
        return build(arch, num_classes, arch_kwargs)


# ------------------------------------------------------------------ the head
def _kwargs_key(arch_kwargs: dict | None) -> str:
    return json.dumps(arch_kwargs or {}, sort_keys=True, default=repr)


def find_head(arch: str, arch_kwargs: dict | None = None) -> str:
    """The dotted path of the layer whose output width is ``num_classes``.

    The model is built twice on the meta device (with 7 and 13 classes); the head is the one
    module whose own parameters change shape. It must be an ``nn.Linear`` or a 1x1 convolution
    with a bias (PackNet keeps one head per task); anything else is an error that says what to do.
    """
    a, b = (build_meta(arch, n, arch_kwargs) for n in PROBE_CLASSES)
    modules_b = dict(b.named_modules())
    changed = []
    for name, sub in a.named_modules():
        other = modules_b.get(name)
        own = dict(sub.named_parameters(recurse=False))
        if other is None or any(p.shape != dict(other.named_parameters(recurse=False)).get(k, p).shape
                                for k, p in own.items()):
            changed.append((name, sub))
    hint = ("register it with register_builder(name, builder, head='path.to.layer'), or pass arch_kwargs that "
            "leave one classifier")
    if not changed:
        raise PackNetError(f"{arch}: no layer's output width follows num_classes; its builder must accept "
                           "num_classes and size its classifier with it")
    if len(changed) > 1:
        names = ", ".join(n or "<root>" for n, _ in changed[:6])
        raise PackNetError(f"{arch}: the head is ambiguous, {len(changed)} layers follow num_classes ({names}); "
                           + hint)
    name, _ = changed[0]
    _check_head(arch, a, name, PROBE_CLASSES[0])
    return name


def _check_head(arch: str, module: nn.Module, path: str, num_classes: int) -> None:
    try:
        layer = module.get_submodule(path)
    except AttributeError:
        raise PackNetError(f"{arch}: it has no layer {path!r} to use as the head") from None
    is_1x1 = isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and all(k == 1 for k in layer.kernel_size) \
        and layer.groups == 1
    if not (isinstance(layer, nn.Linear) or is_1x1):
        raise PackNetError(f"{arch}: its head {path} is a {type(layer).__name__}; PackNet's per-task head must be "
                           "an nn.Linear or a 1x1 convolution")
    if layer.bias is None:
        raise PackNetError(f"{arch}: its head {path} has no bias; PackNet keeps one (weight, bias) pair per task: "
                           "build the head with bias=True")
    if layer.weight.shape[0] != num_classes:
        raise PackNetError(f"{arch}: its head {path} has {layer.weight.shape[0]} outputs for {num_classes} classes")


@functools.lru_cache(maxsize=512)
def _head_of(arch: str, kwargs_json: str) -> str:
    spec = get_arch(arch)
    kwargs = json.loads(kwargs_json)
    if spec.head is None:
        return find_head(arch, kwargs)
    if spec.source != "packnet":  # a head given at registration: check it once
        _check_head(arch, build_meta(arch, PROBE_CLASSES[0], kwargs), spec.head, PROBE_CLASSES[0])
    return spec.head


def head_path(arch: str, arch_kwargs: dict | None = None) -> str:
    """The dotted path of ``arch``'s per-task head (cached per architecture and arguments)."""
    return _head_of(arch, _kwargs_key(arch_kwargs))


def head_keys(arch: str, arch_kwargs: dict | None = None) -> tuple[str, str]:
    head = head_path(arch, arch_kwargs)
    return f"{head}.weight", f"{head}.bias"


def check_arch_kwargs(arch: str, arch_kwargs: dict | None) -> None:
    """Arguments a checkpoint can store (JSON) that build the network and keep its head in place."""
    arch_kwargs = arch_kwargs or {}
    if not isinstance(arch_kwargs, dict) or not all(isinstance(k, str) for k in arch_kwargs):
        raise PackNetError("arch_kwargs must be a mapping of argument names to values")
    try:
        if json.loads(json.dumps(arch_kwargs)) != arch_kwargs:
            raise ValueError
    except (TypeError, ValueError):
        raise PackNetError(f"arch_kwargs {arch_kwargs!r} must be JSON values (numbers, strings, lists, "
                           "booleans): the checkpoint stores them, never code") from None
    if "num_classes" in arch_kwargs:
        raise PackNetError("arch_kwargs must not set num_classes: every task's head sets its own")
    try:
        moved = head_path(arch, arch_kwargs) != head_path(arch)
    except PackNetError:
        raise
    except Exception as exc:  # builders raise whatever their arguments provoke
        raise PackNetError(f"arch_kwargs {arch_kwargs} do not build {arch}: {_first_line(exc)}") from None
    if moved:
        raise PackNetError(f"arch_kwargs {arch_kwargs} move {arch}'s head from {head_path(arch)} to "
                           f"{head_path(arch, arch_kwargs)}; register the variant as an architecture of its own")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:200]


# ------------------------------------------------------------------ prunable vs norm/bias
def _prunable_in(module: nn.Module, head: str) -> Iterator[str]:
    for name, sub in module.named_modules():
        if name == head:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(sub, PRUNABLE_MODULES):
            yield f"{prefix}weight"
        elif isinstance(sub, nn.MultiheadAttention):
            yield from (f"{prefix}{p}" for p in ATTENTION_WEIGHTS if getattr(sub, p, None) is not None)


def prunable_keys(module: nn.Module, arch: str) -> list[str]:
    """State-dict keys of the backbone's prunable weights (the head excluded).

    Every convolution and linear weight (depthwise, grouped, squeeze-excitation and attention
    projections included). Biases, norm layers (batch, layer, group norm) and every other
    parameter (layer scale, position embeddings, ...) are norm/bias tensors.
    """
    return list(_prunable_in(module, head_path(arch)))


def split_state_keys(module: nn.Module, arch: str) -> tuple[list[str], list[str], list[str]]:
    """Partition a module's state-dict keys into (prunable, norm/bias, head)."""
    heads = list(head_keys(arch))
    prunable = prunable_keys(module, arch)
    taken = set(prunable) | set(heads)
    state = module.state_dict()
    others = [k for k in state if k not in taken]
    return prunable, others, [k for k in heads if k in state]


def layer_kinds(arch: str, arch_kwargs: dict | None = None, num_classes: int = 10) -> list[dict]:
    """Every state-dict tensor of ``arch`` with its module's kind and its role (prunable,
    norm/bias or head): what ``packnet init --list-archs`` and the docs table describe."""
    module = build_meta(arch, num_classes, arch_kwargs)
    prunable, _, head = split_state_keys(module, arch)
    roles = {**{k: "prunable" for k in prunable}, **{k: "head" for k in head}}
    out = []
    for key, tensor in module.state_dict().items():
        owner = key.rpartition(".")[0]
        sub = module.get_submodule(owner) if owner else module
        kind = type(sub).__name__
        if isinstance(sub, nn.Conv2d) and sub.groups > 1:
            kind += " (depthwise)" if sub.groups == sub.in_channels else f" (groups={sub.groups})"
        out.append({"key": key, "module": kind, "shape": list(tensor.shape), "role": roles.get(key, "norm/bias")})
    return out


# ------------------------------------------------------------------ input size
def _accepts(module: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            module(torch.empty(1, 3, size, size, device="meta"))
        return True
    except Exception:  # too small shows as RuntimeError, ValueError or AssertionError, by layer
        return False


@functools.lru_cache(maxsize=16)
def _meta_probe(arch: str, kwargs_json: str) -> nn.Module:
    try:
        return build_meta(arch, PROBE_CLASSES[0], json.loads(kwargs_json)).eval()
    except PackNetError:
        raise
    except Exception as exc:  # arguments the builder refuses (a width of -1, of 0.5...)
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise PackNetError(f"architecture arguments {kwargs_json} are invalid for {arch} ({first})") from None


@functools.lru_cache(maxsize=256)
def _runs_at(arch: str, kwargs_json: str, size: int) -> bool:
    return _accepts(_meta_probe(arch, kwargs_json), size)


def runs_at(arch: str, image_size: int, arch_kwargs: dict | None = None) -> bool:
    """Whether ``arch`` runs on a square ``image_size`` input (shape inference on the meta device)."""
    return _runs_at(arch, _kwargs_key(arch_kwargs), image_size)


@functools.lru_cache(maxsize=256)
def _min_size_of(arch: str, kwargs_json: str) -> int:
    hi = get_arch(arch).default_image_size
    while not _runs_at(arch, kwargs_json, hi):
        hi *= 2
        if hi > MAX_IMAGE_SIZE:
            raise PackNetError(f"{arch} runs at no input size from 1 to {MAX_IMAGE_SIZE} px")
    lo = 0  # sizes only grow through convolutions and pooling, so "runs at" is monotonic: bisect
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs_at(arch, kwargs_json, mid) else (mid, hi)
    return hi


def min_image_size(arch: str, arch_kwargs: dict | None = None) -> int:
    """The smallest square input (px) ``arch`` runs at, by shape inference on the meta device.

    Found by bisection below the architecture's default size: e.g. 17 for squeezenet1_1, 32 for
    vgg16 and convnext_tiny, 1 for mobilenet_v3_small, 224 for vit_b_16 (which takes no other).
    Derived, not listed, so a newly registered architecture needs no entry anywhere.
    """
    return _min_size_of(arch, _kwargs_key(arch_kwargs))


def check_image_size(arch: str, image_size: int, arch_kwargs: dict | None = None) -> None:
    """Raise a ``ParameterError`` naming ``image_size`` when ``arch`` cannot run at that size.

    The same check and words as every command's ``--image-size`` (``params.image_size``).
    """
    from . import params

    params.image_size(image_size, "image_size", arch, arch_kwargs)


# ------------------------------------------------------------------ ImageNet weights
def pretrained_state_dict(arch: str, weights: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ImageNet weights through torchvision's weights API (needs internet the first time).

    Returns the state dict and the class names that the weights' metadata lists.
    """
    import torchvision

    spec = get_arch(arch)
    if spec.torchvision_name is None:
        raise ParameterError("weights", f"{arch} has no torchvision pretrained weights; use $weights PATH instead")
    enum = torchvision.models.get_model_weights(spec.torchvision_name)
    w = enum[weights] if weights else enum.DEFAULT
    try:
        state = w.get_state_dict(progress=True)
    except Exception as exc:  # network errors are many and varied
        raise ParameterError(
            "weights", f"could not download {w} ({exc.__class__.__name__}: {exc}); "
            "download the file elsewhere and pass it with $weights PATH"
        ) from None
    return state, list(w.meta.get("categories") or [])


register(ArchSpec("vgg_mini", VGGMini, "fc", 48, None, "small VGG-style CNN with BN for 32-64 px on a CPU"))
