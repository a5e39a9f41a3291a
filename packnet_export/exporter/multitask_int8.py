"""The multi-task graph in int8: one int8 weight tensor per layer, shared by every task.

onnxruntime's quantizer works on one graph at a time; quantizing each task's dense graph on
its own would give each task its own weight scales, so the same stored weight would be a
different int8 value for each task and nothing could be shared. Here:

1. batch norm is folded into the convolutions, task by task;
2. shared norm (the default): the folded weights are the same for every task; one scale per
   output channel and layer is computed over the weights *any* task uses (symmetric,
   ``max |w| / 127``) and imposed on the quantizer of every task (``TensorQuantOverrides``);
   the last task uses every weight whose owner is not 0, so its int8 weights are the shared
   tensor, and every other task's are checked to be exactly that tensor under its mask;
3. per-task norm: task k computes with ``w * f_k`` (``f_k`` its batch-norm factor per output
   channel), a different float tensor per task, but ``w`` is shared: its int8 values
   ``q = round(w / s)`` are stored once and task k reads ``sign(f_k) * q`` under the scale
   ``s * |f_k|`` (imposed on its quantizer), which is its folded weight within half a step;
4. each task's activations are calibrated on its own images;
5. the file stores the shared int8 values of the used weights (1 byte each,
   ``packed/<key>/values``) and the packed owner mask of the layers laid end to end
   (``packed/owner.<c>``), decoded at load with the float graph's decode
   (``multitask.decode_planes`` / ``gather_used``), and one ``If`` branch per task with that
   task's QDQ graph: its weights are ``Where(owner <= k, shared, 0)`` (times its signs under
   per-task norm; folded at load), its activation scales, int32 biases and int8 head are
   its own (small initializers of the branch).

onnxruntime folds the masks and fuses each branch's QDQ groups into its int8 kernels at
load, as for a dense int8 graph. Only the ``branches`` layout exists in int8: the
``runtime-mask`` layout masks weights on every call, so they are never constants and no
QDQ group could be fused (every convolution would run dequantized, in float).

Six copies of a QDQ graph are a lot of structure next to a small model's weights (the
sample's 0.28 M): the decode runs once per chunk of layers, not per layer; a pool between
two identical quantizations runs on the uint8 values (two nodes fewer per pool and task,
what onnxruntime does at load anyway); identical scales and zero points are stored once;
attributes that state their default are dropped and values get short names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..checkpoint import PackNet
from ..errors import ParameterError
from . import multitask, quantization, sparse
from .calibration import CalibrationSet
from .quantization import QUANTIZED_SUFFIX
from .template import Template, task_tensor
from .writer import Streamed, as_array

DECODE_CHUNK = 1 << 24
"""Most weights whose owners one chain of nodes decodes (folded intermediates: 4 bytes each)."""


@dataclass
class Int8Multitask:
    skeleton: onnx.ModelProto
    tensors: list[tuple[str, object]]
    """Top-level initializers ``(name, array | Streamed)``: shared values, owners, scales."""
    budget: dict
    """The size target's parts (bytes): ``weight_bytes`` (nonzero x 1), ``mask_bytes``,
    ``task_bytes`` (heads, biases, activation scales of every task), ``scale_bytes``."""


def check_supported(model: PackNet, layout: str) -> None:
    if layout != multitask.DEFAULT_LAYOUT:
        why = (" (its weights are masked on every call, so no int8 kernel could use them)"
               if layout == "runtime-mask" else "")
        raise ParameterError("layout", f"$layout {layout} has no int8 form{why}; use $layout "
                             f"{multitask.DEFAULT_LAYOUT} with $precision int8")


def build(model: PackNet, template: Template, calibration: dict[int, CalibrationSet], opset: int,
          activation_type: str = "uint8") -> Int8Multitask:
    """The int8 multi-task graph of ``model``; ``calibration[k]`` calibrates task k (1-based),
    its activations quantized to ``activation_type``.

    ``template`` is the export's torch trace.
    """
    check_supported(model, multitask.DEFAULT_LAYOUT)
    num_tasks = len(model.tasks)
    prunable = [k for k in template.keys if k in model.owners]
    folded_skeleton = onnx.ModelProto()
    folded_skeleton.CopyFrom(template.model)
    folded = []  # per task: the fp32 tensors with batch norm folded in
    factors: list[dict[str, np.ndarray]] = []  # per task: each folded weight's per-channel factor
    structure = None
    for k in range(1, num_tasks + 1):
        get = task_tensor(model, k)
        graph = onnx.GraphProto()
        graph.CopyFrom(template.model.graph)
        factors.append({})
        folded.append(quantization.fold_batch_norm(graph, {key: quantization.materialize(get(key))
                                                         for key in template.keys}, factors[-1]))
        structure = structure or graph
    del folded_skeleton.graph.node[:]
    folded_skeleton.graph.node.extend(structure.node)
    if model.per_task_norm:
        shared, signs, scales = _per_task_norm_scales(model, prunable, factors)
    else:
        # one scale per channel over every weight any task uses: the last task uses them all
        shared, signs, scales = None, [{}] * num_tasks, [{key: quantization.symmetric_scales([folded[-1][key]])
                                                          for key in prunable}] * num_tasks
    quantized = []
    for k in range(1, num_tasks + 1):
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(folded_skeleton)
        skeleton.graph.output[0].type.tensor_type.shape.dim[1].dim_value = model.tasks[k - 1].num_classes
        quantized.append(quantization.quantize_int8(quantization.float_model(skeleton, folded[k - 1]),
                                                    calibration[k].images, weight_scales=scales[k - 1],
                                                    activation_type=activation_type))
    shared = shared or quantization.int8_weights(quantized[-1])
    for k, q in enumerate(quantized, start=1):
        _check_shared(q, shared, model, prunable, k, signs[k - 1], exact=not model.per_task_norm)
    return _assemble(model, quantized, shared, prunable, opset, signs)


def _per_task_norm_scales(model: PackNet, prunable: list[str], factors: list[dict[str, np.ndarray]]):
    """The shared int8 weights of a per-task-norm model and what each task puts around them.

    Task k computes with ``w * f_k`` (its batch norm folded in, ``f_k`` per output channel),
    a different float tensor per task, but ``w`` itself is shared: its int8 values
    ``q = round(w / s)`` under one scale ``s`` per channel (over the weights any task uses)
    are stored once, and task k's int8 weight is ``sign(f_k) * q`` under the scale
    ``s * |f_k|``, which dequantizes to ``w * f_k`` within half a step (a channel whose
    factor is 0 reads 0). Returns (shared int8 per key, per task the per-channel sign of
    each layer whose factors are not all positive, per task the weight scales).
    """
    shared: dict[str, np.ndarray] = {}
    base: dict[str, np.ndarray] = {}
    for key in prunable:
        used = torch.where(model.owners[key] != 0, model.shared[key], torch.zeros(())).float().numpy()
        base[key] = quantization.symmetric_scales([used])
        per_channel = base[key].reshape(-1, *([1] * (used.ndim - 1)))
        shared[key] = np.clip(np.rint(used / per_channel), -127, 127).astype(np.int8)
    signs, scales = [], []
    for f in factors:
        ones = {key: np.ones_like(base[key], dtype=np.float64) for key in prunable}
        f = {**ones, **{key: v for key, v in f.items() if key in base}}
        signs.append({key: np.sign(v).astype(np.int8) for key, v in f.items() if (v <= 0).any()})
        scales.append({key: np.where(v == 0, base[key], base[key] * np.abs(v)).astype(np.float32)
                       for key, v in f.items()})
    return shared, signs, scales


def _check_shared(q: onnx.ModelProto, shared: dict[str, np.ndarray], model: PackNet, prunable: list[str],
                  k: int, signs: dict[str, np.ndarray], exact: bool = True) -> None:
    """Task k's int8 weights, as onnxruntime's quantizer made them, against the shared
    tensor under its mask (times its signs). ``exact=False`` (per-task norm) allows one
    step: the quantizer divides ``w * f`` by ``s * |f|`` in float32, which can round a tie
    the other way than ``w / s``; the file computes with the shared value."""
    ours = quantization.int8_weights(q)
    for key in prunable:
        owner = model.owners[key].numpy()
        sign = signs.get(key, np.int8(1)).reshape(-1, *([1] * (owner.ndim - 1)))
        expected = np.where((owner > 0) & (owner <= k), shared[key] * sign, np.int8(0)).astype(np.int16)
        diff = np.abs(ours[key].astype(np.int16) - expected)
        if diff.max() > (0 if exact else 1):
            raise RuntimeError(f"task {k}'s int8 {key} is not the shared int8 tensor under its mask")


def _assemble(model: PackNet, quantized: list[onnx.ModelProto], shared: dict[str, np.ndarray],
              prunable: list[str], opset: int, signs: list[dict[str, np.ndarray]]) -> Int8Multitask:
    b = multitask._Builder()
    num_tasks = len(model.tasks)
    widest = max(t.num_classes for t in model.tasks)
    first = {i.name: i for i in quantized[-1].graph.initializer}
    shared_names: dict[str, str] = {}  # the QDQ graph's weight scale names -> stored once
    mask_bytes = _decode_shared(b, model, shared, prunable)
    for j, key in enumerate([] if model.per_task_norm else prunable):  # per-task norm: per-task scales
        if key + "_scale" in first:  # a conv's zero point of 0 is implicit (quantization.drop_zero_points)
            shared_names[key + "_scale"] = b.init(f"s{j}", numpy_helper.to_array(first[key + "_scale"]))
        if key + "_zero_point" in first:
            shared_names[key + "_zero_point"] = b.init(f"z{j}", numpy_helper.to_array(first[key + "_zero_point"]))
    index = multitask._checked_task_index(b, num_tasks)
    counts = b.const("num_classes/all", np.array([t.num_classes for t in model.tasks], dtype=np.int64))
    b.node("Gather", [counts, index], ["num_classes"], name="num_classes")
    branches = [_branch(b, q, k, prunable, shared_names, signs[k - 1], model.tasks[k - 1].num_classes, widest)
                for k, q in enumerate(quantized, start=1)]
    _share_identical(b, branches)
    heads, scales = _head_and_scale_bytes(branches, dict(b.tensors))
    b.nodes.extend(_select(b, branches, index, 1, num_tasks, widest))
    graph = helper.make_graph(
        b.nodes, "packnet_multitask_int8",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, model.image_size, model.image_size]),
         helper.make_tensor_value_info("task_index", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widest]),
         helper.make_tensor_value_info("num_classes", TensorProto.INT64, [])],
    )
    stored = {name for name, _ in b.tensors if name.startswith("packed/")}
    renamed = _compact_names(graph, keep=stored | {"input", "task_index", "logits", "num_classes"})
    b.tensors = [(renamed.get(name, name), value) for name, value in b.tensors]
    opsets = {o.domain: o.version for o in quantized[-1].opset_import}
    opsets[""] = max(opsets.get("", opset), opset)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="packnet-export", doc_string=multitask._DOC)
    for key, value in multitask.multitask_metadata(model, multitask.DEFAULT_LAYOUT).items():
        proto.metadata_props.add(key=key, value=value)
    nonzero = sum(int((o != 0).sum()) for o in model.owners.values())
    budget = {"nonzero_weights": nonzero, "weight_bytes": nonzero, "mask_bytes": mask_bytes, "head_bytes": heads,
              "scale_bytes": scales, "total_bytes": nonzero + mask_bytes + heads + scales}
    return Int8Multitask(proto, b.tensors, budget)


def _decode_shared(b, model: PackNet, shared: dict[str, np.ndarray], prunable: list[str]) -> int:
    """Store the shared int8 values of every layer (``packed/<key>/values``) and the packed
    owner mask of each chunk of layers (``packed/owner.<c>``: the layers' owners end to end);
    add the nodes that rebuild ``owner/<key>`` and ``dense/<key>`` (int8) from them.

    One decode per chunk rather than per layer (``multitask._decode_weight``): a decode is
    about 30 nodes, which on a small model weighed more than the 5% size allowance. Chunks
    of at most ``DECODE_CHUNK`` weights keep the folded intermediates (4 bytes per weight)
    far below onnxruntime's 1 GB folding limit. Returns the packed mask's bytes.
    """
    num_tasks = len(model.tasks)
    bits = multitask.owner_bits(num_tasks)
    mask_bytes = 0
    chunks = sparse.plan_chunks({key: tuple(model.owners[key].shape) for key in prunable}, DECODE_CHUNK)
    for c, chunk in enumerate(chunks):
        keys = [layer.key for layer in chunk.layers]
        owners = torch.cat([model.owners[key].reshape(-1) for key in keys])
        packed = multitask.packed_owner(owners, num_tasks)
        mask_bytes += packed.nbytes
        name = b.init(f"packed/owner.{c}", packed)
        values = []
        for key in keys:
            used = shared[key][model.owners[key].numpy() != 0]
            values.append(b.init(f"packed/{key}/values",
                                 Streamed(used.shape, np.dtype(np.int8), lambda v=used: iter([v]))))
        p = f"d{c}/"
        owner = multitask.decode_planes(b, name, chunk.size, bits, p)
        dense = multitask.gather_used(b, owner, values, np.dtype(np.int8), p)
        sizes = [int(np.prod(layer.shape)) for layer in chunk.layers]
        if len(keys) > 1:
            split = b.const(f"{p}sizes", np.array(sizes, dtype=np.int64))
            owner_parts = b.node("Split", [owner, split], [f"{p}o{i}" for i in range(len(keys))], "", axis=0)
            dense_parts = b.node("Split", [dense, split], [f"{p}v{i}" for i in range(len(keys))], "", axis=0)
        else:
            owner_parts, dense_parts = [owner], [dense]
        for key, o, d in zip(keys, owner_parts, dense_parts):
            shape = b.init(f"packed/{key}/shape", np.array(model.owners[key].shape, dtype=np.int64))
            b.node("Reshape", [o, shape], [f"owner/{key}"], "")
            b.node("Reshape", [d, shape], [f"dense/{key}"], "")
    return mask_bytes


def _branch(b, q: onnx.ModelProto, k: int, prunable: list[str], shared_names: dict[str, str],
            signs: dict[str, np.ndarray], classes: int, widest: int) -> onnx.GraphProto:
    """Task k's QDQ graph as an If branch, holding its own initializers (activation scales,
    int32 biases, int8 head; per-task norm: its weight scales and signs)."""
    prefix = f"t{k}/"
    nodes: list[onnx.NodeProto] = []
    limit = b.const(f"task{k}/owner_limit", np.array(k, dtype=np.int32))
    zero = b.const("mask/zero_int8", np.array(0, dtype=np.int8))
    inputs: dict[str, str] = {}
    initializers = []
    ranks = {i.name: i.dims for i in q.graph.initializer}
    for j, key in enumerate(prunable):
        b.node("LessOrEqual", [f"owner/{key}", limit], [f"{prefix}u{j}"], "", into=nodes)
        weight = b.node("Where", [f"{prefix}u{j}", f"dense/{key}", zero], [f"{prefix}w{j}"], "", into=nodes)[0]
        if key in signs:  # a channel whose batch-norm factor is negative (or 0) in this task
            sign = signs[key].reshape(-1, *([1] * (len(ranks[key + QUANTIZED_SUFFIX]) - 1)))
            initializers.append(numpy_helper.from_array(sign, f"{prefix}m{j}"))
            weight = b.node("Mul", [weight, f"{prefix}m{j}"], [f"{prefix}x{j}"], "", into=nodes)[0]
        inputs[key + QUANTIZED_SUFFIX] = weight
    inputs.update(shared_names)
    body = onnx.GraphProto()
    body.CopyFrom(q.graph)
    _pool_on_int8(body)
    for n, init in enumerate(i for i in body.initializer if i.name not in inputs):
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = inputs[init.name] = f"{prefix}i{n}"
        initializers.append(copy)
    logits = multitask._copy_body(body, prefix, inputs, nodes)
    out = multitask._pad_logits(b, logits, classes, widest, prefix, nodes)
    _drop_default_attributes(nodes)
    logits_info = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", widest])
    return helper.make_graph(nodes, f"task{k}", [], [logits_info], initializer=initializers)


PASS_THROUGH = ("MaxPool", "Flatten", "Reshape")
"""Operators that give the same result on uint8 values as on the floats they stand for
(max and moving values commute with a monotonic quantization at one scale)."""


def _pool_on_int8(graph: onnx.GraphProto) -> None:
    """Turn ``Q -> DQ -> MaxPool -> Q -> DQ`` (the same scale and zero point on both sides)
    into ``Q -> MaxPool -> DQ`` in ``graph``: the same numbers, two nodes fewer.

    onnxruntime makes this change itself at load (its QDQ "drop" rules); written out, it
    saves two nodes per pool and per task in the multi-task graph, where the fixed graph
    structure counts against the 5% size allowance.
    """
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type not in PASS_THROUGH or node.output[0] in outputs:
            continue
        dq, after = producers.get(node.input[0]), readers.get(node.output[0], [])
        if (dq is None or dq.op_type != "DequantizeLinear" or len(readers[dq.output[0]]) != 1 or len(after) != 1
                or after[0].op_type != "QuantizeLinear" or list(after[0].input[1:]) != list(dq.input[1:])):
            continue
        node.input[0] = dq.input[0]
        node.output[0] = after[0].output[0]
        dropped.update((id(dq), id(after[0])))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


_DEFAULTS = {"Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}, "Flatten": {"axis": 1},
             "MaxPool": {"ceil_mode": 0, "storage_order": 0}, "Conv": {"group": 1}}


def _drop_default_attributes(nodes: list[onnx.NodeProto]) -> None:
    """Remove attributes that state their operator's default (``alpha=1.0`` on Gemm, ...):
    six copies of each in a six-task graph."""
    for node in nodes:
        defaults = _DEFAULTS.get(node.op_type, {})
        kept = [a for a in node.attribute
                if not (a.name in defaults and helper.get_attribute_value(a) == defaults[a.name])]
        if len(kept) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)


def _share_identical(b, branches: list[onnx.GraphProto]) -> None:
    """Store once the scalars, scales and zero points that several branches (or one, twice)
    hold with the same value, e.g. the zero point 0 of every activation after a ReLU, or the
    weight scales of a layer without batch norm in a per-task-norm model: they move to the
    main graph, which every branch reads."""
    seen: dict[tuple, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for graph in branches:
        scale_inputs = {x for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                        for x in n.input[1:]}
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            if array.size == 1 or init.name in scale_inputs:
                seen.setdefault((array.dtype.str, array.shape, array.tobytes()), []).append((graph, init))
    renamed: dict[str, str] = {}
    for (_, _, _), holders in seen.items():
        if len(holders) < 2:
            continue
        name = b.init(f"same/{len(renamed)}", numpy_helper.to_array(holders[0][1]))
        for _, init in holders:
            renamed[init.name] = name
    for graph in branches:
        keep = [i for i in graph.initializer if i.name not in renamed]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        for node in graph.node:
            node.input[:] = [renamed.get(x, x) for x in node.input]


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)


def _short_name(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = digits[i % 62]
    while i >= 62:
        i = i // 62 - 1
        out = digits[i % 62] + out
    return out


def _compact_names(graph: onnx.GraphProto, keep: set[str]) -> dict[str, str]:
    """Give every value of ``graph`` and its branches but ``keep`` a short name (``0``,
    ``1``, ... ``zz``), and drop node names but the task index check's (its name is the
    error message); returns the mapping. Six copies of a QDQ graph name about 2,500
    values: their generated names (``t6/45``) were 10% of a small model's file."""
    names: dict[str, str] = {}
    counter = iter(range(1 << 62))

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = next(c for c in map(_short_name, counter) if c not in keep)
        return names[name]

    for g in _all_graphs(graph):
        for init in g.initializer:
            init.name = short(init.name)
        for node in g.node:
            if not node.name.startswith("task_index_must"):
                node.ClearField("name")
            node.input[:] = [short(x) for x in node.input]
            node.output[:] = [short(x) for x in node.output]
        for value in g.output:
            value.name = short(value.name)
        del g.value_info[:]
    return names


def _head_and_scale_bytes(branches: list[onnx.GraphProto], top: dict[str, object]) -> tuple[int, int]:
    """(heads, scales) of the size target, in stored bytes: ``scales`` are the scales and
    zero points of every QuantizeLinear / DequantizeLinear (the shared weight scales and
    every task's activation and head scales); ``heads`` every other tensor a task holds
    (its int8 head, its int32 biases)."""
    scale_names = {x for g in branches for n in g.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") for x in n.input[1:]}
    owned = {i.name: numpy_helper.to_array(i).nbytes for g in branches for i in g.initializer}
    shared = {name: (value.nbytes if isinstance(value, Streamed) else as_array(value).nbytes)
              for name, value in top.items() if name in scale_names}
    scales = sum(shared.values()) + sum(n for name, n in owned.items() if name in scale_names)
    heads = sum(n for name, n in owned.items() if name not in scale_names)
    return heads, scales


def _select(b, branches: list[onnx.GraphProto], index: str, lo: int, hi: int, widest: int) -> list[onnx.NodeProto]:
    """A balanced tree of If nodes on ``index`` (0-based) over ``branches[lo-1 .. hi-1]``."""
    out = "logits" if (lo, hi) == (1, len(branches)) else f"select/{lo}_{hi}/logits"
    if lo == hi:  # a single task: no choice to make; its branch's nodes and tensors join the main graph
        branch = branches[lo - 1]
        for init in branch.initializer:
            b.init(init.name, numpy_helper.to_array(init))
        return [*branch.node, helper.make_node("Identity", [branch.output[0].name], [out])]
    mid = (lo + hi + 1) // 2
    split = b.const(f"select/below{mid}", np.array(mid - 1, dtype=np.int64))
    cond = f"select/{lo}_{hi}/cond"

    def side(a: int, z: int) -> onnx.GraphProto:
        if a == z:
            return branches[a - 1]
        inner = _select(b, branches, index, a, z, widest)
        return helper.make_graph(inner, f"select_{a}_{z}", [],
                                 [helper.make_tensor_value_info(inner[-1].output[0], TensorProto.FLOAT,
                                                                ["batch", widest])])

    return [helper.make_node("Less", [index, split], [cond], name=cond),
            helper.make_node("If", [cond], [out], name=f"select/{lo}_{hi}", then_branch=side(lo, mid - 1),
                             else_branch=side(mid, hi))]

