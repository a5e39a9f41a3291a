"""Read a ``torch.save`` file without running code from it, in memory bounded by the file.

A pickle names the Python callables it needs to rebuild its objects, and the standard
unpickler imports and calls them: opening a foreign checkpoint with ``torch.load`` can run
anything. Here every name goes through ``RestrictedUnpickler.find_class``, which answers
with one of three things only:

* an allowed, side-effect-free callable (tensor and parameter rebuilders, ``OrderedDict``,
  ``torch.Size``, legacy tensor types mapped to CPU, numpy scalars), wrapped where its
  arguments could make it allocate what the file does not hold;
* an *inert stand-in* for a known module class (the official PackNet ``networks`` classes,
  the ``torch.nn`` and ``torchvision`` modules those networks hold, and the PyTorch 0.2
  ``_backend`` every module of that era carries): an object that only keeps the attributes
  the pickle gives it and has no methods that could run;
* a ``PackNetError`` naming the refused class, before anything is called.

Refusing code is not enough: a pickle of a few bytes can also *declare* work. The
unpickler is CPython's pure-Python one (``pickle._Unpickler``, whose opcodes can be
overridden one by one), bounded so that a hostile file fails with one ``PackNetError``
before it allocates or loops:

* every length the stream declares (strings, bytes, frames, ``bytearray``) must fit in
  what is left of the file; storages declared by persistent ids must fit, together, in
  the file (``STORAGE_SLACK`` aside): PyTorch allocates them before reading them;
* containers nest at most ``MAX_DEPTH`` deep (CPython's tuple hash and repr recurse on
  the C stack: a tuple nested 500,000 deep kills the process);
* a dict key or set element must hash in at most ``MAX_HASH_COST`` steps (a tuple whose
  two items are the same tuple, 60 times over, hashes 2**60 leaves);
* a tensor may not address more elements than its storage holds (a stride-0 view of one
  float declaring 10**8 classes), and all tensors together at most the storage budget;
* a zip file's records must declare, together, at most twice the file's size (an
  inflate bomb of 2 GiB in 2 MB), and the legacy tar format (PyTorch < 0.1.10, which
  ``torch.load`` extracts to disk) is refused.

Storages are handled by ``torch.load`` itself (its wrapper answers names containing
"Storage" before ours is asked), and ``map_location='cpu'`` moves CUDA-saved tensors to the
CPU. Both the legacy (PyTorch <= 1.5, non-zip) format and the zip format go through the
same unpickler, because ``torch.load`` builds its own unpickler on ``pickle_module.Unpickler``.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import contextvars
import copyreg
import io
import os
import pickle
import tarfile
import warnings
import zipfile
from typing import Any

import torch

from ..errors import PackNetError
from ..files import regular_file, shown

MAX_DEPTH = 100
"""Deepest container nesting accepted (the official DenseNet-121 nests about 20 deep)."""
MAX_HASH_COST = 10_000
"""Most tuple/frozenset items one dict key or set element may make ``hash`` visit."""
MAX_OPEN_CONTAINERS = 10_000
"""Most objects on the unpickler's stack when a new container starts (batches hold 1,000)."""
STORAGE_SLACK = 1 << 20
"""Bytes of storage a file may declare beyond its own size (tiny files, empty storages)."""


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
        return {k: v for k, v in _mapping(self, "_modules").items() if v is not None}

    @property
    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in _mapping(self, "_parameters").items() if v is not None}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        skip = self.__dict__.get("_non_persistent_buffers_set") or set()
        return {k: v for k, v in _mapping(self, "_buffers").items() if v is not None and k not in skip}

    @property
    def class_name(self) -> str:
        return self.source_class.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<inert {self.source_class}>"


def _mapping(module: InertModule, attribute: str) -> dict:
    """``module.<attribute>`` as a dict of str keys: the shape every ``nn.Module`` pickles it in."""
    value = module.__dict__.get(attribute)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PackNetError(f"{module.source_class}.{attribute} is a {type(value).__name__}, not a dict of named "
                           "entries: the file is not a saved module")
    return value


def named_modules(root: InertModule, prefix: str = "") -> list[tuple[str, InertModule]]:
    """Pre-order (path, module) pairs, each module once: the order of ``nn.Module.modules()``,
    whose positions are the keys of the official code's ``previous_masks``."""
    seen: set[int] = set()
    out: list[tuple[str, InertModule]] = []
    stack = [(prefix, root)]
    while stack:  # iterative: a hostile file may nest modules deeply
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((path, module))
        children = []
        for name, child in module.children.items():
            if not isinstance(child, InertModule):
                raise PackNetError(f"submodule {path + '.' if path else ''}{name} is a {type(child).__name__}, "
                                   "not a module")
            children.append((f"{path}.{name}" if path else name, child))
        stack.extend(reversed(children))
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


class LegacyBackend:
    """What PyTorch <= 0.3 modules kept in ``_backend``: pickled as a call to
    ``torch.nn.backends.thnn._get_thnn_function_backend()``. Only a marker here."""

    def __repr__(self) -> str:
        return "<inert torch.nn.backends.thnn backend>"


LEGACY_BACKEND = LegacyBackend()


def _thnn_backend(*args: Any) -> LegacyBackend:
    if args:
        raise PackNetError("the file calls torch.nn.backends.thnn._get_thnn_function_backend with arguments; "
                           "PyTorch never wrote that")
    return LEGACY_BACKEND


class LoadedParameter(torch.nn.Parameter):
    """``Parameter(data)`` (and ``Variable(data)``) as PyTorch <= 0.3 pickled them, followed by
    BUILD with ``(requires_grad, volatile, backward_hooks)``. Only ``requires_grad`` is kept:
    hooks are callables, and there is no reason to hold any from a file."""

    def __new__(cls, data: Any = None, requires_grad: Any = True):
        if not isinstance(data, torch.Tensor):
            raise PackNetError(f"a parameter in the file wraps a {type(data).__name__}, not a tensor")
        return super().__new__(cls, data, bool(requires_grad) and data.is_floating_point())

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (3, 5):
            raise PackNetError("a parameter in the file has an unknown pickled state")
        self.requires_grad = bool(state[3] if len(state) == 5 else state[0]) and self.is_floating_point()


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 pickles), for the allowed classes only."""
    return copyreg._reconstructor(cls, base, state)


_LEGACY_TENSOR_TYPES = ("Double", "Float", "Half", "Byte", "Char", "Short", "Int", "Long", "Bool", "BFloat16")


def _legacy_tensor_type(kind: str):
    """``torch.FloatTensor``-style constructors, CUDA ones on the CPU. Only the forms a pickle
    uses: no argument (then BUILD with ``set_``'s state) or a sequence of values."""
    dtype = getattr(torch, f"{kind}Tensor")().dtype

    def build(*args: Any) -> torch.Tensor:
        if not args:
            return torch.empty(0, dtype=dtype)
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return torch.tensor(args[0], dtype=dtype)
        raise PackNetError(f"the file calls torch.{kind}Tensor with sizes; a saved tensor never does that")

    return build


def _check_view(storage: Any, offset: Any, size: Any, stride: Any) -> None:
    """The elements a tensor view addresses must lie inside its storage: ``set_`` would grow
    the storage to fit (an allocation the file declares but does not hold)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise PackNetError("a tensor in the file is not built on a storage")
    numbers = [offset, *size, *stride] if isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) \
        else None
    if numbers is None or len(size) != len(stride) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
        raise PackNetError("a tensor in the file has a malformed offset, size or stride")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size():
            raise PackNetError(f"a tensor in the file of shape {tuple(size)} reaches element {last:,} of a storage "
                               f"of {storage.size():,}: it is truncated or forged")


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    _check_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _bytearray(source: Any = b"", encoding: str | None = None, errors: str | None = None) -> bytearray:
    """``bytearray`` of data the file holds (as pickled), never of a size it merely names."""
    if isinstance(source, (bytes, bytearray)) and encoding is None:
        return bytearray(source)
    if isinstance(source, str) and encoding in ("latin1", "latin-1"):
        return bytearray(source, "latin-1")
    raise PackNetError(f"the file builds a bytearray from {type(source).__name__} {str(source)[:20]}; a pickled "
                       "bytearray holds its bytes")


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it to spell bytes: latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PackNetError("the file calls _codecs.encode other than to spell bytes (latin-1 text)")
    return text.encode("latin-1")


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    """``OrderedDict(items)``: Python 3 pickles pass nothing, Python 2 ones a list of [key, value]."""
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise PackNetError("the file builds an OrderedDict from something other than key, value pairs")
        _check_key(pair[0])
    return collections.OrderedDict(pairs)


def _set(items: Any = ()) -> set:
    items = list(items)
    for item in items:
        _check_key(item)
    return set(items)


def _frozenset(items: Any = ()) -> frozenset:
    items = list(items)
    for item in items:
        _check_key(item)
    out = frozenset(items)
    _measure(out, items)
    return out


def _allowed() -> dict[str, Any]:
    import torch._utils as tu

    allowed: dict[str, Any] = {
        "collections.OrderedDict": _ordered_dict,
        "builtins.set": _set,
        "builtins.frozenset": _frozenset,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "builtins.bytearray": _bytearray,
        "_codecs.encode": _encode,
        "copyreg._reconstructor": _reconstructor,
        "argparse.Namespace": argparse.Namespace,  # the official code's saved ``args``
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": tu._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": tu._rebuild_parameter_with_state,
        "torch.nn.parameter.Parameter": LoadedParameter,
        "torch.autograd.variable.Variable": LoadedParameter,
        "torch.nn.backends.thnn._get_thnn_function_backend": _thnn_backend,
    }
    for kind in _LEGACY_TENSOR_TYPES:
        if getattr(torch, f"{kind}Tensor", None) is not None:
            allowed[f"torch.{kind}Tensor"] = allowed[f"torch.cuda.{kind}Tensor"] = _legacy_tensor_type(kind)
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
    """numpy's scalar rebuilder, refusing object scalars (which would hold arbitrary objects).
    Python 2 pickles give the bytes as a latin-1 decoded ``str``."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise PackNetError("refusing a numpy object scalar in the pickle")
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise PackNetError("a numpy scalar in the file does not hold one value of its type")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED: dict[str, Any] | None = None


# ----------------------------------------------------------------- bounds
class _Shapes:
    """Depth and hash cost of every tuple and frozenset built so far (both immutable, so the
    numbers computed when they are built stay true). Holds the objects, so ids stay unique."""

    def __init__(self) -> None:
        self.of: dict[int, tuple[int, int, Any]] = {}


_SHAPES: contextvars.ContextVar[_Shapes | None] = contextvars.ContextVar("packnet_pickle_shapes", default=None)
_STORAGE_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("packnet_storage_budget", default=None)


def _shape_of(obj: Any) -> tuple[int, int]:
    """(depth, hash cost) of ``obj``; an untracked tuple is measured, iteratively, within bounds."""
    if not isinstance(obj, (tuple, frozenset)):
        return 0, 1
    shapes = _SHAPES.get()
    known = shapes.of.get(id(obj)) if shapes is not None else None
    if known is not None and known[2] is obj:
        return known[0], known[1]
    return _measure(obj, list(obj))


def _measure(obj: Any, items: list) -> tuple[int, int]:
    depth, cost = 1, 1
    for item in items:
        d, c = _shape_of(item)
        depth, cost = max(depth, d + 1), min(cost + c, MAX_HASH_COST + 1)
    if depth > MAX_DEPTH:
        raise PackNetError(f"the file nests containers more than {MAX_DEPTH} deep; a checkpoint never does")
    shapes = _SHAPES.get()
    if shapes is not None:
        shapes.of[id(obj)] = (depth, cost, obj)
    return depth, cost


def _check_key(key: Any) -> None:
    if _shape_of(key)[1] > MAX_HASH_COST:
        raise PackNetError(f"the file uses a dict key or set element of more than {MAX_HASH_COST} nested items "
                           "(hashing it could take forever); a checkpoint never does")


class _BoundedReader:
    """The file, refusing any read longer than what is left in it: pickle opcodes declare
    lengths up to 2**64, and reading one allocates it before finding the data missing."""

    def __init__(self, file: Any) -> None:
        self._file = file
        try:
            here = file.tell()
            end = file.seek(0, io.SEEK_END)
            file.seek(here)
            self.left = end - here
        except (AttributeError, OSError, ValueError):
            self.left = None

    def _take(self, n: int) -> None:
        if self.left is not None:
            if n > self.left:
                raise PackNetError(f"the pickle declares {n:,} bytes where the file has {self.left:,} left: it is "
                                   "truncated or forged")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data = self._file.read()
        else:
            self._take(n)
            data = self._file.read(n)
        if self.left is not None:
            self.left -= len(data)
        return data

    def readline(self) -> bytes:
        data = self._file.readline()
        if self.left is not None:
            self.left -= len(data)
        return data


def _op(code: bytes):
    return code[0]


class RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, resolving only the names listed above, within the bounds
    of the module docstring."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, **kwargs: Any) -> None:
        self._reader = _BoundedReader(file)
        super().__init__(self._reader, **kwargs)
        self._persistent_load = None
        self._storage_keys: set = set()
        self._storage_bytes = 0

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
            f"refusing to load {qualified[:200]} from the file: it is not a class a PackNet checkpoint holds, "
            "and unpickling it could run code"
        )

    # -- persistent ids: torch.load assigns its loader here; storages are checked before it allocates
    @property
    def persistent_load(self):
        def refuse(pid):
            raise pickle.UnpicklingError("unsupported persistent id encountered")

        if self._persistent_load is None:
            return refuse

        def checked(pid):
            if self._check_persistent_id(pid) == "module":
                return pid[1]  # torch.load would compare the class's source with ours: a stand-in has none
            return self._persistent_load(pid)

        return checked

    @persistent_load.setter
    def persistent_load(self, function) -> None:
        self._persistent_load = function

    def _check_persistent_id(self, pid: Any) -> str:
        if not isinstance(pid, tuple) or not pid:
            raise PackNetError("the file has a malformed persistent id")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            if len(pid) != 4 or not isinstance(pid[1], type) or not issubclass(pid[1], InertModule):
                raise PackNetError("the file names a module class persistently that is not an allowed module")
            return "module"
        if kind != "storage" or len(pid) not in (5, 6):
            raise PackNetError(f"the file has a persistent id of unknown kind {str(kind)[:40]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(key, (str, bytes, int)) or isinstance(numel, bool) or not isinstance(numel, int) \
                or numel < 0:
            raise PackNetError("the file declares a storage with a malformed key or size")
        try:
            element = torch._utils._element_size(getattr(storage_type, "dtype", None) or torch.uint8)
        except (TypeError, RuntimeError, AttributeError):
            raise PackNetError("the file declares a storage of an unknown type") from None
        if len(pid) == 6 and pid[5] is not None:  # legacy view: (view key, offset, size) inside the root
            view = pid[5]
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])
                    and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
                raise PackNetError("the file declares a storage view outside its storage")
        if key in self._storage_keys:
            return "storage"
        self._storage_keys.add(key)
        self._storage_bytes += numel * element
        budget = _STORAGE_BUDGET.get()
        if budget is None:
            budget = (self._reader.left or 0) + STORAGE_SLACK
        if self._storage_bytes > budget:
            raise PackNetError(f"the file declares {self._storage_bytes:,} bytes of tensor storage, more than its "
                               f"size allows ({budget:,}): it is truncated or forged")
        return "storage"

    # -- opcodes that hash or nest
    def load_tuple(self):
        items = self.pop_mark()
        out = tuple(items)
        _measure(out, items)
        self.append(out)

    def load_tuple1(self):
        out = (self.stack[-1],)
        _measure(out, list(out))
        self.stack[-1] = out

    def load_tuple2(self):
        out = (self.stack[-2], self.stack[-1])
        _measure(out, list(out))
        self.stack[-2:] = [out]

    def load_tuple3(self):
        out = (self.stack[-3], self.stack[-2], self.stack[-1])
        _measure(out, list(out))
        self.stack[-3:] = [out]

    def load_frozenset(self):
        self.append(_frozenset(self.pop_mark()))

    def load_dict(self):
        items = self.pop_mark()
        for key in items[::2]:
            _check_key(key)
        self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

    def load_setitem(self):
        _check_key(self.stack[-2])
        super().load_setitem()

    def load_setitems(self):
        items = self.stack  # the items since the last MARK, before pop_mark takes them
        for key in items[::2]:
            _check_key(key)
        super().load_setitems()

    def load_additems(self):
        for item in self.stack:
            _check_key(item)
        super().load_additems()

    def _open_container(self, load) -> None:
        # a container left open on the stack is one more level of nesting to come: refuse early
        # rather than after reading a 500,000-deep stream
        if len(self.metastack) > MAX_DEPTH or len(self.stack) > MAX_OPEN_CONTAINERS:
            raise PackNetError(f"the file nests containers more than {MAX_DEPTH} deep; a checkpoint never does")
        load(self)

    def load_mark(self):
        self._open_container(pickle._Unpickler.load_mark)

    def load_empty_list(self):
        self._open_container(pickle._Unpickler.load_empty_list)

    def load_empty_dictionary(self):
        self._open_container(pickle._Unpickler.load_empty_dictionary)

    def load_bytearray8(self):
        raise PackNetError("the file uses protocol-5 out-of-band bytearrays; torch.save never writes them")

    def load_build(self):
        state = self.stack[-1]
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                for key in part:
                    if not isinstance(key, str):
                        raise PackNetError("the file sets an object attribute whose name is not a string")
        super().load_build()

    for _code, _name in ((pickle.TUPLE, "load_tuple"), (pickle.TUPLE1, "load_tuple1"),
                         (pickle.TUPLE2, "load_tuple2"), (pickle.TUPLE3, "load_tuple3"),
                         (pickle.FROZENSET, "load_frozenset"), (pickle.DICT, "load_dict"),
                         (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems"),
                         (pickle.ADDITEMS, "load_additems"), (pickle.BYTEARRAY8, "load_bytearray8"),
                         (pickle.BUILD, "load_build"), (pickle.MARK, "load_mark"),
                         (pickle.EMPTY_LIST, "load_empty_list"), (pickle.EMPTY_DICT, "load_empty_dictionary")):
        dispatch[_code[0]] = locals()[_name]
    del _code, _name

    def load(self) -> Any:
        token = _SHAPES.set(_Shapes()) if _SHAPES.get() is None else None
        try:
            result = super().load()
        except RecursionError:
            raise PackNetError(f"the file nests objects more than {MAX_DEPTH} deep; a checkpoint never does") from None
        finally:
            if token is not None:
                _SHAPES.reset(token)
        check_object_graph(result, _STORAGE_BUDGET.get() or ((self._reader.left or 0) + STORAGE_SLACK))
        return result


def check_object_graph(root: Any, tensor_budget: int) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` and tensors addressing more than their storage
    (or, together, more than ``tensor_budget`` bytes), without recursion: lists and dicts can
    be filled after they are nested, so their depth is only known once the pickle is read."""
    depth_of: dict[int, int] = {}
    on_path: set[int] = set()
    tensor_bytes = 0
    stack: list[tuple[Any, bool]] = [(root, False)]
    keep: list[Any] = []  # holds every visited object, so that ids stay unique during the walk
    while stack:
        obj, done = stack.pop()
        oid = id(obj)
        if done:
            on_path.discard(oid)
            depth_of[oid] = 1 + max((depth_of.get(id(c), 0) for c in _contents(obj)), default=0)
            if depth_of[oid] > MAX_DEPTH:
                raise PackNetError(f"the file nests objects more than {MAX_DEPTH} deep; a checkpoint never does")
            continue
        if oid in depth_of or oid in on_path:
            continue
        keep.append(obj)
        if isinstance(obj, torch.Tensor):
            tensor_bytes += _tensor_bytes(obj)
            if tensor_bytes > tensor_budget:
                raise PackNetError(f"the file's tensors address {tensor_bytes:,} bytes, more than it holds: it "
                                   "is forged")
            depth_of[oid] = 1
            continue
        on_path.add(oid)
        stack.append((obj, True))
        stack.extend((c, False) for c in _contents(obj))


def _contents(obj: Any) -> list:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, (InertModule, argparse.Namespace)):
        return list(vars(obj).values())
    return []


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` would take made contiguous; refused when more than its storage holds."""
    if t.layout != torch.strided:
        raise PackNetError(f"the file holds a {t.layout} tensor; checkpoints hold dense tensors")
    need = t.numel() * t.element_size()
    if t.numel() and need > t.untyped_storage().nbytes():
        raise PackNetError(f"the file holds a tensor of shape {tuple(t.shape)} over a storage of "
                           f"{t.untyped_storage().nbytes():,} bytes (a stride-0 or overlapping view): "
                           "a saved weight never is")
    return need


def load(file, **kwargs) -> Any:
    """``pickle.load`` through ``RestrictedUnpickler`` (``torch.load`` calls it for headers)."""
    return RestrictedUnpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs) -> Any:
    return load(io.BytesIO(data), **kwargs)


# ``torch.load(pickle_module=...)`` uses ``Unpickler`` and ``load`` of this module
Unpickler = RestrictedUnpickler


def check_container(path: str | os.PathLike, size: int) -> None:
    """Refuse what ``torch.load`` would unpack to memory or disk beyond the file's size:
    zip records declaring more than twice the file (an inflate bomb), methods PyTorch never
    writes, and the legacy tar format, which it extracts into a temporary folder."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            try:
                records = zipfile.ZipFile(f).infolist()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise PackNetError(f"{shown(path)} is a broken zip file ({str(exc)[:120]})") from None
            declared = 0
            for record in records:
                if record.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise PackNetError(f"{shown(path)}: record {record.filename[:80]!r} uses a compression PyTorch "
                                       "cannot read")
                if record.header_offset + record.compress_size > size:
                    raise PackNetError(f"{shown(path)}: record {record.filename[:80]!r} lies beyond the end of the "
                                       "file")
                declared += record.file_size
            if declared > 2 * size + STORAGE_SLACK:
                raise PackNetError(f"{shown(path)}: its zip records unpack to {declared:,} bytes from a {size:,}-byte "
                                   "file (PyTorch writes them uncompressed): refusing an inflate bomb")
            return
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r:"):
                pass
        except (tarfile.TarError, OSError, ValueError, EOFError):
            return
        raise PackNetError(f"{shown(path)} is a tar archive: the format of PyTorch before 0.1.10, which is read by "
                           "extracting it to disk; re-save it with a newer PyTorch")


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` of a legacy or zip file with the restricted unpickler, tensors on the CPU."""
    import sys

    size = os.stat(regular_file(path, "FILE")).st_size  # a FIFO or device would block or never end
    token = _STORAGE_BUDGET.set(2 * size + STORAGE_SLACK)
    try:
        check_container(path, size)
        with warnings.catch_warnings():
            # legacy files carry their classes' source; ours differs (inert stand-ins) on purpose
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", pickle_module=sys.modules[__name__],
                              weights_only=False, encoding="latin1")
    except PackNetError:
        raise
    except FileNotFoundError:
        raise PackNetError(f"{shown(path)} does not exist") from None
    except IsADirectoryError:
        raise PackNetError(f"{shown(path)} is a folder, not a checkpoint file") from None
    except RecursionError:
        raise PackNetError(f"{shown(path)} nests objects too deeply to be a checkpoint") from None
    except MemoryError:
        raise PackNetError(f"{shown(path)} declares more data than this machine can hold; it is not a "
                           "checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError, UnicodeDecodeError, AssertionError, OverflowError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise PackNetError(f"{shown(path)} is not a readable torch.save file ({msg[:200]})") from None
    finally:
        _STORAGE_BUDGET.reset(token)
