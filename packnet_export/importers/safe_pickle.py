"""Read a ``torch.save`` file without running code from it.

A pickle names the Python callables it needs to rebuild its objects, and the standard
unpickler imports and calls them: opening a foreign checkpoint with ``torch.load`` can run
anything. Here every name goes through ``RestrictedUnpickler.find_class``, which answers
with one of three things only:

* an allowed, side-effect-free callable (tensor and parameter rebuilders, ``OrderedDict``,
  ``torch.Size``, legacy tensor types mapped to CPU, numpy scalars);
* an *inert stand-in* for a known module class (the official PackNet ``networks`` classes,
  the ``torch.nn`` and ``torchvision`` modules those networks hold): an object that only
  keeps the attributes the pickle gives it and has no methods that could run;
* a ``PackNetError`` naming the refused class, before anything is called.

Storages are handled by ``torch.load`` itself (its wrapper answers names containing
"Storage" before ours is asked), and ``map_location='cpu'`` moves CUDA-saved tensors to the
CPU. Both the legacy (PyTorch <= 1.5, non-zip) format and the zip format go through the
same unpickler, because ``torch.load`` builds its own unpickler on ``pickle_module.Unpickler``.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import collections
import copyreg
import io
import os
import pickle
import warnings
from typing import Any

import torch

from ..errors import PackNetError


class InertModule:
    """The attributes of a pickled ``nn.Module``, without any of its behaviour.

    ``source_class`` says which class the file named ("networks.ModifiedVGG16", ...).
    """

    source_class = ""
    dump_patches = False  # read by torch.load's source-change check on legacy files

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slot state)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            raise PackNetError(f"unexpected pickled state for {self.source_class}")

    # -- read-only views on the pickled module attributes
    @property
    def children(self) -> dict[str, InertModule]:
        return {k: v for k, v in (self.__dict__.get("_modules") or {}).items() if v is not None}

    @property
    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (self.__dict__.get("_parameters") or {}).items() if v is not None}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        skip = self.__dict__.get("_non_persistent_buffers_set") or set()
        return {k: v for k, v in (self.__dict__.get("_buffers") or {}).items() if v is not None and k not in skip}

    @property
    def class_name(self) -> str:
        return self.source_class.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<inert {self.source_class}>"


def named_modules(root: InertModule, prefix: str = "") -> list[tuple[str, InertModule]]:
    """Pre-order (path, module) pairs, each module once: the order of ``nn.Module.modules()``,
    whose positions are the keys of the official code's ``previous_masks``."""
    seen: set[int] = set()
    out: list[tuple[str, InertModule]] = []

    def visit(module: InertModule, path: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        out.append((path, module))
        for name, child in module.children.items():
            if not isinstance(child, InertModule):
                raise PackNetError(f"submodule {path + '.' if path else ''}{name} is not a module")
            visit(child, f"{path}.{name}" if path else name)

    visit(root, prefix)
    return out


# Module classes that may appear in the official networks (and in plain torchvision models).
STAND_IN_CLASSES = {
    "networks.View",
    "networks.ModifiedVGG16",
    "networks.ModifiedVGG16BN",
    "networks.ModifiedResNet",
    "networks.ModifiedDenseNet",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.flatten.Flatten",
    "torchvision.models.vgg.VGG",
    "torchvision.models.resnet.ResNet",
    "torchvision.models.resnet.Bottleneck",
    "torchvision.models.resnet.BasicBlock",
    "torchvision.models.densenet.DenseNet",
    "torchvision.models.densenet._DenseLayer",
    "torchvision.models.densenet._DenseBlock",
    "torchvision.models.densenet._Transition",
}

_STAND_INS: dict[str, type] = {}


def stand_in(qualified: str) -> type:
    """The (cached) inert class standing in for ``qualified``."""
    if qualified not in _STAND_INS:
        _STAND_INS[qualified] = type(qualified.rsplit(".", 1)[-1], (InertModule,), {"source_class": qualified})
    return _STAND_INS[qualified]


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 pickles), for the allowed classes only."""
    return copyreg._reconstructor(cls, base, state)


_LEGACY_TENSOR_TYPES = ("Double", "Float", "Half", "Byte", "Char", "Short", "Int", "Long", "Bool", "BFloat16")


def _allowed() -> dict[str, Any]:
    import torch._utils as tu

    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "builtins.bytearray": bytearray,
        "_codecs.encode": codecs.encode,  # how protocol-2 pickles spell bytes
        "copyreg._reconstructor": _reconstructor,
        "argparse.Namespace": argparse.Namespace,  # the official code's saved ``args``
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch._utils._rebuild_tensor": tu._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": tu._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": tu._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": tu._rebuild_parameter_with_state,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.autograd.variable.Variable": torch.autograd.Variable,
    }
    for kind in _LEGACY_TENSOR_TYPES:
        cpu_type = getattr(torch, f"{kind}Tensor", None)
        if cpu_type is not None:
            allowed[f"torch.{kind}Tensor"] = cpu_type
            allowed[f"torch.cuda.{kind}Tensor"] = cpu_type  # rebuilt on the CPU
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    try:
        import numpy as np

        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[f"{mod}.scalar"] = _numpy_scalar
        allowed["numpy.dtype"] = np.dtype
    except ImportError:  # numpy is a dependency, but keep the unpickler usable without it
        pass
    return allowed


def _numpy_scalar(dtype, data=None):
    """numpy's scalar rebuilder, refusing object scalars (which would hold arbitrary objects)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise PackNetError("refusing a numpy object scalar in the pickle")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED: dict[str, Any] | None = None


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the names listed above."""

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        # Python 2 pickles (the official code ran on Python 2) use old module names
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        module = {"torch.tensor": "torch._tensor"}.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if qualified in STAND_IN_CLASSES:
            return stand_in(qualified)
        raise PackNetError(
            f"refusing to load {qualified} from the file: it is not a class a PackNet checkpoint holds, "
            "and unpickling it could run code"
        )


def load(file, **kwargs) -> Any:
    """``pickle.load`` through ``RestrictedUnpickler`` (``torch.load`` calls it for headers)."""
    return RestrictedUnpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs) -> Any:
    return load(io.BytesIO(data), **kwargs)


# ``torch.load(pickle_module=...)`` uses ``Unpickler`` and ``load`` of this module
Unpickler = RestrictedUnpickler


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` of a legacy or zip file with the restricted unpickler, tensors on the CPU."""
    import sys

    try:
        with warnings.catch_warnings():
            # legacy files carry their classes' source; ours differs (inert stand-ins) on purpose
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", pickle_module=sys.modules[__name__],
                              weights_only=False, encoding="latin1")
    except PackNetError:
        raise
    except FileNotFoundError:
        raise PackNetError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise PackNetError(f"{path} is a folder, not a checkpoint file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, OSError, UnicodeDecodeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise PackNetError(f"{path} is not a readable torch.save file ({msg[:200]})") from None
