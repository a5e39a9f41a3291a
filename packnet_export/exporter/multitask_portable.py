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
* **float32 ``task_index`` and ``num_classes``** (int64 in the other layouts): ncnn has float
  tensors only, and pnnx turns a Cast from or to int64 into a ``Tensor.to`` layer that ncnn
  cannot load.
* **the task as a one-hot row**: ``onehot = Clip(1 - 2 |task_index - [0..T-1]|, 0, 1)``,
  and everything per task (heads, per-task norms, class counts) is ``MatMul(onehot, stacked)``:
  exact, since the row holds one 1 and zeros.
* **the mask with Sub/Clip/Mul**: task k (1-based) uses a weight iff ``owner <= k``, i.e.
  ``Clip(k + 1 - owner, 0, 1)`` is 1, else 0 (owners are integers). The decode of the stored
  values and owners is on initializers only, as in the other layouts, so converters fold it;
  the masking depends on ``task_index`` and runs on every call (like ``runtime-mask``).
* **padding without Where**: ``logits + Log(Clip(num_classes - column, 0, 1))`` adds 0 to the
  task's columns and ``-inf`` to the others.
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

LAYOUT = "portable"


def task_index_type(layout: str) -> int:
    """The element type of the ``task_index`` input and the ``num_classes`` output: float32
    in this layout, int64 in the others.

    ncnn has float tensors only and no Cast layer: pnnx turns a Cast from or to int64 into
    ``Tensor.to``, which ``ncnn.Net`` refuses to load. A float32 holds 0..T-1 exactly.
    """
    return TensorProto.FLOAT if layout == LAYOUT else TensorProto.INT64


def build(b, body: onnx.GraphProto, keys: list[str], model: PackNet, widest: int) -> None:
    """Add to the multi-task builder ``b`` the nodes and tensors that compute ``logits`` and
    ``num_classes`` from ``input`` and ``task_index`` (``body``: the network's graph)."""
    from .multitask import _copy_body, _decode_weight  # the layouts share the decode and the body copy

    num_tasks = len(model.tasks)
    head_w, head_b = models.head_keys(model.arch)
    nodes, folded, biases = _fold_batch_norm(body, keys, model)
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

    inputs: dict[str, str] = {}
    for j, key in enumerate(keys):
        if key not in used:  # batch-norm tensors and conv biases folded away
            continue
        if key in model.owners:
            weight = folded.get(key, model.shared[key])
            _decode_weight(b, j, key, weight, model.owners[key], num_tasks)
            b.node("Cast", [f"owner/{key}"], [f"ownerf/{key}"], "", to=TensorProto.FLOAT)
            b.node("Sub", ["task/k_plus_1", f"ownerf/{key}"], [f"margin/{key}"], f"margin/{key}")
            b.node("Clip", [f"margin/{key}", zero, one], [f"uses/{key}"], f"uses/{key}")
            inputs[key] = b.node("Mul", [f"dense/{key}", f"uses/{key}"], [f"masked/{key}"], f"mask/{key}")[0]
        elif key in (head_w, head_b):
            inputs[key] = _pick(b, key, [t[key] for t in model.task_tensors], widest)
        elif model.per_task_norm:
            inputs[key] = _pick(b, key, [_tensor(model, k, key) for k in range(1, num_tasks + 1)])
        else:
            inputs[key] = b.init(f"shared/{key}", model.shared[key])
    for name, (value, per_task) in biases.items():
        inputs[name] = _pick(b, name, value) if per_task else b.init(name, value[0])
    missing = sorted(x for x in used if (x in biases or x in keys) and x not in inputs)
    if missing:
        raise PackNetError(f"the portable graph lost {missing[0]!r} while folding batch norm")
    raw = _copy_body(body, "net/", inputs, b.nodes)

    # -inf after the task's classes, NaN everywhere for an index that names no task
    columns = b.const("logits/columns", np.arange(widest, dtype=np.float32).reshape(1, widest))
    b.node("Sub", ["task/classes_11", columns], ["logits/room"], "logits/room")
    b.node("Clip", ["logits/room", zero, one], ["logits/keep"], "logits/keep")
    b.node("Log", ["logits/keep"], ["logits/padding"], "logits/padding")
    b.node("Sub", ["task/valid_11", one], ["task/invalid"], "task/invalid")
    b.node("Sqrt", ["task/invalid"], ["task/nan_if_invalid"], "task/nan_if_invalid")
    b.node("Add", [raw, "logits/padding"], ["logits/padded"], "logits/padded")
    b.node("Add", ["logits/padded", "task/nan_if_invalid"], ["logits"], "logits")
    # a float32 scalar like task_index: pnnx turns a Cast or a Reshape to [] into layers ncnn lacks
    b.node("ReduceSum", ["task/classes_11"], ["num_classes"], "num_classes", keepdims=0)


def _pick(b, name: str, per_task: list, widest: int | None = None) -> str:
    """One task's copy of ``name``: ``MatMul(onehot, stacked)`` reshaped to its shape.

    Each task's tensor is stored once as it is; the stack (heads zero-padded to ``widest``
    classes first) is built with Pad/Reshape/Concat on initializers, which converters fold,
    so padding costs no bytes in the file.
    """
    shape = list(per_task[0].shape)
    if widest is not None:
        shape[0] = widest
    flat = b.const(f"shape/1x{int(np.prod(shape))}", np.array([1, int(np.prod(shape))], dtype=np.int64))
    rows = []
    for k, value in enumerate(per_task):
        stored = b.init(f"task{k + 1}/{name}", value)
        short = (widest or value.shape[0]) - value.shape[0]
        if short:
            pads = [0] * value.dim() * 2
            pads[value.dim()] = short  # after the last class, along the first axis
            stored = b.node("Pad", [stored, b.const(f"pad/{'x'.join(map(str, pads))}", np.array(pads, np.int64))],
                            [f"padded{k + 1}/{name}"], "")[0]
        rows.append(b.node("Reshape", [stored, flat], [f"row{k + 1}/{name}"], "")[0])
    b.node("Concat", rows, [f"stacked/{name}"], "", axis=0)
    b.node("MatMul", ["task/onehot", f"stacked/{name}"], [f"picked/{name}"], f"pick/{name}")
    target = b.const("shape/" + "x".join(map(str, shape)) if shape else "shape/scalar", np.array(shape, np.int64))
    return b.node("Reshape", [f"picked/{name}", target], [f"task/{name}"], f"task/{name}")[0]


def _fold_batch_norm(body: onnx.GraphProto, keys: list[str], model: PackNet,
                     ) -> tuple[list[onnx.NodeProto], dict[str, torch.Tensor], dict[str, tuple[list, bool]]]:
    """The body's nodes with every ``BatchNormalization`` removed.

    A batch norm right after a convolution with a prunable weight (shared norms) is folded
    into that weight and a new bias; any other becomes ``Mul``/``Add`` with its scale and
    shift. Returns the nodes, the folded weights by key, and the new tensors
    ``name -> (one value per task, or a single one; per_task)``.
    """
    producers = {o: n for n in body.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in body.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    graph_outputs = {o.name for o in body.output}
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
