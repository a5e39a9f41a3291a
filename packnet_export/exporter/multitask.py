"""One ONNX graph for every task of a PackNet model.

Inputs ``input`` (float32 [N, 3, H, W], dynamic N) and ``task_index`` (int64 scalar,
0-based: the position of the task in the ``packnet.tasks`` metadata list). Outputs
``logits`` (float32 [N, max_classes]; task k's logits fill the first C_k columns, the other
columns are ``-inf`` so that softmax and argmax need no slicing) and ``num_classes`` (int64
scalar C_k). A ``task_index`` outside 0..T-1 (negative ones included) makes
``session.run`` raise an error that names the valid range, never a silent wrong answer.

What the file stores (see ``docs/multitask.md``):

* every prunable weight whose owner is not 0, once, as float32 (``packed/<key>/values``);
* its owner mask as ceil(log2(T + 1)) bit planes packed 8 weights per byte
  (``packed/<key>/owner``);
* the norm/bias tensors once (shared-norm models) or once per task (per-task norm), and
  every task's head.

The graph decodes the owner mask and the dense weights with Cast/Div/Mod/CumSum/Gather on
initializers only, which onnxruntime constant-folds when the session is created, so the
decode costs load time, never inference time. Two layouts pick the task:

``branches`` (default, fast): nested ``If`` nodes with one branch per task; in each branch
the weights are ``Where(owner <= k, dense, 0)`` on folded initializers, so onnxruntime
folds them too, then fuses batch norm into the convolutions and pre-packs the weights, as
for a dense graph. Price: one materialized weight set per task in memory and longer loads.

``runtime-mask`` (lean memory): one network whose weights are masked with ``task_index`` on
every call, and whose per-task heads and norms are picked with ``Gather``. Memory holds the
dense weights and the int32 owner mask once, but every call pays for the masking and loses
batch-norm fusion and weight pre-packing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .. import models
from ..checkpoint import PackNet
from ..errors import PackNetError
from . import multitask_portable
from .formats import DEFAULT_LAYOUT, DEFAULT_OPSET, check_has_tasks, check_layout, check_layout_opset, check_opset
from .template import ExportContext, Template, graph_template
from .writer import (
    ExportedFile,
    Streamed,
    as_array,
    file_bytes,
    flat_pieces,
    input_metadata,
    pack_bits_stream,
    set_ir_version,
    write_onnx,
)

PADDING = "-inf"
TASK_INDEX_BASE = 0


# ----------------------------------------------------------------------- public
def owner_bits(num_tasks: int) -> int:
    """Bits per weight of a packed owner mask: ceil(log2(number of owner values 0..T))."""
    return max(1, math.ceil(math.log2(num_tasks + 1)))


def pack_owner(owner: torch.Tensor, num_tasks: int) -> np.ndarray:
    """The owner mask as ``bits`` bit planes, each packed 8 weights per byte (MSB first)."""
    return packed_owner(owner, num_tasks).materialize()


def packed_owner(owner: torch.Tensor, num_tasks: int) -> Streamed:
    """:func:`pack_owner` (uint8 ``[bits, ceil(n / 8)]``), produced plane by plane, piece by piece."""
    bits = owner_bits(num_tasks)
    n = owner.numel()

    def pieces():
        for plane in range(bits):
            yield from pack_bits_stream((((o.numpy() >> plane) & 1).astype(bool) for (o,) in flat_pieces(owner)),
                                        bitorder="big")

    return Streamed((bits, (n + 7) // 8), np.dtype(np.uint8), pieces)


def used_values(weight: torch.Tensor, owner: torch.Tensor) -> Streamed:
    """float32 values of the weights whose owner is not 0, in order, produced piece by piece."""
    count = sum(int(torch.count_nonzero(o)) for (o,) in flat_pieces(owner))

    def pieces():
        for w, o in flat_pieces(weight, owner):
            yield w[o != 0].float().numpy()

    return Streamed((count,), np.dtype(np.float32), pieces)


def size_budget(model: PackNet) -> dict:
    """The byte counts of the file-size target: nonzero weights x 4 + packed mask + heads.

    "heads" counts everything stored per task or once besides the prunable weights: the
    heads and the norm/bias tensors the graph uses (once, or once per task).
    """
    nonzero = sum(int((o != 0).sum()) for o in model.owners.values())
    bits = owner_bits(len(model.tasks))
    mask = sum(math.ceil(bits * o.numel() / 8) for o in model.owners.values())
    norm_bias = _norm_bias_sources(model)
    heads = sum(t.numel() * t.element_size() for ts in model.task_tensors for t in ts.values())
    if not model.per_task_norm:
        heads += sum(model.shared[k].numel() * model.shared[k].element_size() for k in norm_bias)
    total = 4 * nonzero + mask + heads
    return {"nonzero_weights": nonzero, "weight_bytes": 4 * nonzero, "mask_bytes": mask,
            "owner_bits": bits, "head_bytes": heads, "total_bytes": total}


def multitask_metadata(model: PackNet, layout: str = DEFAULT_LAYOUT, source_sha256: str | None = None,
                       ) -> dict[str, str]:
    """Everything a deployment needs to use the graph, as ``metadata_props`` strings.

    Lists are JSON; ``packnet.tasks[i]`` is the task that ``task_index = i`` runs.
    """
    return {
        "packnet.format": "multitask",
        "packnet.layout": layout,
        "packnet.arch": model.arch,
        "packnet.tasks": json.dumps(model.task_names),
        # compact: every class name of every task (11.5 kB on the sample, 2% of its int8 graph)
        "packnet.classes": json.dumps([t.classes for t in model.tasks], separators=(",", ":")),
        "packnet.num_classes": json.dumps([t.num_classes for t in model.tasks]),
        **input_metadata(model),
        # one mode per task; absent when every task predates the modes (all crop)
        **({"packnet.resize": json.dumps([t.resize_mode for t in model.tasks])}
           if any(t.resize for t in model.tasks) else {}),
        "packnet.task_index_base": str(TASK_INDEX_BASE),
        "packnet.logits_padding": repr(multitask_portable.PADDING) if layout == multitask_portable.LAYOUT else PADDING,
        "packnet.per_task_norm": json.dumps(model.per_task_norm),
        "packnet.source_sha256": source_sha256 or "",
    }


def build_multitask_model(model: PackNet, opset: int = DEFAULT_OPSET, layout: str = DEFAULT_LAYOUT) -> onnx.ModelProto:
    """One ONNX graph computing any task of ``model``, chosen by the ``task_index`` input.

    ``layout="branches"`` is fast (within a few percent of the dense graph once loaded) and
    keeps one weight set per task in memory; ``layout="runtime-mask"`` keeps one weight set
    and masks it on every call. Both store the same bytes on disk.
    """
    skeleton, tensors = multitask_parts(model, opset, layout)  # checks layout, tasks and opset
    for name, value in tensors:
        array = value.materialize() if isinstance(value, Streamed) else as_array(value)
        skeleton.graph.initializer.append(numpy_helper.from_array(array, name))
    return skeleton


def multitask_parts(model: PackNet, opset: int = DEFAULT_OPSET, layout: str = DEFAULT_LAYOUT,
                    template: Template | None = None, source_sha256: str | None = None,
                    ir_version: int | None = None) -> tuple[onnx.ModelProto, list[tuple[str, object]]]:
    """The multi-task graph without its initializers, and those as ``(name, array | Streamed)``.

    The exporter writes the tensors one at a time (large ones piece by piece), so the whole
    model is never serialized in memory. ``template`` reuses a trace already made for the
    dense/sparse files.
    """
    check_layout(layout)
    check_has_tasks(model)
    check_opset(opset)
    check_layout_opset(layout, opset)
    body, keys = _body_graph(model, opset, template)
    b = _Builder()
    widest = max(t.num_classes for t in model.tasks)
    if layout == multitask_portable.LAYOUT:
        multitask_portable.build(b, body, keys, model, widest, opset)
    else:
        _indexed_layout(b, body, keys, model, layout, widest)

    graph = helper.make_graph(
        b.nodes, "packnet_multitask",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, model.image_size, model.image_size]),
         helper.make_tensor_value_info("task_index", multitask_portable.task_index_type(layout), [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widest]),
         helper.make_tensor_value_info("num_classes", multitask_portable.task_index_type(layout),
                                       multitask_portable.num_classes_shape(layout))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="packnet-export", doc_string=_DOC)
    for k, v in multitask_metadata(model, layout, source_sha256).items():
        proto.metadata_props.add(key=k, value=v)
    set_ir_version(proto, ir_version)
    return proto, b.tensors


def _indexed_layout(b: _Builder, body, keys: list[str], model: PackNet, layout: str, widest: int) -> None:
    """The ``branches`` and ``runtime-mask`` layouts: ``task_index`` checked once, then an
    ``If`` tree or ``Gather``s on it."""
    num_tasks = len(model.tasks)
    head_w, head_b = models.head_keys(model.arch)
    # stored tensors, and their decode (folded by onnxruntime at session creation)
    for j, (key, owner) in enumerate(model.owners.items()):
        _decode_weight(b, j, key, model.shared[key], owner, num_tasks)
    norm_sources = _norm_bias_sources(model)
    for key in keys:
        if key in model.owners or key in (head_w, head_b):
            continue
        if key not in norm_sources:
            raise PackNetError(f"the exported {model.arch} graph uses {key!r}, which the checkpoint does not hold")
        if model.per_task_norm:
            for k in range(1, num_tasks + 1):
                b.init(f"task{k}/{key}", model.task_tensors[k - 1][key])
        else:
            b.init(f"shared/{key}", model.shared[key])
    for k in range(1, num_tasks + 1):
        b.init(f"task{k}/{head_w}", model.task_tensors[k - 1][head_w])
        b.init(f"task{k}/{head_b}", model.task_tensors[k - 1][head_b])

    # task_index: checked once, used by everything downstream
    index = _checked_task_index(b, num_tasks)
    counts = b.const("num_classes/all", np.array([t.num_classes for t in model.tasks], dtype=np.int64))
    b.node("Gather", [counts, index], ["num_classes"], name="num_classes")

    def source(key: str, k: int) -> str:
        """The stored name that task k reads for state-dict ``key`` (not prunable)."""
        if key in (head_w, head_b):
            return f"task{k}/{key}"
        return f"task{k}/{key}" if model.per_task_norm else f"shared/{key}"

    if layout == "branches":
        b.nodes.extend(_select_branch(b, body, keys, model, index, 1, num_tasks, widest, source))
    else:
        _runtime_mask_body(b, body, keys, model, index, widest, source)


def write(context: ExportContext, task: None, path: Path) -> ExportedFile:
    """Write the multi-task graph of ``context.model`` (every task; ``task`` is None) to
    ``path``, tensor by tensor, in ``context.layout``."""
    skeleton, tensors = multitask_parts(context.model, context.opset, context.layout, template=context.template,
                                        source_sha256=context.source_sha256, ir_version=context.ir_version)
    total = sum(t.nbytes if isinstance(t, Streamed) else as_array(t).nbytes for _, t in tensors)
    external = write_onnx(path, skeleton, tensors, total)
    return ExportedFile(path, "multitask", None, file_bytes(path, external), external)


_DOC = ("PackNet multitask graph: task_index (int64 scalar, 0-based, see metadata packnet.tasks) picks the task; "
        "logits [N, max_classes] hold its logits in the first num_classes columns, -inf after.")


# --------------------------------------------------------------------- building
class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.tensors: list[tuple[str, object]] = []
        """``(name, tensor | array | Streamed)``: kept as references, serialized when written."""
        self._names: set[str] = set()

    def init(self, name: str, value) -> str:
        self.tensors.append((name, value))
        return name

    def const(self, name: str, value) -> str:
        if name not in self._names:
            self._names.add(name)
            self.init(name, value)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, into=None, **attrs) -> list[str]:
        node = helper.make_node(op, inputs, outputs, name=name or None, **attrs)
        (self.nodes if into is None else into).append(node)
        return outputs


def _norm_bias_sources(model: PackNet) -> list[str]:
    """Norm/bias keys the tasks compute with (batch-norm step counters excluded)."""
    return [k for k in model.norm_bias_keys() if not k.endswith("num_batches_tracked")]


def _decode_weight(b: _Builder, j: int, key: str, weight: torch.Tensor | None, owner: torch.Tensor, num_tasks: int,
                   values: Streamed | None = None) -> None:
    """Store ``key``'s used values and packed owner; add the nodes that rebuild both.

    Produces ``owner/<key>`` (int32, the weight's shape) and ``dense/<key>`` (float32, zero
    where the owner is 0; or the type of ``values``, the used values to store instead of
    ``weight``'s, e.g. the int8 graph's). CumSum + Gather on initializers, which onnxruntime
    folds at load (NonZero + ScatterND would not be folded).
    """
    n = owner.numel()
    bits = owner_bits(num_tasks)
    packed = b.init(f"packed/{key}/owner", packed_owner(owner, num_tasks))
    stored = values if values is not None else used_values(weight, owner)
    values = b.init(f"packed/{key}/values", stored)
    shape = b.init(f"packed/{key}/shape", np.array(owner.shape, dtype=np.int64))
    p = f"d{j}/"  # short names: a graph has a few hundred of them
    total = decode_planes(b, packed, n, bits, p)
    b.node("Identity", [total], [p + "owner"], "")
    b.node("Reshape", [p + "owner", shape], [f"owner/{key}"], "")
    gather_used(b, p + "owner", [values], stored.dtype, p)
    b.node("Reshape", [p + "dense", shape], [f"dense/{key}"], "")


def gather_used(b: _Builder, owner: str, values: list[str], dtype: np.dtype, p: str) -> str:
    """The flat dense weights (name ``<p>dense``) of flat int32 ``owner``: the used values,
    ``values`` laid end to end, where the owner is not 0, and 0 elsewhere.

    CumSum + Gather on initializers, which onnxruntime folds at load (NonZero + ScatterND
    would not be folded).
    """
    zero_i64 = b.const("decode/zero_i64", np.array(0, dtype=np.int64))
    zero_f = b.const(f"decode/zero_{dtype}", np.zeros(1, dtype=dtype))
    b.node("Greater", [owner, b.const("decode/zero_i32", np.array(0, dtype=np.int32))], [p + "used"], "")
    # int32 positions: a layer has < 2**31 weights, and the folded intermediates are half the size
    b.node("Cast", [p + "used"], [p + "used32"], "", to=TensorProto.INT32)
    b.node("CumSum", [p + "used32", zero_i64], [p + "position"], "")
    b.node("Mul", [p + "position", p + "used32"], [p + "index"], "")
    b.node("Concat", [zero_f, *values], [p + "values"], "", axis=0)
    return b.node("Gather", [p + "values", p + "index"], [p + "dense"], "", axis=0)[0]


def decode_planes(b: _Builder, packed: str, n: int, bits: int, p: str) -> str:
    """Nodes turning the packed owner mask ``packed`` (uint8 ``[bits, ceil(n / 8)]``, MSB
    first) back into the flat int32 owners of its ``n`` weights; returns their name.

    ``p`` prefixes the names of the intermediate values.
    """
    divisors = b.const("decode/divisors", np.array([128, 64, 32, 16, 8, 4, 2, 1], dtype=np.int32))
    two = b.const("decode/two", np.array(2, dtype=np.int32))
    axis_last = b.const("decode/axis_last", np.array([-1], dtype=np.int64))
    start = b.const("decode/start", np.array([0], np.int64))
    end = b.const(f"{p}end", np.array([n], np.int64))
    # One bit plane at a time: every folded intermediate is at most 4 bytes per weight.
    # onnxruntime (>= 1.27) skips folding any node whose output exceeds 1 GB; decoding all
    # planes at once made a [bits, n, 8] int32 tensor (1.2 GB for vgg16's fc6 with 3 bits),
    # which was then decoded on every call (17x slower).
    total = None
    for q in range(bits):
        plane = f"{p}q{q}/"
        b.node("Gather", [packed, b.const(f"decode/plane{q}", np.array(q, dtype=np.int64))], [plane + "bytes8"], "",
               axis=0)
        b.node("Cast", [plane + "bytes8"], [plane + "bytes"], "", to=TensorProto.INT32)
        b.node("Unsqueeze", [plane + "bytes", axis_last], [plane + "bytes2"], "")
        b.node("Div", [plane + "bytes2", divisors], [plane + "shifted"], "")
        b.node("Mod", [plane + "shifted", two], [plane + "bits2"], "")
        b.node("Reshape", [plane + "bits2", axis_last], [plane + "padded"], "")
        b.node("Slice", [plane + "padded", start, end], [plane + "bits"], "")
        value = plane + "bits"
        if q:
            b.node("Mul", [value, b.const(f"decode/place{q}", np.array(1 << q, dtype=np.int32))], [plane + "value"], "")
            value = plane + "value"
        if total is not None:
            b.node("Add", [total, value], [plane + "sum"], "")
            value = plane + "sum"
        total = value
    return total


def _checked_task_index(b: _Builder, num_tasks: int) -> str:
    """``task_index`` if it is in 0..T-1; otherwise a Gather out of bounds stops the run.

    The Gather's node name states the valid range, and onnxruntime's error message quotes
    it. Negative indices are refused too (Gather alone would read them from the end).
    """
    t = "task_index"
    zero = b.const("task_index/zero", np.array(0, dtype=np.int64))
    count = b.const("task_index/count", np.array(num_tasks, dtype=np.int64))
    b.node("GreaterOrEqual", [t, zero], ["task_index/not_negative"], "task_index/not_negative")
    b.node("Less", [t, count], ["task_index/below_count"], "task_index/below_count")
    b.node("And", ["task_index/not_negative", "task_index/below_count"], ["task_index/valid"], "task_index/valid")
    b.node("Where", ["task_index/valid", t, count], ["task_index/or_invalid"], "task_index/or_invalid")
    table = b.const("task_index/table", np.arange(num_tasks, dtype=np.int64))
    b.node("Gather", [table, "task_index/or_invalid"], ["task_index/checked"],
           f"task_index_must_be_0_to_{num_tasks - 1}", axis=0)
    return "task_index/checked"


def _copy_body(body: onnx.GraphProto, prefix: str, inputs: dict[str, str], into: list[onnx.NodeProto]) -> str:
    """Append ``body``'s nodes to ``into``, state-dict keys replaced by ``inputs`` and other
    values renamed ``<prefix><n>`` (short: a graph holds one copy per task); returns the
    name of the body's logits."""
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name == "input":
            return name
        if name in inputs:
            return inputs[name]
        return short.setdefault(name, f"{prefix}{len(short)}")

    for node in body.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.ClearField("name")
        new.input[:] = [rename(x) for x in node.input]
        new.output[:] = [rename(x) for x in node.output]
        into.append(new)
    return rename(body.output[0].name)


def _pad_logits(b: _Builder, logits: str, classes: int, widest: int, prefix: str, into) -> str:
    if classes == widest:
        return logits
    pads = b.const(f"pad/{widest - classes}", np.array([0, 0, 0, widest - classes], dtype=np.int64))
    ninf = b.const("pad/minus_inf", np.array(-np.inf, dtype=np.float32))
    return b.node("Pad", [logits, pads, ninf], [prefix + "logits_padded"], prefix + "pad", into=into)[0]


def _task_branch(b: _Builder, body, keys, model: PackNet, k: int, widest: int, source) -> onnx.GraphProto:
    """Task k's whole network as an If branch; its masked weights depend on initializers
    only, so onnxruntime folds them (and then fuses batch norm) at load."""
    nodes: list[onnx.NodeProto] = []
    prefix = f"t{k}/"  # value names of this branch
    limit = b.const(f"task{k}/owner_limit", np.array(k, dtype=np.int32))
    zero = b.const("mask/zero_f32", np.array(0.0, dtype=np.float32))
    inputs = {}
    for j, key in enumerate(keys):
        if key in model.owners:
            b.node("LessOrEqual", [f"owner/{key}", limit], [f"{prefix}u{j}"], "", into=nodes)
            inputs[key] = b.node("Where", [f"{prefix}u{j}", f"dense/{key}", zero], [f"{prefix}w{j}"], "",
                                 into=nodes)[0]
        else:
            # A Reshape onto its own shape, folded at load, makes the tensor a constant of this
            # branch: onnxruntime converts a Conv to its fast NCHWc form only when its weight
            # *and bias* are the branch's own constants, never outer-scope ones (vgg16's conv
            # biases: 1.3x the dense graph without this; batch norm fusion hid it on resnet50).
            shape = _stored(model, key, k).shape
            to = b.const("shape/" + "x".join(map(str, shape)), np.array(shape, dtype=np.int64))
            inputs[key] = b.node("Reshape", [source(key, k), to], [f"{prefix}c{j}"], "", into=nodes)[0]
    logits = _copy_body(body, prefix, inputs, nodes)
    out = _pad_logits(b, logits, model.tasks[k - 1].num_classes, widest, prefix, nodes)
    return _as_graph(nodes, f"task{k}", out, widest)


def _stored(model: PackNet, key: str, k: int) -> torch.Tensor:
    """The non-prunable tensor that task k reads for ``key`` (its own, or the shared one)."""
    own = model.task_tensors[k - 1]
    return own[key] if key in own else model.shared[key]


def _as_graph(nodes, name: str, out: str, widest: int) -> onnx.GraphProto:
    final = f"{name}/out"
    nodes.append(helper.make_node("Identity", [out], [final], name=f"{name}/out"))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(final, TensorProto.FLOAT,
                                                                             ["batch", widest])])


def _select_branch(b: _Builder, body, keys, model, index: str, lo: int, hi: int, widest: int, source,
                   ) -> list[onnx.NodeProto]:
    """Nodes computing the padded logits of the task in lo..hi (1-based) that ``index``
    (0-based) names: a balanced tree of If nodes, log2(T) deep."""
    mid = (lo + hi + 1) // 2
    split = b.const(f"select/below{mid}", np.array(mid - 1, dtype=np.int64))
    cond = f"select/{lo}_{hi}/cond"
    out = "logits" if (lo, hi) == (1, len(model.tasks)) else f"select/{lo}_{hi}/logits"
    nodes = [helper.make_node("Less", [index, split], [cond], name=cond)]

    def side(a: int, z: int) -> onnx.GraphProto:
        if a == z:
            return _task_branch(b, body, keys, model, a, widest, source)
        inner = _select_branch(b, body, keys, model, index, a, z, widest, source)
        return helper.make_graph(inner, f"select_{a}_{z}", [],
                                 [helper.make_tensor_value_info(inner[-1].output[0], TensorProto.FLOAT,
                                                                ["batch", widest])])

    if lo == hi:  # a single task: no choice to make
        branch = _task_branch(b, body, keys, model, lo, widest, source)
        return [*branch.node[:-1], helper.make_node("Identity", [branch.node[-1].input[0]], [out], name=out)]
    nodes.append(helper.make_node("If", [cond], [out], name=f"select/{lo}_{hi}",
                                  then_branch=side(lo, mid - 1), else_branch=side(mid, hi)))
    return nodes


def _runtime_mask_body(b: _Builder, body, keys, model: PackNet, index: str, widest: int, source) -> None:
    """One network: weights masked with the task on every call, per-task tensors gathered."""
    num_tasks = len(model.tasks)
    head_w, head_b = models.head_keys(model.arch)
    b.node("Add", [index, b.const("task_index/one", np.array(1, dtype=np.int64))], ["task/number_i64"], "task/number")
    b.node("Cast", ["task/number_i64"], ["task/number"], "task/number_i32", to=TensorProto.INT32)
    zero = b.const("mask/zero_f32", np.array(0.0, dtype=np.float32))
    axis0 = b.const("decode/axis0", np.array([0], dtype=np.int64))
    inputs = {}
    for key in keys:
        if key in model.owners:
            b.node("LessOrEqual", [f"owner/{key}", "task/number"], [f"uses/{key}"], f"uses/{key}")
            inputs[key] = b.node("Where", [f"uses/{key}", f"dense/{key}", zero], [f"masked/{key}"],
                                 f"mask/{key}")[0]
            continue
        if key not in (head_w, head_b) and not model.per_task_norm:
            inputs[key] = source(key, 1)
            continue
        parts = []
        for k in range(1, num_tasks + 1):
            name = source(key, k)
            if key in (head_w, head_b):  # pad every head to the widest: zero rows, -inf biases
                short = widest - model.tasks[k - 1].num_classes
                if short:
                    is_w = key == head_w
                    rank = model.task_tensors[k - 1][key].dim()  # a 1x1 conv head's weight has rank 4
                    pads = b.const(f"pad/head{'w' if is_w else 'b'}{short}",
                                   np.array([0] * rank + [short] + [0] * (rank - 1), dtype=np.int64))
                    fill = b.const("pad/minus_inf" if not is_w else "mask/zero_f32",
                                   np.array(0.0 if is_w else -np.inf, dtype=np.float32))
                    name = b.node("Pad", [name, pads, fill], [f"padded/{name}"], f"pad/{name}")[0]
            parts.append(b.node("Unsqueeze", [name, axis0], [f"stack/{k}/{key}"], f"stack/{k}/{key}")[0])
        b.node("Concat", parts, [f"stacked/{key}"], f"stacked/{key}", axis=0)
        inputs[key] = b.node("Gather", [f"stacked/{key}", index], [f"task/{key}"], f"task/{key}", axis=0)[0]
    logits = _copy_body(body, "net/", inputs, b.nodes)
    if model.task_tensors[0][head_w].dim() > 2 and any(t.num_classes < widest for t in model.tasks):
        # a conv head (squeezenet) feeds ReLU and pooling, which turn the padded -inf into 0: mask the columns
        columns = b.const("pad/columns", np.arange(widest, dtype=np.int64))
        b.node("Less", [columns, "num_classes"], ["pad/in_task"], "pad/in_task")
        ninf = b.const("pad/minus_inf", np.array(-np.inf, dtype=np.float32))
        b.node("Where", ["pad/in_task", logits, ninf], ["logits"], "logits")
    else:
        b.node("Identity", [logits], ["logits"], "logits")


# ----------------------------------------------------------------- torch export
def _body_graph(model: PackNet, opset: int, template: Template | None = None) -> tuple[onnx.GraphProto, list[str]]:
    """The network's graph (the exporter's one torch trace, ``template.graph_template``), with
    raw (unfused) batch norm and its state-dict tensors as names the caller supplies.

    Returns the graph and the state-dict keys it reads. Non-state constants become Constant
    nodes, so each copy of the body (one per task branch) carries them.
    """
    if template is None:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                template = graph_template(model, opset)
        except PackNetError:
            raise
        except Exception as exc:  # the exporter raises many kinds; all mean "this graph cannot be written"
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise PackNetError(f"torch.onnx.export cannot write {model.arch} at opset {opset}: {first[:200]}"
                               ) from None
    graph = template.model.graph
    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise PackNetError(f"{model.arch}'s graph has control flow, which the multitask graph cannot copy")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    for c in graph.initializer:  # non-state constants become Constant nodes, so each copy carries them
        nodes.insert(0, helper.make_node("Constant", [], [c.name], name=f"const/{c.name}", value=c))
    used = {x for n in nodes for x in n.input}
    keys = [k for k in template.keys if k in used]
    body = helper.make_graph(nodes, "body", list(graph.input), list(graph.output))
    return body, keys
