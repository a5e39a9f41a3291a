"""Check an ONNX file someone hands us before onnx or onnxruntime opens anything it names.

``packnet validate`` and ``packnet report --exports`` read files that may come from anyone.
An ONNX file can point its tensors at other files (``external_data``: a location, an offset,
a length), and onnx and onnxruntime follow those pointers; its ``packnet.*`` metadata is
free text that the commands then parse. ``check_file`` is the one gate both commands use:

* the file itself: a regular file (not a folder, FIFO or device), parseable, a graph with
  nodes, initializer and node-output names unique (a file concatenated to itself parses as
  one graph with everything twice), raw data of the size its shape and type need;
* every external-data pointer: a relative location inside the model's folder (no ``..``,
  absolute paths, ``~``, backslashes, URLs, NUL bytes, names of more than 255 bytes, the
  folder itself or the model file), resolving (symlinks followed, loops refused) to a
  regular file, with a whole-number offset and length inside that file that match the
  tensor's size;
* the metadata, against the graph: ``packnet.format`` one of the export formats and agreeing
  with the graph's inputs (``task_index`` only for multitask); ``packnet.input_size`` a list
  ``[3, H, W]`` of whole numbers agreeing with the ``input`` tensor's static shape;
  ``packnet.tasks``/``packnet.task`` and ``packnet.num_classes`` well-formed and in range;
  ``packnet.source_sha256`` empty or 64 hex digits.

Any defect is one ``PackNetError`` naming the file and the defect.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PackNetError
from .exporter.formats import FORMATS
from .files import regular_file, shown

MAX_LOCATION_BYTES = 255
"""Longest external-data location accepted (a file name on common file systems)."""
MAX_INPUT_SIDE = 4096
MAX_CLASSES = 100_000
MAX_TASKS = 255
MAX_METADATA_VALUE = 1 << 20
"""Longest metadata value parsed as JSON (class lists of 100,000 names fit)."""


@dataclass
class OnnxFile:
    """What ``check_file`` established about a file."""

    path: Path
    metadata: dict[str, str]
    format: str | None
    """``packnet.format``, or None for a graph without packnet metadata (not written by us)."""
    tasks: list[str] = field(default_factory=list)
    num_classes: list[int] = field(default_factory=list)
    input_size: list[int] | None = None
    source_sha256: str = ""
    sidecars: list[Path] = field(default_factory=list)
    """The external-data files the graph reads, resolved, each once."""


def _fail(path, what: str) -> PackNetError:
    return PackNetError(f"{shown(path)}: {what}")


def check_file(path: str | os.PathLike) -> OnnxFile:
    """Parse ``path`` without following its external data, then check everything above."""
    import onnx

    path = regular_file(path, "ONNX file")  # a folder, FIFO or device is never opened
    if path.stat().st_size == 0:
        raise _fail(path, "is empty, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common base class
        raise _fail(path, f"is not a readable ONNX file ({exc.__class__.__name__})") from None
    _check_graph(path, proto)
    sidecars = _check_external_data(path, proto)
    result = _check_metadata(path, proto)
    result.sidecars = sidecars
    return result


# ----------------------------------------------------------------- the graph
def _fixed_size(data_type: int) -> int | None:
    """Bytes per element of an ONNX tensor type, None when not fixed (strings, sub-byte types)."""
    import numpy as np
    import onnx

    name = onnx.TensorProto.DataType.Name(data_type) if data_type in onnx.TensorProto.DataType.values() else ""
    if name in ("", "UNDEFINED", "STRING", "INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1"):
        return None
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _expected_bytes(tensor) -> int | None:
    size = _fixed_size(tensor.data_type)
    if size is None or any(d < 0 for d in tensor.dims):
        return None
    return math.prod(tensor.dims) * size


def _check_graph(path: Path, proto) -> None:
    graph = proto.graph
    if not len(graph.node):
        raise _fail(path, "has no graph nodes: it is not a model (empty or not an ONNX file)")
    names = [t.name for t in graph.initializer]
    if len(set(names)) != len(names):
        raise _fail(path, "names an initializer twice (a file concatenated to itself?)")
    outputs = [o for node in graph.node for o in node.output if o]
    if len(set(outputs)) != len(outputs):
        raise _fail(path, "has two nodes writing the same tensor (a file concatenated to itself?)")
    import onnx

    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            continue
        expected = _expected_bytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise _fail(path, f"initializer {tensor.name[:80]!r} holds {len(tensor.raw_data):,} bytes of data, its "
                              f"shape {list(tensor.dims)} needs {expected:,}")


# ----------------------------------------------------------------- external data
def _all_tensors(proto):
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(proto)
    for sparse in proto.graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices


def _check_location(path: Path, folder: Path, name: str, location: str) -> Path:
    """The resolved file a location names, refused unless it is a plain relative file name
    inside ``folder``."""
    what = f"tensor {name[:80]!r} keeps its data in {location[:80]!r}"
    if not location or location in (".", "./"):
        raise _fail(path, f"{what}: not a file name")
    if "\x00" in location:
        raise _fail(path, f"{what}: the location holds a NUL byte")
    if len(location.encode("utf-8", "surrogateescape")) > MAX_LOCATION_BYTES:
        raise _fail(path, f"tensor {name[:80]!r} keeps its data in a location of {len(location):,} characters; "
                          f"file names have at most {MAX_LOCATION_BYTES}")
    if "\\" in location or "://" in location or ":" in location.split("/")[0]:
        raise _fail(path, f"{what}: a backslash, drive or URL, not a file name beside the model")
    if location.startswith("~"):
        raise _fail(path, f"{what}: a home-folder path, not a file name beside the model")
    if Path(location).is_absolute() or ".." in Path(location).parts:
        raise _fail(path, f"{what}, outside the model's folder; refusing to read it")
    try:
        target = (folder / location).resolve(strict=True)
    except FileNotFoundError:
        raise _fail(path, f"{what}, which does not exist beside it") from None
    except (RuntimeError, OSError) as exc:  # a symlink loop, a name too long for the file system
        reason = "a symlink loop" if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == 40 \
            else (exc.strerror or str(exc))
        raise _fail(path, f"{what}: {reason}") from None
    if not target.is_relative_to(folder):
        raise _fail(path, f"{what}, outside the model's folder; refusing to read it")
    if target == path.resolve():
        raise _fail(path, f"{what}: the model file itself")
    info = target.stat()
    if not stat.S_ISREG(info.st_mode):
        raise _fail(path, f"{what}: not a regular file (a folder, pipe or device)")
    return target


def _whole(value: str | None, key: str, path: Path, name: str) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 20:
        raise _fail(path, f"tensor {name[:80]!r} has external-data {key} {value[:40]!r}, not a whole number of bytes")
    return int(text)


def _check_external_data(path: Path, proto) -> list[Path]:
    import onnx

    folder = path.resolve().parent
    sidecars: list[Path] = []
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {}
        for entry in tensor.external_data:
            if entry.key in entries:
                raise _fail(path, f"tensor {tensor.name[:80]!r} gives its external-data {entry.key!r} twice")
            entries[entry.key] = entry.value
        unknown = sorted(set(entries) - {"location", "offset", "length", "checksum", "basepath"})
        if unknown:
            raise _fail(path, f"tensor {tensor.name[:80]!r} has an unknown external-data key {unknown[0][:40]!r}")
        if "basepath" in entries:
            raise _fail(path, f"tensor {tensor.name[:80]!r} sets an external-data basepath; locations are relative "
                              "to the model's folder")
        target = _check_location(path, folder, tensor.name, entries.get("location", ""))
        offset = _whole(entries.get("offset"), "offset", path, tensor.name) or 0
        length = _whole(entries.get("length"), "length", path, tensor.name)
        size = target.stat().st_size
        expected = _expected_bytes(tensor)
        if length is None:
            length = expected if expected is not None else size - offset
        if offset + length > size:
            raise _fail(path, f"tensor {tensor.name[:80]!r} reads bytes {offset:,}..{offset + length:,} of "
                              f"{target.name[:80]}, which holds {size:,}")
        if expected is not None and length != expected:
            raise _fail(path, f"tensor {tensor.name[:80]!r} reads {length:,} external bytes, its shape "
                              f"{list(tensor.dims)} needs {expected:,}")
        if target not in sidecars:
            sidecars.append(target)
    return sidecars


# ----------------------------------------------------------------- metadata
def _json(meta: dict[str, str], key: str, path: Path):
    value = meta[key]
    if len(value) > MAX_METADATA_VALUE:
        raise _fail(path, f"metadata {key} is {len(value):,} characters long")
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise _fail(path, f"metadata {key} is not JSON: {value[:60]!r}") from None


def _count(value, what: str, path: Path, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise _fail(path, f"metadata {what} is {str(value)[:40]!r}, not a whole number from 1 to {top:,}")
    return value


def _static_dims(value_info) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_metadata(path: Path, proto) -> OnnxFile:
    meta = {p.key: p.value for p in proto.metadata_props}
    fmt = meta.get("packnet.format")
    result = OnnxFile(path, meta, fmt)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in initializers}
    outputs = {o.name for o in proto.graph.output}
    if fmt is None:
        if any(k in meta for k in ("packnet.input_size", "packnet.tasks", "packnet.num_classes")):
            raise _fail(path, "carries packnet metadata but no packnet.format")
        return result
    if fmt not in FORMATS:
        raise _fail(path, f"metadata packnet.format is {fmt[:40]!r}, not one of {', '.join(FORMATS)}")
    wants = {"input", "task_index"} if fmt == "multitask" else {"input"}
    if set(inputs) != wants or "logits" not in outputs:
        raise _fail(path, f"claims packnet.format={fmt}, but its graph reads {sorted(inputs)} and writes "
                          f"{sorted(outputs)} (a {fmt} export reads {sorted(wants)} and writes logits)")
    if fmt == "multitask":
        tasks = _json(meta, "packnet.tasks", path) if "packnet.tasks" in meta else None
        if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS or not all(
                isinstance(t, str) and t and t.isprintable() for t in tasks) or len(set(tasks)) != len(tasks):
            raise _fail(path, f"metadata packnet.tasks is {meta.get('packnet.tasks', 'missing')[:60]!r}, not a list "
                              f"of 1 to {MAX_TASKS} distinct task names")
        counts = _json(meta, "packnet.num_classes", path) if "packnet.num_classes" in meta else None
        if not isinstance(counts, list) or len(counts) != len(tasks):
            raise _fail(path, f"metadata packnet.num_classes is {meta.get('packnet.num_classes', 'missing')[:60]!r}, "
                              f"not one class count per task ({len(tasks)})")
        result.tasks = tasks
        result.num_classes = [_count(c, "packnet.num_classes", path, MAX_CLASSES) for c in counts]
    else:
        task = meta.get("packnet.task", "")
        if not task or not task.isprintable() or len(task) > 100:
            raise _fail(path, f"metadata packnet.task is {task[:40]!r}, not a task name")
        count = _json(meta, "packnet.num_classes", path) if "packnet.num_classes" in meta else None
        result.tasks = [task]
        result.num_classes = [_count(count, "packnet.num_classes", path, MAX_CLASSES)]
        logits = next(o for o in proto.graph.output if o.name == "logits")
        width = _static_dims(logits)[-1:] or [None]
        if width[0] is not None and width[0] != result.num_classes[0]:
            raise _fail(path, f"metadata says {result.num_classes[0]} classes, its logits have {width[0]}")
    size = _json(meta, "packnet.input_size", path) if "packnet.input_size" in meta else None
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIDE for v in size[1:])):
        raise _fail(path, f"metadata packnet.input_size is {meta.get('packnet.input_size', 'missing')[:60]!r}, not "
                          f"[3, height, width] with sides from 1 to {MAX_INPUT_SIDE}")
    dims = _static_dims(inputs["input"])
    if len(dims) != 4 or any(d is not None and d != v for d, v in zip(dims[1:], size)):
        raise _fail(path, f"metadata packnet.input_size {size} disagrees with the graph's input shape "
                          f"{['N' if d is None else d for d in dims]}")
    result.input_size = size
    sha = meta.get("packnet.source_sha256", "")
    if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise _fail(path, f"metadata packnet.source_sha256 is {sha[:70]!r}, not a sha256 digest")
    result.source_sha256 = sha
    return result
