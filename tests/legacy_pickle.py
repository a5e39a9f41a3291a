"""Write ``torch.save`` files byte for byte as PyTorch 0.2 on Python 2.7 did, without either.

The official PackNet checkpoints were written by ``torch.save`` of PyTorch 0.2 under
Python 2.7, on GPUs. Today's ``torch.save`` cannot produce that stream (its tensors pickle
through ``_rebuild_tensor_v2``, its modules carry attributes 0.2 never had, and Python 3
spells strings differently), so these fixtures emit the pickle opcodes themselves,
following Python 2.7's ``pickle.Pickler`` (protocol 2) and PyTorch 0.2's
``torch/serialization.py``:

* the file is five pickles and raw data: the magic number (a Python 2 ``long``: LONG1),
  the protocol version 1001, the sys info dict, the object, the sorted storage keys; then
  each storage as an int64 element count and its little-endian bytes;
* Python 2 ``str`` (attribute names, dict keys, dataset names) are SHORT_BINSTRING /
  BINSTRING, memoized by value as interned strings are; every container, global and
  object is memoized with BINPUT / LONG_BINPUT as it is built, and met again with BINGET;
* a module instance is ``NEWOBJ`` of its class, then ``BUILD`` with its ``__dict__``; the
  first time a module class is met it is a persistent id ``('module', cls, source_file,
  source)`` (0.2 saved the class source to warn about changes);
* ``OrderedDict`` is Python 2.7's ``__reduce__``: ``OrderedDict([[key, value], ...])``;
* a tensor is ``torch._utils._rebuild_tensor(storage, offset, size, stride)``, its storage
  the persistent id ``('storage', torch.cuda.FloatStorage, key, 'cuda:0', numel, None)``;
* a parameter is ``Parameter(data)`` (REDUCE) then ``BUILD`` with ``(requires_grad,
  volatile, backward_hooks)``, the way 0.2's ``Variable.__reduce_ex__`` wrote it;
* every module carries ``_backend``, a ``THNNFunctionBackend`` whose ``__reduce__`` is a call
  to ``torch.nn.backends.thnn._get_thnn_function_backend()``; modules have
  ``_backward_hooks`` and ``_forward_hooks`` but no ``_forward_pre_hooks``,
  ``_state_dict_hooks`` or ``padding_mode``; batch norm has no ``num_batches_tracked`` and
  no ``track_running_stats``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


# ------------------------------------------------------------------ values the emitter knows
@dataclass(eq=False)
class Global:
    module: str
    name: str


@dataclass(eq=False)
class Reduce:
    """``func(*args)``, then ``BUILD state`` when a state is given."""

    func: Global
    args: tuple
    state: Any = None
    has_state: bool = False


@dataclass(eq=False)
class Instance:
    """A plain new-style object (``argparse.Namespace``): NEWOBJ, then BUILD with its ``__dict__``."""

    cls: Global
    state: dict


@dataclass(eq=False)
class PersistentId:
    pid: tuple


@dataclass(eq=False)
class Unicode:
    text: str


@dataclass(eq=False)
class Long:
    """A Python 2 ``long`` (pickled with LONG1)."""

    value: int


@dataclass(eq=False)
class OrderedDict2:
    """A Python 2.7 ``collections.OrderedDict``."""

    items: list[tuple[str, Any]]


@dataclass(eq=False)
class Storage:
    kind: str  # "FloatStorage", "ByteStorage"
    data: bytes
    element_size: int
    key: str = ""
    location: str = "cuda:0"
    declared: int | None = None
    """The element count the persistent id declares, when a test forges one."""

    @property
    def numel(self) -> int:
        return self.declared if self.declared is not None else len(self.data) // self.element_size


@dataclass(eq=False)
class Tensor:
    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False)
class Module:
    """An ``nn.Module`` of PyTorch 0.2: ``cls`` is ``module.Class``."""

    cls: str
    attributes: dict[str, Any] = field(default_factory=dict)
    parameters: list[tuple[str, Any]] = field(default_factory=list)
    buffers: list[tuple[str, Any]] = field(default_factory=list)
    modules: list[tuple[str, Any]] = field(default_factory=list)
    training: bool = True
    origin: str = ""
    """Not pickled: the torchvision key prefix of the module's tensors, for the tests' bookkeeping."""

    def walk(self) -> Iterable[Module]:
        """``nn.Module.modules()``: pre-order, each module once."""
        seen: set[int] = set()

        def visit(m: Module):
            if id(m) in seen:
                return
            seen.add(id(m))
            yield m
            for _, child in m.modules:
                if child is not None:
                    yield from visit(child)

        yield from visit(self)


FLOAT64 = Reduce(Global("numpy", "dtype"), ("f8", 0, 1), (3, "<", None, None, None, -1, -1, 0), True)
BACKEND = Reduce(Global("torch.nn.backends.thnn", "_get_thnn_function_backend"), ())


def parameter(t: Tensor, hooks: Any = None) -> Reduce:
    return Reduce(Global("torch.nn.parameter", "Parameter"), (t,), (True, False, hooks), True)


def numpy_float64(value: float) -> Reduce:
    """A ``numpy.float64`` as Python 2 pickled it: ``scalar(dtype('f8'), <8-byte str>)``."""
    return Reduce(Global("numpy.core.multiarray", "scalar"), (FLOAT64, struct.pack("<d", value).decode("latin-1")))


def tensor_of(t: torch.Tensor, storage_kind: str | None = None) -> Tensor:
    """A contiguous 0.2 tensor holding ``t``'s values (float32 -> FloatStorage, uint8 -> ByteStorage)."""
    t = t.detach().contiguous()
    kind = storage_kind or {torch.float32: "FloatStorage", torch.uint8: "ByteStorage",
                            torch.int64: "LongStorage"}[t.dtype]
    storage = Storage(kind, t.numpy().tobytes(), t.element_size())
    stride = tuple(t.stride()) if t.dim() else ()
    return Tensor(storage, 0, tuple(t.shape), stride)


# ------------------------------------------------------------------ the emitter
class Py2Pickler:
    """Protocol-2 opcodes as Python 2.7's ``pickle.Pickler`` wrote them, with 0.2's persistent ids."""

    def __init__(self, storages: dict[str, Storage], classes_seen: set[str]) -> None:
        self.out = bytearray()
        self.memo: dict[Any, int] = {}
        self.keep: list[Any] = []
        self.storages = storages
        self.classes_seen = classes_seen

    # memo
    def _put(self, key: Any, obj: Any) -> None:
        index = len(self.memo)
        self.memo[key] = index
        self.keep.append(obj)
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, key: Any) -> bool:
        if key not in self.memo:
            return False
        index = self.memo[key]
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    def dump(self, obj: Any) -> bytes:
        self.out += b"\x80\x02"
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def save(self, obj: Any) -> None:  # noqa: C901 - one branch per pickled kind, as in pickle.py
        if obj is None:
            self.out += b"N"
        elif obj is True:
            self.out += b"\x88"
        elif obj is False:
            self.out += b"\x89"
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, Long):
            raw = obj.value.to_bytes((obj.value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(obj, float):
            self.out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):  # a Python 2 byte string, interned
            if self._get(("str", obj)):
                return
            raw = obj.encode("latin-1")
            self.out += (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw
            self._put(("str", obj), obj)
        elif isinstance(obj, Unicode):
            raw = obj.text.encode("utf-8")
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
            self._put(id(obj), obj)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            self._list(obj)
        elif isinstance(obj, dict):
            self._dict(obj)
        elif isinstance(obj, Global):
            self._global(obj)
        elif isinstance(obj, Reduce):
            if self._get(id(obj)):
                return
            self.save(obj.func)
            self.save(obj.args)
            self.out += b"R"
            self._put(id(obj), obj)
            if obj.has_state:
                self.save(obj.state)
                self.out += b"b"
        elif isinstance(obj, PersistentId):
            self.save(obj.pid)
            self.out += b"Q"
        elif isinstance(obj, OrderedDict2):
            self.save(Reduce(Global("collections", "OrderedDict"), ([[k, v] for k, v in obj.items],)))
        elif isinstance(obj, Tensor):
            self._tensor(obj)
        elif isinstance(obj, Module):
            self._module(obj)
        elif isinstance(obj, Instance):
            if self._get(id(obj)):
                return
            self.save(obj.cls)
            self.out += b")\x81"
            self._put(id(obj), obj)
            self.save(obj.state)
            self.out += b"b"
        else:
            raise TypeError(f"cannot emit {type(obj).__name__}")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:  # Python 2 ints beyond 32 bits were written as text
            self.out += b"I" + str(value).encode() + b"\n"

    def _tuple(self, obj: tuple) -> None:
        if not obj:
            self.out += b")"
            return
        if self._get(id(obj)):
            return
        if len(obj) <= 3:
            for item in obj:
                self.save(item)
            self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(obj)]
        else:
            self.out += b"("
            for item in obj:
                self.save(item)
            self.out += b"t"
        self._put(id(obj), obj)

    def _list(self, obj: list) -> None:
        if self._get(id(obj)):
            return
        self.out += b"]"
        self._put(id(obj), obj)
        for start in range(0, len(obj), 1000):  # Python 2 batched APPENDS by 1000
            batch = obj[start:start + 1000]
            if len(batch) == 1:
                self.save(batch[0])
                self.out += b"a"
            else:
                self.out += b"("
                for item in batch:
                    self.save(item)
                self.out += b"e"

    def _dict(self, obj: dict) -> None:
        if self._get(id(obj)):
            return
        self.out += b"}"
        self._put(id(obj), obj)
        items = list(obj.items())
        for start in range(0, len(items), 1000):
            batch = items[start:start + 1000]
            if len(batch) == 1:
                self.save(batch[0][0])
                self.save(batch[0][1])
                self.out += b"s"
            else:
                self.out += b"("
                for k, v in batch:
                    self.save(k)
                    self.save(v)
                self.out += b"u"

    def _global(self, obj: Global) -> None:
        key = ("global", obj.module, obj.name)
        if self._get(key):
            return
        self.out += b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n"
        self._put(key, obj)

    def _tensor(self, t: Tensor) -> None:
        if self._get(id(t)):
            return
        s = t.storage
        if not s.key:
            s.key = str(140_000_000_000_000 + 4096 * len(self.storages))  # str(root._cdata), a pointer
        self.storages[s.key] = s
        pid = PersistentId(("storage", Global("torch.cuda", s.kind), s.key, s.location, s.numel, None))
        self.save(Global("torch._utils", "_rebuild_tensor"))
        self.save((pid, t.offset, t.size, t.stride))
        self.out += b"R"
        self._put(id(t), t)

    def _module(self, m: Module) -> None:
        if self._get(id(m)):
            return
        module, _, name = m.cls.rpartition(".")
        if m.cls not in self.classes_seen:  # 0.2's persistent_id for a module class met first
            self.classes_seen.add(m.cls)
            source = f"class {name}(Module):\n    pass  # source saved by PyTorch 0.2\n"
            self.save(PersistentId(("module", Global(module, name), f"/usr/lib/python2.7/{module}.py", source)))
        else:
            self.save(Global(module, name))
        self.out += b")\x81"  # EMPTY_TUPLE, NEWOBJ
        self._put(id(m), m)
        state = {"_backend": BACKEND, "_parameters": OrderedDict2(m.parameters),
                 "_buffers": OrderedDict2(m.buffers), "_backward_hooks": OrderedDict2([]),
                 "_forward_hooks": OrderedDict2([]), "_modules": OrderedDict2(m.modules),
                 "training": m.training, **m.attributes}
        self.save(state)
        self.out += b"b"


def legacy_save(obj: Any) -> bytes:
    """The bytes ``torch.save(obj, f)`` wrote under PyTorch 0.2 and Python 2.7."""
    storages: dict[str, Storage] = {}
    classes: set[str] = set()
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 8}}
    out = bytearray()
    for header in (Long(MAGIC_NUMBER), PROTOCOL_VERSION, sys_info):
        out += Py2Pickler({}, set()).dump(header)
    out += Py2Pickler(storages, classes).dump(obj)
    keys = sorted(storages)
    out += Py2Pickler({}, set()).dump(list(keys))
    for key in keys:
        out += struct.pack("<q", len(storages[key].data) // storages[key].element_size) + storages[key].data
    return bytes(out)


# ------------------------------------------------------------------ torch.nn of PyTorch 0.2
NN = "torch.nn.modules"


def conv(weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1, padding: int = 0) -> Module:
    out_c, in_c, kh, kw = weight.shape
    return Module(f"{NN}.conv.Conv2d", {
        "in_channels": in_c, "out_channels": out_c, "kernel_size": (kh, kw), "stride": (stride, stride),
        "padding": (padding, padding), "dilation": (1, 1), "transposed": False, "output_padding": (0, 0),
        "groups": 1}, [("weight", parameter(tensor_of(weight))),
                       ("bias", None if bias is None else parameter(tensor_of(bias)))])


def linear(weight: torch.Tensor, bias: torch.Tensor) -> Module:
    return Module(f"{NN}.linear.Linear", {"in_features": weight.shape[1], "out_features": weight.shape[0]},
                  [("weight", parameter(tensor_of(weight))), ("bias", parameter(tensor_of(bias)))])


def batch_norm(weight, bias, mean, var) -> Module:
    return Module(f"{NN}.batchnorm.BatchNorm2d", {"num_features": weight.shape[0], "affine": True, "eps": 1e-05,
                                                  "momentum": 0.1},
                  [("weight", parameter(tensor_of(weight))), ("bias", parameter(tensor_of(bias)))],
                  [("running_mean", tensor_of(mean)), ("running_var", tensor_of(var))], training=False)


def relu() -> Module:
    return Module(f"{NN}.activation.ReLU", {"threshold": 0, "value": 0, "inplace": True})


def max_pool(kernel: int, stride: int, padding: int = 0) -> Module:
    return Module(f"{NN}.pooling.MaxPool2d", {"kernel_size": kernel, "stride": stride, "padding": padding,
                                              "dilation": 1, "return_indices": False, "ceil_mode": False})


def avg_pool(kernel: int, stride: int) -> Module:
    return Module(f"{NN}.pooling.AvgPool2d", {"kernel_size": kernel, "stride": stride, "padding": 0,
                                              "ceil_mode": False, "count_include_pad": True})


def dropout() -> Module:
    return Module(f"{NN}.dropout.Dropout", {"p": 0.5, "inplace": False})


def sequential(children: list[tuple[str, Module]], cls: str = f"{NN}.container.Sequential") -> Module:
    return Module(cls, modules=children)
