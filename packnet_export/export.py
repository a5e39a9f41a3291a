"""Export the tasks of a PackNet model to ONNX: dense, sparse and multi-task graphs.

The torch exporter runs once per call, whatever the number of tasks: it traces a *template*
of the architecture whose parameters become graph inputs named by their state-dict keys.
Every file is then that graph plus one task's tensors, streamed into the file one tensor at
a time. Tasks differ only in their tensors (and their head's class count), so
``--all-tasks`` on a six-task model costs one trace instead of six, and an export never
holds more than the model and one tensor's copy in memory.

Files are written to a temporary name and renamed (a failed export leaves nothing behind).
A graph whose tensors exceed ``EXTERNAL_DATA_BYTES`` keeps them in one sidecar file
``<name>.onnx.data`` next to it, referenced by a relative path (protobuf cannot hold 2 GB).

The template is exported with ``dynamo=False`` and ``training=PRESERVE`` on a module in eval
mode: batch norm stays a separate node (onnxruntime fuses it at load) so that every
initializer keeps its state-dict name; the dynamo exporter either folds batch norm into the
convolutions (renaming the weights) or, unoptimized, leaves a graph that ran 2x slower here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from . import checkpoint, masks, models, sparse
from .checkpoint import PackNet, atomic_path
from .errors import PackNetError
from .streaming import Streamed, as_array, flat_pieces

FORMATS = ("dense", "sparse", "multitask")
DEFAULT_OPSET = 18
MIN_OPSET = 13
"""CumSum (11) and Split with sizes as an input (13) decode the sparse graphs."""
MAX_OPSET = 20
"""The newest opset the torch (TorchScript) exporter writes."""
EXTERNAL_DATA_BYTES = 1_800_000_000
"""Tensors above this total go to a sidecar file: protobuf cannot serialize 2 GB."""
REPO = Path(__file__).resolve().parents[1]
SAMPLE_CHECKPOINT = REPO / "samples" / "packnet-6task.safetensors"
DEFAULT_OUTPUT = Path("exports")


@dataclass
class ExportedFile:
    path: Path
    format: str
    task: str | None
    """The task of a dense or sparse file; None for the multi-task graph."""
    bytes: int
    external_data: Path | None = None
    size_bound: float | None = None
    """The sparse size target (bytes), for sparse files."""
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"path": str(self.path), "format": self.format, "task": self.task, "bytes": self.bytes,
                "external_data": str(self.external_data) if self.external_data else None,
                "size_bound": self.size_bound, **self.extra}


# ----------------------------------------------------------------- checks
def sample_checkpoint() -> Path:
    """The six-task sample bundled with the repository, used when no --checkpoint is given."""
    if not SAMPLE_CHECKPOINT.is_file():
        raise PackNetError(f"no --checkpoint given and the bundled sample {SAMPLE_CHECKPOINT} is missing; "
                           "pass --checkpoint CKPT")
    return SAMPLE_CHECKPOINT


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise PackNetError(f"opset {opset} is too old for these graphs: they need opset {MIN_OPSET} or newer "
                           f"(CumSum, Split with sizes as an input); the default is {DEFAULT_OPSET}")
    if opset > MAX_OPSET:
        raise PackNetError(f"opset {opset} is newer than the torch exporter writes (at most {MAX_OPSET})")


def check_finite(model: PackNet) -> None:
    """A weight that is NaN or Inf would export silently and compute garbage: refuse it."""
    tensors = [(k, t) for k, t in model.shared.items()]
    tensors += [(f"task {t.name}: {k}", v) for t, ts in zip(model.tasks, model.task_tensors) for k, v in ts.items()]
    for key, t in tensors:  # piece by piece: a whole boolean copy of vgg16's fc6 would be 103 MB
        if t.is_floating_point() and not all(bool(torch.isfinite(p).all()) for (p,) in flat_pieces(t)):
            raise PackNetError(f"weight {key} holds NaN or Inf values; nothing was exported")


@functools.cache
def runtime_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads (onnx may write a newer one)."""
    import onnxruntime as ort

    node = helper.make_node("Identity", ["x"], ["y"])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "probe", [value("x", TensorProto.FLOAT, [1])],
                              [value("y", TensorProto.FLOAT, [1])])
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # onnxruntime raises its own exception types for an unsupported IR
            continue
    return 7


def set_ir_version(model: onnx.ModelProto) -> None:
    needed = helper.find_min_ir_version_for(list(model.opset_import))
    target = min(onnx.IR_VERSION, runtime_ir_version())
    if needed > target:
        raise PackNetError(f"opset {model.opset_import[0].version} needs ONNX IR version {needed}, newer than "
                           f"the installed onnxruntime loads ({target}); choose an older --opset")
    model.ir_version = target


# ----------------------------------------------------------------- the graph
@dataclass
class Template:
    """The architecture's graph without tensors, and the state-dict keys it reads, in graph order."""

    model: onnx.ModelProto
    keys: list[str]


def graph_template(model: PackNet, opset: int = DEFAULT_OPSET) -> Template:
    """The architecture's graph with no initializers: every tensor is named by its state-dict key.

    Input ``input`` float32 [N, 3, H, W] (N dynamic), output ``logits`` float32 [N, classes].
    """
    check_opset(opset)
    module = template_module(model)
    state = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in module.state_dict().items()}
    size = model.image_size
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _StateAsInputs(module, list(state)), (torch.zeros(1, 3, size, size), *state.values()), f,
            dynamo=False, export_params=False, input_names=["input", *state], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    del module
    template = onnx.load_from_string(f.getvalue())
    del f
    graph = template.graph
    used = {x for node in graph.node for x in node.input}
    params = [i for i in graph.input if i.name in state and i.name in used]
    names = {p.name for p in params}
    lost = [k for k, t in state.items() if t.is_floating_point() and k not in names
            and not k.endswith("num_batches_tracked")]
    if not params or "input" not in used:
        raise RuntimeError(f"the torch exporter renamed parameters ({(lost or sorted(names))[:3]}); "
                           "cannot map task tensors onto its graph")
    keep = [i for i in graph.input if i.name == "input"]
    del graph.input[:]
    graph.input.extend(keep)
    del graph.value_info[:]
    _compact(graph, keep={"input", "logits", *names})
    template.producer_name = "packnet-export"
    template.metadata_props.clear()
    return Template(template, [p.name for p in params])


def template_module(model: PackNet) -> torch.nn.Module:
    """The architecture as an eval module on the meta device: it holds no memory at all."""
    classes = model.tasks[0].num_classes if model.tasks else 2
    with torch.device("meta"):
        return models.build(model.arch, classes, model.arch_kwargs).eval()


class _StateAsInputs(torch.nn.Module):
    """Runs ``module`` with its state dict given as forward arguments.

    The torch exporter then sees the tensors as graph inputs named by their keys, never as
    parameters: its ONNX shape-inference pass copies every parameter (a transient 411 MB
    for vgg16's fc6 weight), and it merges parameters of equal values into one. The
    arguments are uninitialized tensors: pages never written are never resident, so the
    trace holds no second copy of the model. ``module`` lives on the meta device and is not
    registered as a submodule, so the exporter finds no parameter at all.
    """

    def __init__(self, module: torch.nn.Module, keys: list[str]) -> None:
        super().__init__()
        self._inner = [module]
        self.keys = keys

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        # torch.func.functional_call refuses to run under the tracer: swap the tensors in by hand
        module = self._inner[0]
        for key, tensor in zip(self.keys, tensors):
            owner, _, name = key.rpartition(".")
            sub = module.get_submodule(owner)
            sub._parameters.pop(name, None)
            sub._buffers[name] = tensor
        return module(x)


def _compact(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Drop node names and doc strings, shorten intermediate value names: on a small model
    they would otherwise weigh more than the sparse format's 5% allowance."""
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return short.setdefault(name, f"v{len(short)}")

    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        defaults = [a for a in node.attribute if _is_default(node.op_type, a)]
        for a in defaults:
            node.attribute.remove(a)
    graph.doc_string = ""


def _is_default(op: str, attr: onnx.AttributeProto) -> bool:
    """Attributes equal to their default (or, like batch norm's momentum, unused at inference)."""
    if op == "BatchNormalization":
        return attr.name == "momentum" or (attr.name == "training_mode" and attr.i == 0)
    if op in ("Conv", "MaxPool", "AveragePool"):
        if attr.name in ("dilations", "strides"):
            return all(v == 1 for v in attr.ints)
        if attr.name == "pads":
            return all(v == 0 for v in attr.ints)
        return attr.name == "group" and attr.i == 1
    return False


def rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def masked_weight(weight: torch.Tensor, owner: torch.Tensor, task: int) -> Streamed:
    """``weight`` as task ``task`` computes with it (zero where the owner is 0 or a later
    task), produced piece by piece."""

    def pieces():
        for w, o in flat_pieces(weight, owner):
            yield torch.where(masks.uses(o, task), w, torch.zeros((), dtype=w.dtype)).numpy()

    return Streamed(tuple(weight.shape), np.dtype(np.float32), pieces)


def task_tensor(model: PackNet, task: int) -> Callable[[str], torch.Tensor | Streamed]:
    """``key -> tensor`` as task ``task`` (1-based) computes with it; prunable weights are
    :class:`Streamed`, masked a piece at a time when they are written."""
    own = model.task_tensors[task - 1]

    def get(key: str) -> torch.Tensor | Streamed:
        if key in own:
            return own[key]
        if key in model.owners:
            return masked_weight(model.shared[key], model.owners[key], task)
        return model.shared[key]

    return get


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
        "packnet.input_size": json.dumps([3, model.image_size, model.image_size]),
        "packnet.mean": json.dumps(list(model.mean)),
        "packnet.std": json.dumps(list(model.std)),
        "packnet.source_sha256": source_sha256 or "",
    }


def task_skeleton(template: Template, model: PackNet, task: int, fmt: str,
                  source_sha256: str | None) -> onnx.ModelProto:
    """A copy of the template for one task: its class count on the output, its metadata."""
    out = onnx.ModelProto()
    out.CopyFrom(template.model)
    dims = out.graph.output[0].type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = model.tasks[task - 1].num_classes
    out.doc_string = f"PackNet task {model.tasks[task - 1].name!r} ({fmt})"
    for key, value in metadata(model, fmt, source_sha256, task).items():
        out.metadata_props.add(key=key, value=value)
    set_ir_version(out)
    return out


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


# ----------------------------------------------------------------- exporting
def _tensor_bytes(model: PackNet, keys: Iterable[str], task: int) -> int:
    own = model.task_tensors[task - 1]
    return sum((own[k] if k in own else model.shared[k]).numel() * 4 for k in keys)


def output_paths(out_dir: Path, model: PackNet, tasks: list[int], formats: list[str]) -> list[tuple[str, int | None,
                                                                                                    Path]]:
    """``(format, task, path)`` of every file an export writes: ``<task>.<format>.onnx``, ``multitask.onnx``."""
    plan: list[tuple[str, int | None, Path]] = []
    for k in tasks:
        for fmt in formats:
            if fmt != "multitask":
                plan.append((fmt, k, out_dir / f"{model.tasks[k - 1].name}.{fmt}.onnx"))
    if "multitask" in formats:
        plan.append(("multitask", None, out_dir / "multitask.onnx"))
    return plan


def prepare_output(out_dir: Path, paths: list[Path], force: bool) -> None:
    """Fail before any work when a file exists (without force) or the folder is not writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PackNetError(f"output folder {out_dir} is a file")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise PackNetError(f"{existing[0]} exists{more}; pass --force to overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackNetError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PackNetError(f"output folder {out_dir} is not writable")


def export_dense(template: Template, model: PackNet, task: int, path: Path,
                 source_sha256: str | None = None) -> ExportedFile:
    skeleton = task_skeleton(template, model, task, "dense", source_sha256)
    keys = template.keys
    get = task_tensor(model, task)
    external = write_onnx(path, skeleton, ((k, get(k)) for k in keys), _tensor_bytes(model, keys, task))
    return ExportedFile(path, "dense", model.tasks[task - 1].name, _file_bytes(path, external), external)


def export_sparse(template: Template, model: PackNet, task: int, path: Path,
                  source_sha256: str | None = None) -> ExportedFile:
    keys = template.keys
    prunable = [k for k in keys if k in model.owners]
    others = [k for k in keys if k not in model.owners]
    # short tensor names: on a small model the state-dict names would cost more than the 5% allowance
    short = {k: f"p{i}" for i, k in enumerate(keys)}
    skeleton = task_skeleton(template, model, task, "sparse", source_sha256)
    rename_values(skeleton.graph, short)
    chunks = sparse.plan_chunks({short[k]: tuple(model.shared[k].shape) for k in prunable})
    skeleton = sparse.sparse_graph(skeleton, chunks)
    task_get = task_tensor(model, task)
    encoded = sparse.encode_chunks(chunks, {short[k]: (model.shared[k], model.owners[k]) for k in prunable}, task)
    nonzero = sum(c.nonzero for c in encoded)
    weights = sum(model.shared[k].numel() for k in prunable)
    head_bytes = _tensor_bytes(model, others, task)
    total = nonzero * 4 + weights // 8 + head_bytes

    def tensors():
        for i, c in enumerate(encoded):
            yield f"c{i}.bits", c.bits
            yield f"c{i}.vals", c.values
        for k in others:
            yield short[k], task_get(k)

    external = write_onnx(path, skeleton, tensors(), total)
    return ExportedFile(path, "sparse", model.tasks[task - 1].name, _file_bytes(path, external), external,
                        sparse.size_bound(nonzero, weights, head_bytes),
                        {"nonzero_weights": nonzero, "prunable_weights": weights})


def export_multitask(model: PackNet, path: Path, opset: int, source_sha256: str | None = None,
                     template: Template | None = None, layout: str = "branches") -> ExportedFile:
    """The multi-task graph, written tensor by tensor (``template``: a trace to reuse).

    ``layout``: ``branches`` (dense speed, one weight set per task in memory once loaded) or
    ``runtime-mask`` (one weight set, masked on every call: lean memory, slower).
    """
    from .multitask import multitask_parts

    skeleton, tensors = multitask_parts(model, opset, layout, template=template)
    skeleton.metadata_props.add(key="packnet.source_sha256", value=source_sha256 or "")
    set_ir_version(skeleton)
    total = sum(t.nbytes if isinstance(t, Streamed) else as_array(t).nbytes for _, t in tensors)
    external = write_onnx(path, skeleton, tensors, total)
    return ExportedFile(path, "multitask", None, _file_bytes(path, external), external)


def _file_bytes(path: Path, external: Path | None) -> int:
    return path.stat().st_size + (external.stat().st_size if external else 0)


def export(model: PackNet, out_dir: Path, tasks: list[int], formats: list[str], opset: int = DEFAULT_OPSET,
           force: bool = False, source_sha256: str | None = None,
           progress: Callable[[str], None] | None = None, layout: str = "branches") -> list[ExportedFile]:
    """Export ``tasks`` (1-based) of ``model`` in ``formats`` to ``out_dir``; one torch trace in all.

    Every check that can fail (opset, finite weights, existing files, the folder) runs
    before the first file is written.
    """
    check_opset(opset)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PackNetError(f"unknown format {unknown[0]!r}; choose dense, sparse, multitask or all")
    if "multitask" in formats:
        from .multitask import LAYOUTS

        if layout not in LAYOUTS:
            raise PackNetError(f"unknown --multitask-layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if not model.tasks:
        raise PackNetError("the checkpoint has no tasks yet; add one with `packnet add-task`")
    check_finite(model)
    plan = output_paths(out_dir, model, tasks, formats)
    prepare_output(out_dir, [p for _, _, p in plan], force)
    written: list[ExportedFile] = []
    template = None
    for fmt, task, path in plan:
        if progress:
            progress(f"writing {path}")
        if template is None:  # one trace serves every file, the multi-task graph included
            template = graph_template(model, opset)
        if fmt == "multitask":
            written.append(export_multitask(model, path, opset, source_sha256, template, layout))
            continue
        writer = export_dense if fmt == "dense" else export_sparse
        written.append(writer(template, model, task, path, source_sha256))
    return written


def load_source(ckpt: Path | None) -> tuple[PackNet, Path, str]:
    """The model to export (the bundled sample without ``ckpt``), its path and sha256."""
    path = ckpt if ckpt is not None else sample_checkpoint()
    model = checkpoint.load(path)
    return model, path, checkpoint.file_sha256(path)
