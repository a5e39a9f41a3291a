"""The ``portable`` multi-task layout: one graph that every measured edge converter runs.

The other layouts pick the task with ``If`` (``branches``) or ``Gather`` on ``task_index``
(``runtime-mask``). Converters handle neither: pnnx (ncnn), onnx2tf (TFLite), MNN and TVM
fail on ``If`` subgraphs that read outer-scope tensors or hold batch norm, pnnx evaluates
the graph with its own ``task_index`` and stops at the range check, and onnx2tf cannot place
a ``BatchNormalization`` after a convolution whose weight is computed (see
``benchmarks/EDGE.md``). This layout uses only arithmetic that every one of them converts:

* **batch norm folded into the convolutions** at export (shared-norm models, the paper's):
  ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``.
  Scaling an output channel commutes with masking, so the folded weights are still one set
  shared by all tasks, stored and masked exactly like the raw ones. Per-task norms become a
  ``Mul`` and an ``Add`` with the task's scale and shift, picked as below.
* **float32 ``task_index`` and ``num_classes``** (int64 in the other layouts), and
  ``num_classes`` of shape ``[1]`` (a scalar elsewhere): ncnn has float tensors only and no
  scalars, and pnnx turns a Cast from or to int64 into a ``Tensor.to`` layer that ncnn
  cannot load.
* **MatMul for fully connected layers** whose weight is computed (masked, or the task's head):
  pnnx leaves ``Gemm`` with a computed weight as ``F.linear``, which ncnn lacks.
* **convolutions as patches and a MatMul** where the weight is masked (group 1): a constant
  depthwise ``Conv`` copies each input channel's ``kh x kw`` shifted views into channels
  (im2col, same strides/pads/dilations), and ``MatMul`` with the masked weight as an
  ``[I*kh*kw, O]`` matrix sums them, in NHWC between two ``Transpose``. onnx2tf (1.29) never
  computes a ``Conv`` weight: for a weight made by ``Mul(W, mask)`` it takes the producer's
  first constant input, ``W``, so the mask was dropped and every task ran with all weights
  (top-1 11-62% on five of six tasks). Grouped convolutions, and those whose output has
  channels = height = width (onnx2tf mislays that tensor after the ``Transpose``), are one
  constant ``Conv`` per owner task instead (see ``_conv_as_matmul``). Every ``Conv`` left in
  the graph has a constant weight.
* **the task as a one-hot row**: ``onehot = Clip(1 - 2 |task_index - [0..T-1]|, 0, 1)``;
  per-task norms and class counts are ``MatMul(onehot, stacked)`` (exact: one 1, zeros).
* **every head at once**: one constant fully connected layer holds all tasks' heads side by
  side (zero-padded to the widest), and the task's block is ``ReduceSum(logits * onehot)``.
* **the mask with Sub/Clip/Mul**: task k (1-based) uses a weight iff ``owner <= k``, i.e.
  ``Clip(k + 1 - owner, 0, 1)`` is 1, else 0 (owners are integers). The decode of the stored
  values and owners is on initializers only, as in the other layouts, so converters fold it;
  the masking depends on ``task_index`` and runs on every call (like ``runtime-mask``).
* **padding with the lowest float32, not -inf**: with ``keep = Clip(num_classes - column, 0,
  1)``, ``logits + (keep - 1) x 3.4e38`` adds 0 to the task's columns and -3.4e38 to the
  others. Softmax still gives them exactly 0 and argmax never picks them; -inf cannot be
  made portably (ncnn computes ``-1 / 0`` and ``Log(0)`` as NaN).
* **no failing node**: a ``task_index`` outside 0..T-1 (or not a whole number) gives NaN
  logits (``+ Sqrt(sum(onehot) - 1)``) and no class count instead of an error, because a
  converter that evaluates the graph with a task index of its own choosing (pnnx does)
  must not hit an error node, and most edge runtimes cannot raise one anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto

from .. import models
from ..checkpoint import PackNet
from ..errors import PackNetError
from .writer import graph_links

LAYOUT = "portable"
PADDING = float(np.finfo(np.float32).min)
"""The logits after a task's classes (-3.4028235e38; the other layouts use -inf)."""


def task_index_type(layout: str) -> int:
    """The element type of the ``task_index`` input and the ``num_classes`` output: float32
    in this layout, int64 in the others.

    ncnn has float tensors only and no Cast layer: pnnx turns a Cast from or to int64 into
    ``Tensor.to``, which ``ncnn.Net`` refuses to load. A float32 holds 0..T-1 exactly.
    """
    return TensorProto.FLOAT if layout == LAYOUT else TensorProto.INT64


def num_classes_shape(layout: str) -> list[int]:
    """``num_classes`` is ``[1]`` in this layout (ncnn has no scalars), a scalar ``[]`` in the others."""
    return [1] if layout == LAYOUT else []


def build(b, body: onnx.GraphProto, keys: list[str], model: PackNet, widest: int, opset: int) -> None:
    """Add to the multi-task builder ``b`` the nodes and tensors that compute ``logits`` and
    ``num_classes`` from ``input`` and ``task_index`` (``body``: the network's graph)."""
    from .multitask import _copy_body, _decode_weight  # the layouts share the decode and the body copy

    num_tasks = len(model.tasks)
    head_w, head_b = models.head_keys(model.arch)
    shapes = _output_shapes(body, model, opset)
    nodes, folded, biases = _fold_batch_norm(body, keys, model)
    nodes, transposed = _gemm_as_matmul(nodes, set(model.owners))
    nodes, columns, by_owner, patch_constants = _conv_as_matmul(nodes, model.owners, shapes)
    transposed.update(columns)
    body = onnx.helper.make_graph(nodes, body.name, list(body.input), list(body.output))
    used = {x for n in nodes for x in n.input}

    # the task as a one-hot row [1, T], and whether it names a task at all
    b.node("Identity", ["task_index"], ["task/float"], "task/float")
    tasks = b.const("task/positions", np.arange(num_tasks, dtype=np.float32))
    one = b.const("task/one", np.array(1.0, dtype=np.float32))
    zero = b.const("task/zero", np.array(0.0, dtype=np.float32))
    b.node("Sub", ["task/float", tasks], ["task/offset"], "task/offset")
    b.node("Abs", ["task/offset"], ["task/distance"], "task/distance")
    # 1 - 2|t - j|: 1 at an integer t = j, below 1 (so the row sums below 1) at any fraction
    b.node("Add", ["task/distance", "task/distance"], ["task/distance2"], "task/distance2")
    b.node("Sub", [one, "task/distance2"], ["task/closeness"], "task/closeness")
    b.node("Clip", ["task/closeness", zero, one], ["task/onehot_flat"], "task/onehot_flat")
    b.node("Reshape", ["task/onehot_flat", b.const("shape/1xT", np.array([1, num_tasks], dtype=np.int64))],
           ["task/onehot"], "task/onehot")
    counts = b.const("task/num_classes", np.array([[t.num_classes] for t in model.tasks], dtype=np.float32))
    b.node("MatMul", ["task/onehot", counts], ["task/classes_11"], "task/classes")
    b.node("MatMul", ["task/onehot", b.const("task/ones", np.ones((num_tasks, 1), dtype=np.float32))],
           ["task/valid_11"], "task/valid")
    # the 1-based task number k + 1, the constant part of the mask Clip(k + 1 - owner, 0, 1)
    b.node("Add", ["task/float", b.const("task/two", np.array(2.0, dtype=np.float32))], ["task/k_plus_1"],
           "task/k_plus_1")
    if by_owner:  # 1 where task k uses owner j's weights (j <= k + 1), one [1] tensor per owner
        owners = b.const("task/owners", np.arange(1, num_tasks + 1, dtype=np.float32))
        b.node("Sub", ["task/k_plus_1", owners], ["task/owner_margin"], "task/owner_margin")
        b.node("Clip", ["task/owner_margin", zero, one], ["task/uses_owner"], "task/uses_owner")
        axis0 = b.const("axes/0", np.array([0], dtype=np.int64))
        for j in range(1, num_tasks + 1):
            at = [b.const(f"at/{v}", np.array([v], dtype=np.int64)) for v in (j - 1, j)]
            b.node("Slice", ["task/uses_owner", at[0], at[1], axis0], [f"task/uses_owner{j}"], f"task/uses_owner{j}")

    inputs: dict[str, str] = {}
    for j, key in enumerate(keys):
        if key not in used and transposed.get(key) not in used and key not in by_owner:  # folded norms, conv biases
            continue
        if key in model.owners:
            weight = folded.get(key, model.shared[key])
            _decode_weight(b, j, key, weight, model.owners[key], num_tasks)
            owner, dense = f"owner/{key}", f"dense/{key}"
            if key in by_owner:  # constant convolutions, one per owner: Mul/Equal on initializers, folded
                for j in by_owner[key]:
                    b.node("Equal", [owner, b.const(f"owner/is{j}", np.array(j, dtype=np.int32))],
                           [f"owner_is{j}/{key}"], "")
                    b.node("Cast", [f"owner_is{j}/{key}"], [f"owner_isf{j}/{key}"], "", to=TensorProto.FLOAT)
                    inputs[f"{key}/owner{j}"] = b.node("Mul", [dense, f"owner_isf{j}/{key}"],
                                                       [f"owned{j}/{key}"], "")[0]
                continue
            if key in columns:  # [O, I, kh, kw] as the [O, I*kh*kw] rows of the patch MatMul
                rows = b.const(f"shape/{model.owners[key].shape[0]}x-1",
                               np.array([model.owners[key].shape[0], -1], dtype=np.int64))
                owner = b.node("Reshape", [owner, rows], [f"owner_r/{key}"], "")[0]
                dense = b.node("Reshape", [dense, rows], [f"dense_r/{key}"], "")[0]
            if key in transposed:  # for MatMul; on initializers only, so converters fold it
                owner = b.node("Transpose", [owner], [f"owner_t/{key}"], "")[0]
                dense = b.node("Transpose", [dense], [f"dense_t/{key}"], "")[0]
            b.node("Cast", [owner], [f"ownerf/{key}"], "", to=TensorProto.FLOAT)
            b.node("Sub", ["task/k_plus_1", f"ownerf/{key}"], [f"margin/{key}"], f"margin/{key}")
            b.node("Clip", [f"margin/{key}", zero, one], [f"uses/{key}"], f"uses/{key}")
            inputs[transposed.get(key, key)] = b.node("Mul", [dense, f"uses/{key}"], [f"masked/{key}"],
                                                      f"mask/{key}")[0]
        elif key in (head_w, head_b):  # every task's head, side by side: constant weights
            inputs[key] = _side_by_side(b, key, [t[key] for t in model.task_tensors], widest)
        elif model.per_task_norm:
            inputs[key] = _pick(b, key, [_tensor(model, k, key) for k in range(1, num_tasks + 1)])
        else:
            inputs[key] = b.init(f"shared/{key}", model.shared[key])
    for name, value in patch_constants.items():
        inputs[name] = b.const(name, value)
    inputs.update({f"task/uses_owner{j}": f"task/uses_owner{j}" for j in range(1, num_tasks + 1) if by_owner})
    for name, (value, per_task) in biases.items():
        inputs[name] = _pick(b, name, value) if per_task else b.init(name, value[0])
    missing = sorted(x for x in used if (x in biases or x in keys or x in transposed.values()) and x not in inputs)
    if missing:
        raise PackNetError(f"the portable graph lost {missing[0]!r} while folding batch norm")
    every = _copy_body(body, "net/", inputs, b.nodes)
    # the task's block of the [N, T x widest] logits: sum over j of block j x onehot[j]
    # (Slice/Mul/Add: pnnx drops the axes of a ReduceSum over the tasks)
    axis1 = b.const("axes/1", np.array([1], dtype=np.int64))
    axis0 = b.const("axes/0", np.array([0], dtype=np.int64))
    raw = None
    for j in range(num_tasks):
        at = [b.const(f"at/{v}", np.array([v], dtype=np.int64)) for v in (j * widest, (j + 1) * widest, j, j + 1)]
        block = b.node("Slice", [every, at[0], at[1], axis1], [f"logits/block{j}"], f"logits/block{j}")[0]
        weight = b.node("Slice", ["task/onehot_flat", at[2], at[3], axis0], [f"task/is{j}"], f"task/is{j}")[0]
        term = b.node("Mul", [block, weight], [f"logits/term{j}"], f"logits/term{j}")[0]
        raw = term if raw is None else b.node("Add", [raw, term], [f"logits/sum{j}"], f"logits/sum{j}")[0]

    # -inf after the task's classes, NaN everywhere for an index that names no task
    columns = b.const("logits/columns", np.arange(widest, dtype=np.float32).reshape(1, widest))
    b.node("Sub", ["task/classes_11", columns], ["logits/room"], "logits/room")
    b.node("Clip", ["logits/room", zero, one], ["logits/keep"], "logits/keep")
    # (keep - 1) x the lowest float32: 0 on the task's columns, PADDING after
    b.node("Sub", ["logits/keep", one], ["logits/drop"], "logits/drop")
    b.node("Mul", ["logits/drop", b.const("logits/lowest", np.array(-PADDING, dtype=np.float32))],
           ["logits/padding"], "logits/padding")
    b.node("Sub", ["task/valid_11", one], ["task/invalid"], "task/invalid")
    b.node("Sqrt", ["task/invalid"], ["task/nan_if_invalid"], "task/nan_if_invalid")
    b.node("Add", [raw, "logits/padding"], ["logits/padded"], "logits/padded")
    b.node("Add", ["logits/padded", "task/nan_if_invalid"], ["logits"], "logits")
    # float32 [1]: pnnx turns a Cast or a Reshape to [] into layers ncnn lacks, and ncnn
    # cannot sum along its batch axis
    b.node("Reshape", ["task/classes_11", b.const("shape/1", np.array([1], dtype=np.int64))], ["num_classes"],
           "num_classes")


def _pick(b, name: str, per_task: list) -> str:
    """One task's copy of ``name`` (per-task norms): ``MatMul(onehot, stacked)`` reshaped to
    its shape. The stack is built with Reshape/Concat on the stored tensors (folded)."""
    shape = list(per_task[0].shape)
    flat = b.const(f"shape/1x{int(np.prod(shape))}", np.array([1, int(np.prod(shape))], dtype=np.int64))
    rows = [b.node("Reshape", [b.init(f"task{k + 1}/{name}", value), flat], [f"row{k + 1}/{name}"], "")[0]
            for k, value in enumerate(per_task)]
    b.node("Concat", rows, [f"stacked/{name}"], "", axis=0)
    b.node("MatMul", ["task/onehot", f"stacked/{name}"], [f"picked/{name}"], f"pick/{name}")
    target = b.const("shape/" + "x".join(map(str, shape)), np.array(shape, np.int64))
    return b.node("Reshape", [f"picked/{name}", target], [f"task/{name}"], f"task/{name}")[0]


def _side_by_side(b, name: str, per_task: list, widest: int) -> str:
    """Every task's head weight (or bias), zero-padded to ``widest`` classes, concatenated
    along the classes: one constant fully connected layer computes all tasks' logits.

    A head picked per task would be a computed weight, which pnnx cannot give ncnn in the
    right shape (it reads the first axis of a 2-D tensor as the batch); computing T heads
    costs T x a head, little next to the backbone. Each head is stored once, unpadded; the
    padding and concatenation are on initializers, which converters fold.
    """
    parts = []
    for k, value in enumerate(per_task):
        stored = b.init(f"task{k + 1}/{name}", value)
        short = widest - value.shape[0]
        if short:
            pads = [0] * value.dim() * 2
            pads[value.dim()] = short  # after the last class, along the first axis
            stored = b.node("Pad", [stored, b.const(f"pad/{'x'.join(map(str, pads))}", np.array(pads, np.int64))],
                            [f"padded{k + 1}/{name}"], "")[0]
        parts.append(stored)
    return b.node("Concat", parts, [f"all/{name}"], "", axis=0)[0]


def _gemm_as_matmul(nodes: list[onnx.NodeProto], computed: set[str]) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """Every ``Gemm(A, W, C, transB=1)`` whose ``W`` is computed per task (masked or picked)
    as ``MatMul(A, W^T) + C``: ncnn has no fully connected layer with a computed weight
    (pnnx leaves ``F.linear``), but has MatMul. Returns the nodes and ``key -> name of W^T``."""
    out: list[onnx.NodeProto] = []
    transposed: dict[str, str] = {}
    for node in nodes:
        attrs = {a.name: (a.f if a.type == onnx.AttributeProto.FLOAT else a.i) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in computed or not plain:
            out.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed[weight] = f"{weight}/t"
            weight = transposed[weight]
        product = f"{node.output[0]}/product" if len(node.input) > 2 and node.input[2] else node.output[0]
        out.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product]))
        if product != node.output[0]:
            out.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
    return out, transposed


def _conv_as_matmul(nodes: list[onnx.NodeProto], owners: dict[str, torch.Tensor], shapes: dict[str, list[int]],
                    ) -> tuple[list[onnx.NodeProto], dict[str, str], dict[str, list[int]], dict[str, np.ndarray]]:
    """Every 2-D ``Conv`` of group 1 whose weight is masked per task (``owners``) rewritten
    so that no ``Conv`` weight is computed (onnx2tf drops the computation, see the module
    docstring). Usually as patches and a ``MatMul``:

        patches = Conv(x, one-hot kernel, group=I)             # [N, I*kh*kw, H', W'], constant
        y = Transpose(MatMul(Transpose(patches), W_cols) + b)   # NHWC between the transposes

    The one-hot kernel puts input channel ``i``'s tap ``(u, v)`` into channel
    ``i*kh*kw + u*kw + v``: the order of ``W.reshape(O, -1)``'s columns. A 1x1 convolution of
    stride 1 without padding needs no patches.

    onnx2tf guesses the layout of the NCHW tensor the last ``Transpose`` makes from its shape
    and guesses wrong when channels, height and width are equal (``[N, 8, 8, 8]``: top-1 fell
    to chance on the tiny test model). Such a convolution (``shapes``: inferred output shapes),
    and every grouped or depthwise one (cheap, and patches would need 5-D tensors), is
    instead one constant ``Conv`` per owner j, ``sum_j uses_j x Conv(x, W * (owner == j))``
    with ``uses_j = 1`` if the task uses owner j's weights: T times the work, so only there.

    Returns the nodes, ``key -> name of the [I*kh*kw, O] weight``, ``key -> owners`` of the
    per-owner convolutions (their weights are the names ``<key>/owner<j>``, the task's use
    ``task/uses_owner<j>``), and the constants to add (one ``kh*kw`` one-hot block per kernel
    size, tiled over the channels by ``Tile`` on initializers: the file stays its size).
    """
    out: list[onnx.NodeProto] = []
    columns: dict[str, str] = {}
    by_owner: dict[str, list[int]] = {}
    constants: dict[str, np.ndarray] = {}
    tiled: set[str] = set()
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        owner = owners.get(node.input[1]) if node.op_type == "Conv" else None
        if owner is None:
            out.append(node)
            continue
        key, y, stem = node.input[1], node.output[0], f"{node.output[0]}/patch"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        produced = shapes.get(y, [])
        present = [j for j in range(1, int(owner.max()) + 1) if bool((owner == j).any())]
        ambiguous = len(produced) == 4 and produced[1] == produced[2] == produced[3]  # to onnx2tf
        if present and (ambiguous or owner.dim() != 4 or attrs.get("group", 1) != 1):
            by_owner[key] = present
            total = ""
            for j in present:
                term = f"{y}/owner{j}"
                conv = onnx.NodeProto()
                conv.CopyFrom(node)
                conv.input[:] = [node.input[0], f"{key}/owner{j}"]
                conv.output[:] = [f"{term}/all"]
                out.append(conv)
                out.append(onnx.helper.make_node("Mul", [f"{term}/all", f"task/uses_owner{j}"], [term]))
                if total:
                    out.append(onnx.helper.make_node("Add", [total, term], [f"{term}/sum"]))
                    term = f"{term}/sum"
                total = term
            if bias:  # [O] -> [O, 1, 1], along NCHW's channels
                along = [owner.shape[0]] + [1] * (owner.dim() - 2)
                column = "shape/" + "x".join(map(str, along))
                constants[column] = np.array(along, dtype=np.int64)
                out.append(onnx.helper.make_node("Reshape", [bias, column], [f"{y}/bias"]))
                out.append(onnx.helper.make_node("Add", [total, f"{y}/bias"], [y]))
            else:
                out.append(onnx.helper.make_node("Identity", [total], [y]))
            continue
        if owner.dim() != 4 or attrs.get("group", 1) != 1:  # owned by no task: a zero weight, left as it is
            out.append(node)
            continue
        channels, kh, kw = owner.shape[1:]
        columns[key] = f"{key}/columns"
        window = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
        trivial = kh == kw == 1 and set(window.get("strides", [1])) == {1} and not any(window.get("pads", [0])) \
            and window.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")
        patches = node.input[0]
        if not trivial:
            taps, name = f"patches/{kh}x{kw}", f"patches/{channels}x{kh}x{kw}"
            if taps not in constants:  # one channel's kh*kw one-hot taps, tiled over the channels below
                constants[taps] = np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw)
            if name not in tiled:  # initializers only: converters fold it
                tiled.add(name)
                repeats = f"{name}/repeats"
                constants[repeats] = np.array([channels, 1, 1, 1], dtype=np.int64)
                out.append(onnx.helper.make_node("Tile", [taps, repeats], [name]))
            patches = f"{stem}es"
            out.append(onnx.helper.make_node("Conv", [node.input[0], name], [patches], kernel_shape=[kh, kw],
                                             group=channels, **window))
        out.append(onnx.helper.make_node("Transpose", [patches], [f"{stem}/nhwc"], perm=[0, 2, 3, 1]))
        product = f"{stem}/product"
        out.append(onnx.helper.make_node("MatMul", [f"{stem}/nhwc", columns[key]], [product]))
        if bias:  # the bias [O] broadcasts along NHWC's last axis
            out.append(onnx.helper.make_node("Add", [product, bias], [f"{stem}/biased"]))
            product = f"{stem}/biased"
        out.append(onnx.helper.make_node("Transpose", [product], [y], perm=[0, 3, 1, 2]))
    return out, columns, by_owner, constants


def _output_shapes(body: onnx.GraphProto, model: PackNet, opset: int) -> dict[str, list[int]]:
    """The shape of every tensor of the network at batch 1 (onnx shape inference; the
    state-dict tensors given as inputs of their stored shapes). Empty where inference fails:
    then every masked convolution takes the patch form."""
    names = {x for n in body.node for x in n.input}
    state = {k: _tensor(model, 1, k) for k in names if k in model.shared or k in model.task_tensors[0]}
    size = [1, 3, model.image_size, model.image_size]
    inputs = [onnx.helper.make_tensor_value_info("input", TensorProto.FLOAT, size)]
    inputs += [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.numpy().dtype),
                                                  list(v.shape)) for k, v in state.items()]
    graph = onnx.helper.make_graph(list(body.node), "shapes", inputs, list(body.output))
    try:
        inferred = onnx.shape_inference.infer_shapes(
            onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]))
    except Exception:  # noqa: BLE001 -- inference is an optimization of the layout, never a requirement
        return {}
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}


def _fold_batch_norm(body: onnx.GraphProto, keys: list[str], model: PackNet,
                     ) -> tuple[list[onnx.NodeProto], dict[str, torch.Tensor], dict[str, tuple[list, bool]]]:
    """The body's nodes with every ``BatchNormalization`` removed.

    A batch norm right after a convolution with a prunable weight (shared norms) is folded
    into that weight and a new bias; any other becomes ``Mul``/``Add`` with its scale and
    shift. Returns the nodes, the folded weights by key, and the new tensors
    ``name -> (one value per task, or a single one; per_task)``.
    """
    producers, consumers, graph_outputs = graph_links(body)
    folded: dict[str, torch.Tensor] = {}
    biases: dict[str, tuple[list, bool]] = {}
    drop: set[int] = set()
    rewired: dict[int, onnx.NodeProto] = {}
    extra: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(body.node):
        if node.op_type != "BatchNormalization":
            continue
        x, gamma, beta, mean, var = node.input[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        per_task = [_norm_terms(model, k, gamma, beta, mean, var, eps) for k in range(1, len(model.tasks) + 1)]
        conv = producers.get(x)
        shareable = not model.per_task_norm
        if (shareable and conv is not None and conv.op_type == "Conv" and conv.input[1] in model.owners
                and consumers.get(x) == 1 and x not in graph_outputs and conv.input[1] not in folded):
            scale, shift = per_task[0]
            weight = model.shared[conv.input[1]].double()
            folded[conv.input[1]] = (weight * scale.view(-1, *([1] * (weight.dim() - 1)))).float()
            if len(conv.input) > 2 and conv.input[2]:
                shift = shift + _tensor(model, 1, conv.input[2]).double() * scale
            bias = f"folded/{conv.input[1]}/bias"
            biases[bias] = ([shift.float()], False)
            new = onnx.NodeProto()
            new.CopyFrom(conv)
            del new.input[:]
            new.input.extend([conv.input[0], conv.input[1], bias])
            del new.output[:]
            new.output.append(node.output[0])
            rewired[id(conv)] = new
            drop.add(i)
            continue
        channels = per_task[0][0].numel()
        scale_name, shift_name = f"norm/{gamma}/scale", f"norm/{gamma}/shift"
        biases[scale_name] = ([s.view(1, channels, 1, 1).float() for s, _ in per_task], model.per_task_norm)
        biases[shift_name] = ([t.view(1, channels, 1, 1).float() for _, t in per_task], model.per_task_norm)
        mid = f"{node.output[0]}/scaled"
        extra[i] = [onnx.helper.make_node("Mul", [x, scale_name], [mid]),
                    onnx.helper.make_node("Add", [mid, shift_name], [node.output[0]])]
        drop.add(i)
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(body.node):
        if i in extra:
            nodes.extend(extra[i])
        elif i not in drop:
            nodes.append(rewired.get(id(node), node))
    return nodes, folded, biases


def _tensor(model: PackNet, k: int, key: str) -> torch.Tensor:
    own = model.task_tensors[k - 1]
    return own[key] if key in own else model.shared[key]


def _norm_terms(model: PackNet, k: int, gamma: str, beta: str, mean: str, var: str, eps: float,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Task k's batch norm as ``y = x * scale + shift`` (float64)."""
    g, bt, m, v = (_tensor(model, k, key).double() for key in (gamma, beta, mean, var))
    scale = g / torch.sqrt(v + eps)
    return scale, bt - m * scale
