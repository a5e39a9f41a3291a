"""The streaming ONNX writer, the IR version policy, and the metadata every file carries.

Tensors are written in pieces, so that an export never holds a whole layer's transient
copies: a masked, encoded or packed weight is computed from the model's tensors a few
million elements at a time and written to the file as it is produced. Without this, the
largest layer of vgg16 (fc6, 103 M weights = 411 MB) alone would need several copies of
itself (the masked weight, a boolean mask, the packed bits, the gathered values) at once.

Files are written to a temporary name and renamed (a failed export leaves nothing behind).
A graph whose tensors exceed ``EXTERNAL_DATA_BYTES`` keeps them in one sidecar file
``<name>.onnx.data`` next to it, referenced by a relative path (protobuf cannot hold 2 GB).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..checkpoint import PackNet, atomic_path

if TYPE_CHECKING:
    from ..api import ValidationReport
from ..errors import ParameterError

PIECE = 1 << 22
"""Elements processed at a time (16 MB of float32): bounds the transient memory of an export."""
EXTERNAL_DATA_BYTES = 1_800_000_000
"""Tensors above this total go to a sidecar file: protobuf cannot serialize 2 GB."""


@dataclass
class ExportedFile:
    """A file an export wrote (``packnet_export.export`` returns a list of them)."""

    path: Path
    format: str
    task: str | None
    """The task of a dense or sparse file; None for the multi-task graph."""
    bytes: int
    """Size on disk, sidecar included."""
    external_data: Path | None = None
    """The ``<name>.onnx.data`` sidecar holding the tensors of a graph above 1.8 GB."""
    size_bound: float | None = None
    """The sparse size target (bytes), for sparse files."""
    extra: dict = field(default_factory=dict)
    """Format-specific counts (sparse: nonzero and prunable weights)."""
    validation: ValidationReport | None = None
    """onnxruntime against PyTorch, when the export validated."""

    @property
    def passed(self) -> bool | None:
        """Whether the file matches PyTorch (None: not validated)."""
        return None if self.validation is None else self.validation.passed

    def summary(self) -> dict:
        return {"path": str(self.path), "format": self.format, "task": self.task, "bytes": self.bytes,
                "external_data": str(self.external_data) if self.external_data else None,
                "size_bound": self.size_bound, **self.extra}


def file_bytes(path: Path, external: Path | None) -> int:
    return path.stat().st_size + (external.stat().st_size if external else 0)


# ----------------------------------------------------------------- tensors in pieces
@dataclass
class Streamed:
    """A tensor known by its shape and type, whose flat contents ``pieces()`` yields in order.

    ``pieces`` is a callable so that the tensor can be produced more than once (e.g. to
    materialize it for a test after writing it).
    """

    dims: tuple[int, ...]
    dtype: np.dtype
    pieces: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def materialize(self) -> np.ndarray:
        parts = [np.asarray(p, dtype=self.dtype).reshape(-1) for p in self.pieces()]
        flat = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        return flat.reshape(self.dims)


def flat_pieces(*tensors: torch.Tensor, piece: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned slices of the flattened ``tensors`` (same number of elements), ``piece``
    (default :data:`PIECE`) elements at a time."""
    piece = piece or PIECE
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    for start in range(0, n, piece):
        yield tuple(f[start:start + piece] for f in flats)


def pack_bits_stream(pieces: Iterator[np.ndarray], bitorder: str = "little") -> Iterator[np.ndarray]:
    """``np.packbits`` of the concatenation of boolean ``pieces``, produced piece by piece."""
    carry = np.zeros(0, dtype=bool)
    for occupied in pieces:
        if carry.size:
            occupied = np.concatenate([carry, occupied])
        whole = occupied.size - occupied.size % 8
        if whole:
            yield np.packbits(occupied[:whole], bitorder=bitorder)
        carry = occupied[whole:]
    if carry.size:
        yield np.packbits(carry, bitorder=bitorder)


def as_array(value) -> np.ndarray:
    """A little-endian contiguous numpy view (or copy when needed) of a tensor or array.

    Scalars stay 0-d (``np.ascontiguousarray`` would make them shape [1], which turned the
    multi-task graph's scalar ``task_index`` checks and ``num_classes`` output into [1]).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, order="C")
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


# ----------------------------------------------------------------- IR version and metadata
def ir_version_for(opset: int, ir_version: int | None = None) -> int:
    """The IR version of a file of ``opset``: the lowest that opset needs, or ``ir_version``.

    The lowest, never the newest the local onnx or onnxruntime knows: onnx 1.23 writes IR 14
    by default, which onnxruntime 1.31 refuses, and runtimes on devices are older still; each
    IR version step shuts out every onnxruntime release before it (docs/export.md lists
    them). ``ir_version`` overrides it for a runtime that wants another; it must be one
    that the opset allows and that the installed onnx knows.
    """
    needed = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    if ir_version is None:
        return needed
    if ir_version < needed:
        raise ParameterError("ir_version", f"$ir_version {ir_version} is too old for opset {opset}: it needs IR "
                             f"version {needed} or newer (the default)")
    if ir_version > onnx.IR_VERSION:
        raise ParameterError("ir_version", f"$ir_version {ir_version} is newer than the installed onnx "
                             f"{onnx.__version__} knows (at most {onnx.IR_VERSION})")
    return ir_version


def set_ir_version(model: onnx.ModelProto, ir_version: int | None = None) -> None:
    """Stamp ``model`` with the IR version of :func:`ir_version_for` (every format comes here)."""
    (opset,) = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model.ir_version = ir_version_for(opset, ir_version)


def metadata(model: PackNet, fmt: str, source_sha256: str | None, task: int) -> dict[str, str]:
    """Everything a deployment needs besides the graph, as ONNX ``metadata_props`` (lists are JSON).

    The keys match the multi-task graph's (``packnet.*``), so one reader handles every file.
    """
    info = model.tasks[task - 1]
    return {
        "packnet.format": fmt,
        "packnet.arch": model.arch,
        "packnet.task": info.name,
        "packnet.task_number": str(task),
        "packnet.classes": json.dumps(info.classes),
        "packnet.num_classes": str(info.num_classes),
        **input_metadata(model),
        # crop or squash; absent for a task stored before the mode existed (crop), whose files stay as they were
        **({"packnet.resize": info.resize} if info.resize else {}),
        "packnet.source_sha256": source_sha256 or "",
    }


def input_metadata(model: PackNet) -> dict[str, str]:
    """What every file says about its input: shape and the normalization to apply first."""
    return {
        "packnet.input_size": json.dumps([3, model.image_size, model.image_size]),
        "packnet.mean": json.dumps(list(model.mean)),
        "packnet.std": json.dumps(list(model.std)),
    }


# ----------------------------------------------------------------- writing
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def write_onnx(path: Path, skeleton: onnx.ModelProto, tensors: Iterable[tuple[str, object]],
               total_bytes: int | None = None) -> Path | None:
    """Write ``skeleton`` plus ``tensors`` (``(name, array | tensor | Streamed)``, consumed
    lazily) to ``path`` atomically.

    Each tensor is appended as a separate ``graph { initializer {...} }`` record: protobuf
    merges repeated occurrences of a message field, so the file parses as one graph while
    no complete serialized model ever exists in memory; a :class:`Streamed` tensor is
    written piece by piece. Returns the sidecar's path when the tensors (``total_bytes``)
    are too large for one protobuf file, else None.
    """
    external = total_bytes is not None and total_bytes > EXTERNAL_DATA_BYTES
    sidecar = path.with_name(path.name + ".data")
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(atomic_path(path))
        side = stack.enter_context(atomic_path(sidecar)) if external else None
        handle.write(skeleton.SerializeToString())
        offset = 0
        for name, tensor in tensors:
            if isinstance(tensor, Streamed):
                dims, dtype, length = tensor.dims, np.dtype(tensor.dtype), tensor.nbytes
                pieces = (_as_array(p) for p in tensor.pieces())
            else:
                array = _as_array(tensor)
                dims, dtype, length, pieces = array.shape, array.dtype, array.nbytes, iter([array])
            proto = TensorProto(name=name, dims=dims, data_type=helper.np_dtype_to_tensor_dtype(dtype))
            if side is not None:
                pad = -offset % 64
                side.write(b"\0" * pad)
                offset += pad
                proto.data_location = TensorProto.EXTERNAL
                for k, v in (("location", sidecar.name), ("offset", str(offset)), ("length", str(length))):
                    proto.external_data.add(key=k, value=v)
                _write_pieces(side, pieces, length, name)
                offset += length
                body = proto.SerializeToString()
                record = _field(5, len(body)) + body
                handle.write(_field(7, len(record)) + record)
            else:
                head = proto.SerializeToString()
                raw = _field(9, length)
                inner = len(head) + len(raw) + length
                outer = _field(5, inner)
                handle.write(_field(7, len(outer) + inner) + outer + head + raw)
                _write_pieces(handle, pieces, length, name)
    if not external and sidecar.exists():
        sidecar.unlink()  # a stale sidecar of an earlier, larger export under the same name
    return sidecar if external else None


_as_array = as_array
"""Every tensor and piece goes through this name on its way to the file (a fault test hooks it)."""


def _write_pieces(handle, pieces: Iterable[np.ndarray], length: int, name: str) -> None:
    written = 0
    for piece in pieces:
        if piece.size:
            handle.write(memoryview(piece.reshape(-1)).cast("B"))
            written += piece.nbytes
    if written != length:  # the record's length prefix is already written: a mismatch would corrupt the file
        raise RuntimeError(f"tensor {name}: wrote {written} bytes, declared {length}")


def graph_links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, int], set[str]]:
    """Who produces each value, how many nodes read it, and the graph's outputs: what a pass
    folding one node into another (batch norm into a convolution) checks first."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    return producers, consumers, {o.name for o in graph.output}
