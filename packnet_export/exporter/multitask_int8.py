"""The multi-task graph in int8: one int8 weight tensor per layer, shared by every task.

onnxruntime's quantizer works on one graph at a time; quantizing each task's dense graph on
its own would give each task its own weight scales, so the same stored weight would be a
different int8 value for each task and nothing could be shared. Here:

1. batch norm is folded into the convolutions (shared-norm models only: the folded weights
   are then the same for every task);
2. one scale per output channel and layer is computed over the weights *any* task uses
   (symmetric, ``max |w| / 127``) and imposed on the quantizer of every task
   (``TensorQuantOverrides``); each task's activations are calibrated on its own images;
3. the last task uses every weight whose owner is not 0, so its int8 weights are the shared
   tensor; every other task's int8 weights are checked to be exactly that tensor under its
   mask (a mismatch is a bug, never written);
4. the file stores the shared int8 values of the used weights (1 byte each) and the packed
   owner mask, decoded at load as in the float graph (``multitask._decode_weight``), and one
   ``If`` branch per task with that task's QDQ graph: its weights are
   ``Where(owner <= k, shared, 0)`` (folded at load), its activation scales, int32 biases
   and int8 head are its own (small initializers of the branch).

onnxruntime folds the masks and fuses each branch's QDQ groups into its int8 kernels at
load, as for a dense int8 graph. Only the ``branches`` layout exists in int8: the
``runtime-mask`` layout masks weights on every call, so they are never constants and no
QDQ group could be fused (every convolution would run dequantized, in float).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..checkpoint import PackNet
from ..errors import PackNetError
from . import multitask, quantization
from .calibration import CalibrationSet
from .quantization import QUANTIZED_SUFFIX
from .template import Template, task_tensor
from .writer import Streamed


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
        raise PackNetError(f"--multitask-layout {layout} has no int8 form{why}; use --multitask-layout "
                           f"{multitask.DEFAULT_LAYOUT} with --precision int8")
    if model.per_task_norm:
        raise PackNetError("the multitask int8 graph needs batch norm shared by all tasks (folded once into the "
                           "shared int8 weights); this checkpoint has per-task norm: export each task's dense or "
                           "sparse int8 file instead")


def build(model: PackNet, template: Template, calibration: dict[int, CalibrationSet], opset: int) -> Int8Multitask:
    """The int8 multi-task graph of ``model``; ``calibration[k]`` calibrates task k (1-based).

    ``template`` is the export's torch trace.
    """
    check_supported(model, multitask.DEFAULT_LAYOUT)
    num_tasks = len(model.tasks)
    prunable = [k for k in template.keys if k in model.owners]
    folded_skeleton = onnx.ModelProto()
    folded_skeleton.CopyFrom(template.model)
    folded = []  # per task: the fp32 tensors with batch norm folded in
    structure = None
    for k in range(1, num_tasks + 1):
        get = task_tensor(model, k)
        graph = onnx.GraphProto()
        graph.CopyFrom(template.model.graph)
        folded.append(quantization.fold_batch_norm(graph, {key: quantization.materialize(get(key))
                                                         for key in template.keys}))
        structure = structure or graph
    del folded_skeleton.graph.node[:]
    folded_skeleton.graph.node.extend(structure.node)
    # one scale per channel over every weight any task uses: the last task uses them all
    scales = {key: quantization.symmetric_scales([folded[-1][key]]) for key in prunable}
    quantized = []
    for k in range(1, num_tasks + 1):
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(folded_skeleton)
        skeleton.graph.output[0].type.tensor_type.shape.dim[1].dim_value = model.tasks[k - 1].num_classes
        quantized.append(quantization.quantize_int8(quantization.float_model(skeleton, folded[k - 1]),
                                                    calibration[k].images, weight_scales=scales))
    shared = quantization.int8_weights(quantized[-1])
    for k, q in enumerate(quantized, start=1):
        _check_shared(q, shared, model, prunable, k)
    return _assemble(model, quantized, shared, prunable, opset)


def _check_shared(q: onnx.ModelProto, shared: dict[str, np.ndarray], model: PackNet, prunable: list[str],
                  k: int) -> None:
    ours = quantization.int8_weights(q)
    for key in prunable:
        owner = model.owners[key].numpy()
        expected = np.where((owner > 0) & (owner <= k), shared[key], np.int8(0))
        if not np.array_equal(ours[key], expected):
            raise RuntimeError(f"task {k}'s int8 {key} is not the shared int8 tensor under its mask")


def _assemble(model: PackNet, quantized: list[onnx.ModelProto], shared: dict[str, np.ndarray],
              prunable: list[str], opset: int) -> Int8Multitask:
    b = multitask._Builder()
    num_tasks = len(model.tasks)
    widest = max(t.num_classes for t in model.tasks)
    first = {i.name: i for i in quantized[-1].graph.initializer}
    shared_names: dict[str, str] = {}  # the QDQ graph's scale / zero point names -> stored once
    scale_bytes = 0
    for j, key in enumerate(prunable):
        owner = model.owners[key]
        values = shared[key][owner.numpy() != 0]
        multitask._decode_weight(b, j, key, None, owner, num_tasks,
                                 values=Streamed(values.shape, np.dtype(np.int8), lambda v=values: iter([v])))
        for suffix in ("_scale", "_zero_point"):
            if key + suffix not in first:  # a conv's zero point of 0 is implicit (quantization.drop_zero_points)
                continue
            array = numpy_helper.to_array(first[key + suffix])
            shared_names[key + suffix] = b.init(f"s{j}{suffix[:2]}", array)
            scale_bytes += array.nbytes
    index = multitask._checked_task_index(b, num_tasks)
    counts = b.const("num_classes/all", np.array([t.num_classes for t in model.tasks], dtype=np.int64))
    b.node("Gather", [counts, index], ["num_classes"], name="num_classes")
    task_bytes = 0
    branches = []
    for k, q in enumerate(quantized, start=1):
        branch, stored = _branch(b, q, k, prunable, shared_names, model.tasks[k - 1].num_classes, widest)
        branches.append(branch)
        task_bytes += stored
    b.nodes.extend(_select(b, branches, index, 1, num_tasks, widest))
    graph = helper.make_graph(
        b.nodes, "packnet_multitask_int8",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, model.image_size, model.image_size]),
         helper.make_tensor_value_info("task_index", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widest]),
         helper.make_tensor_value_info("num_classes", TensorProto.INT64, [])],
    )
    opsets = {o.domain: o.version for o in quantized[-1].opset_import}
    opsets[""] = max(opsets.get("", opset), opset)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="packnet-export", doc_string=multitask._DOC)
    for key, value in multitask.multitask_metadata(model, multitask.DEFAULT_LAYOUT).items():
        proto.metadata_props.add(key=key, value=value)
    nonzero = sum(int((o != 0).sum()) for o in model.owners.values())
    mask = sum(-(-multitask.owner_bits(num_tasks) * o.numel() // 8) for o in model.owners.values())
    budget = {"nonzero_weights": nonzero, "weight_bytes": nonzero, "mask_bytes": mask, "task_bytes": task_bytes,
              "scale_bytes": scale_bytes, "total_bytes": nonzero + mask + task_bytes + scale_bytes}
    return Int8Multitask(proto, b.tensors, budget)


def _branch(b, q: onnx.ModelProto, k: int, prunable: list[str], shared_names: dict[str, str], classes: int,
            widest: int) -> tuple[onnx.GraphProto, int]:
    """Task k's QDQ graph as an If branch; returns it and the bytes of its own initializers."""
    prefix = f"t{k}/"
    nodes: list[onnx.NodeProto] = []
    limit = b.const(f"task{k}/owner_limit", np.array(k, dtype=np.int32))
    zero = b.const("mask/zero_int8", np.array(0, dtype=np.int8))
    inputs: dict[str, str] = {}
    for j, key in enumerate(prunable):
        b.node("LessOrEqual", [f"owner/{key}", limit], [f"{prefix}u{j}"], "", into=nodes)
        inputs[key + QUANTIZED_SUFFIX] = b.node("Where", [f"{prefix}u{j}", f"dense/{key}", zero], [f"{prefix}w{j}"],
                                                "", into=nodes)[0]
    inputs.update(shared_names)
    initializers = []
    for n, init in enumerate(i for i in q.graph.initializer if i.name not in inputs):
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = inputs[init.name] = f"{prefix}i{n}"
        initializers.append(copy)
    logits = multitask._copy_body(q.graph, prefix, inputs, nodes)
    out = multitask._pad_logits(b, logits, classes, widest, prefix, nodes)
    graph = multitask._as_graph(nodes, f"task{k}", out, widest)
    graph.initializer.extend(initializers)
    return graph, sum(len(i.raw_data) or numpy_helper.to_array(i).nbytes for i in initializers)


def _select(b, branches: list[onnx.GraphProto], index: str, lo: int, hi: int, widest: int) -> list[onnx.NodeProto]:
    """A balanced tree of If nodes on ``index`` (0-based) over ``branches[lo-1 .. hi-1]``."""
    out = "logits" if (lo, hi) == (1, len(branches)) else f"select/{lo}_{hi}/logits"
    if lo == hi:  # a single task: no choice to make; its branch's nodes and tensors join the main graph
        branch = branches[lo - 1]
        for init in branch.initializer:
            b.init(init.name, numpy_helper.to_array(init))
        return list(branch.node[:-1]) + [helper.make_node("Identity", [branch.node[-1].input[0]], [out])]
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


def metadata(calibration: dict) -> dict[str, str]:
    """How the shared int8 weights were made, for readers of the file."""
    return {"packnet.int8_sharing": json.dumps({
        "weights": "one int8 tensor per layer shared by every task, one per-channel scale over the weights any "
                   "task uses", "activations": "per task", **calibration})}
