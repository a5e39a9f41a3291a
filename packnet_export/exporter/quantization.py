"""int8 and fp16 versions of the exported graphs.

**int8** is onnxruntime's static quantization in QDQ form (``quantize_static``): weights
int8, per output channel, symmetric (zero point 0, so a pruned or free weight, which is
0.0, is exactly 0 in int8 too); activations uint8, per tensor, their ranges calibrated on a
task's own training images (MinMax). uint8 activations with int8 weights are what
onnxruntime's x86 kernels (VNNI, AMX) run fastest. The logits stay float32 (the head's
output is not quantized: 256 levels would turn close logits into ties).

Batch norm is folded into the convolution before quantizing (``fold_batch_norm``), as a
deployment would: the quantizer would otherwise quantize the batch-norm node's tensors and
leave a float node between each quantized convolution and its activation. Folding keeps
zeros zero (a weight is multiplied by its channel's factor).

What PackNet needs on top, written here:

* the sparse int8 graph: the QDQ graph's int8 weights stored as a 1-bit occupancy map and
  1-byte values (``sparse.sparse_graph`` decodes them; onnxruntime folds the decode at load);
* the multi-task int8 graph (``multitask_int8``): one int8 tensor per
  layer shared by every task, under one per-channel scale computed over the weights any
  task uses (``shared_weight_scales``), passed to the quantizer as ``TensorQuantOverrides``
  so that each task's int8 weights are exactly the shared values under its mask.

**fp16** is onnxruntime's ``convert_float_to_float16``: weights and computation in
float16, with casts at the inputs and outputs (``keep_io_types``) so that clients keep
feeding float32, unless ``fp16_io``. onnxruntime's CPU provider has few float16 kernels and
inserts casts around the others: fp16 files halve storage everywhere, but run faster only
where the hardware computes in float16 (GPUs, NPUs, recent ARM cores).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .calibration import calibration_reader
from .writer import Streamed, as_array, graph_links

QUANTIZED_SUFFIX = "_quantized"
"""onnxruntime's quantizer names the int8 copy of initializer ``W`` ``W_quantized``."""


# ----------------------------------------------------------------- fp32 graphs with folded batch norm
def fold_batch_norm(graph: onnx.GraphProto, tensors: dict[str, np.ndarray],
                    factors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Fold every ``BatchNormalization`` that directly follows a ``Conv`` of ``graph`` into
    it (``graph`` is edited, the tensors are returned). ``factors``, when given, receives
    each folded weight's per-channel factor ``g / sqrt(v + eps)`` (float64).

    The layer keeps its weight's name (now the folded weight) and takes the batch norm's
    bias name as its bias: initializer names stay state-dict keys, which the sparse and
    multi-task int8 graphs rely on. ``w' = w * g / sqrt(v + eps)`` per output channel, so a
    zero weight stays zero.
    """
    out = dict(tensors)
    producers, consumers, graph_outputs = graph_links(graph)
    remove = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.input[0] not in producers:
            continue
        layer = producers[bn.input[0]]
        if layer.op_type != "Conv" or consumers.get(bn.input[0]) != 1 or bn.input[0] in graph_outputs:
            continue
        gamma, beta, mean, var = (tensors[k].astype(np.float64) for k in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        weight = layer.input[1]
        if factors is not None:
            factors[weight] = factor
        w = tensors[weight]
        out[weight] = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        bias = tensors[layer.input[2]].astype(np.float64) if len(layer.input) > 2 else 0.0
        out[bn.input[2]] = ((bias - mean) * factor + beta).astype(np.float32)
        inputs = list(layer.input[:2]) + [bn.input[2]]
        del layer.input[:]
        layer.input.extend(inputs)
        layer.output[0] = bn.output[0]
        remove.append(bn)
    for bn in remove:
        graph.node.remove(bn)
    used = {x for n in graph.node for x in n.input}
    return {k: v for k, v in out.items() if k in used}


def materialize(value) -> np.ndarray:
    """A tensor, array or :class:`Streamed` as one numpy array."""
    return value.materialize() if isinstance(value, Streamed) else as_array(value)


def float_model(skeleton: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``skeleton`` (not modified) with ``tensors`` as its initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(skeleton)
    out.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a), k) for k, a in tensors.items())
    return out


# ----------------------------------------------------------------- int8
@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs advice (pre-processing, opset) at warning level on every call."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_int8(fp32: onnx.ModelProto, images: np.ndarray, weight_scales: dict[str, np.ndarray] | None = None,
                  activation_type: str = "uint8") -> onnx.ModelProto:
    """``fp32`` (batch norm folded, initializers inside) quantized to QDQ int8 by onnxruntime,
    its activations (``activation_type`` uint8 or int8, asymmetric) calibrated on ``images``.

    ``weight_scales``: initializer name -> per-channel scale that the quantizer must use
    (``TensorQuantOverrides``, zero point 0) instead of computing one from the tensor.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # per channel along axis 0: conv weights [out, in, kh, kw], linear weights [out, in] (Gemm transB=1)
    overrides = {name: [{"scale": np.float32(s), "zero_point": np.int8(0), **({"axis": 0} if c == 0 else {})}
                        for c, s in enumerate(scales)]
                 for name, scales in (weight_scales or {}).items()}
    options = {
        "WeightSymmetric": True,
        "ActivationSymmetric": False,
        # the logits stay float32: quantized to 256 levels, close logits would tie
        "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
        # keep the weight scales as computed (or given): shared scales must stay shared
        "QDQDisableWeightAdjustForInt32Bias": True,
    }
    if overrides:
        options["TensorQuantOverrides"] = overrides
    with tempfile.TemporaryDirectory(prefix="packnet-int8.") as tmp, _quiet_quantizer():
        target = Path(tmp) / "int8.onnx"
        # quantize_static moves the tensors of a ModelProto argument to external data in place
        quantize_static(copy.deepcopy(fp32), str(target), calibration_reader(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=options)
        quantized = onnx.load(str(target))
    drop_zero_points(quantized)
    for key in (weight_scales or {}):
        got = numpy_helper.to_array(_initializer(quantized.graph, key + "_scale"))
        if not np.array_equal(got.astype(np.float32), weight_scales[key].astype(np.float32)):
            raise RuntimeError(f"onnxruntime's quantizer did not keep the shared scale of {key}")
    return quantized


def drop_zero_points(model: onnx.ModelProto) -> None:
    """Remove the all-zero zero points of the int8 weights and int32 biases that feed a ``Conv``.

    A ``DequantizeLinear`` without zero point reads 0; the quantizer writes one explicit zero
    per channel (4 bytes per channel for a bias), which on a small model was a few percent
    of the file. onnxruntime still fuses such a group into ``QLinearConv`` (it does not for
    ``Gemm``, whose zero points therefore stay).
    """
    graph = model.graph
    stored = {i.name: i for i in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, set()).add(node.op_type)
    dropped = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or consumers.get(node.output[0]) != {"Conv"}:
            continue
        value, zero = stored.get(node.input[0]), stored.get(node.input[2])
        if value is None or zero is None or value.data_type not in (TensorProto.INT8, TensorProto.INT32):
            continue
        if not numpy_helper.to_array(zero).any():
            dropped.add(node.input[2])
            del node.input[2]
    still = {x for node in graph.node for x in node.input}
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in still]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto:
    for init in graph.initializer:
        if init.name == name:
            return init
    raise KeyError(name)


def int8_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """State-dict key -> int8 weight of a QDQ graph (read from its initializers)."""
    return {i.name[:-len(QUANTIZED_SUFFIX)]: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == TensorProto.INT8 and i.name.endswith(QUANTIZED_SUFFIX)}


def symmetric_scales(weights: list[np.ndarray]) -> np.ndarray:
    """Per-output-channel scale ``max |w| / 127`` over every array of ``weights`` (same shape).

    The same formula onnxruntime's quantizer uses for symmetric int8 weights (range
    -127..127); a channel of zeros gets scale 1, as in onnxruntime.
    """
    absmax = np.zeros(weights[0].shape[0], dtype=np.float32)
    for w in weights:
        absmax = np.maximum(absmax, np.abs(w.reshape(w.shape[0], -1)).max(axis=1))
    scale = (absmax.astype(np.float32) * 2) / np.float32(254)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)


# ----------------------------------------------------------------- sparse int8
@dataclass
class SparseInt8:
    skeleton: onnx.ModelProto
    """The QDQ graph without its initializers, with the decode nodes."""
    tensors: list[tuple[str, np.ndarray]]
    nonzero: int
    weights: int
    other_bytes: int
    """Bytes of everything stored besides the int8 weights' values and occupancy (head, scales, biases)."""


def sparse_int8(quantized: onnx.ModelProto, prunable: list[str]) -> SparseInt8:
    """The QDQ graph with the int8 weights of ``prunable`` keys stored sparsely.

    Each weight becomes a 1-bit occupancy map and its nonzero int8 values (``sparse``'s
    encoding with 1-byte values); the decode yields the same int8 tensor the
    ``DequantizeLinear`` reads, and onnxruntime folds it at load, before fusing the QDQ
    groups into its int8 kernels.
    """
    from . import sparse

    missing = [k for k in prunable if k + QUANTIZED_SUFFIX not in {i.name for i in quantized.graph.initializer}]
    if missing:
        raise RuntimeError(f"the quantized graph has no int8 weight {missing[0]}")
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(quantized)
    # short names (q0, q1, ...): the quantizer's (``features.18.weight_quantized``) would weigh
    # more than the 5% size allowance on a small model
    short = _shorten(skeleton.graph)
    names = [short[k + QUANTIZED_SUFFIX] for k in prunable]
    stored = {i.name: numpy_helper.to_array(i) for i in skeleton.graph.initializer}
    del skeleton.graph.initializer[:]
    chunks = sparse.plan_chunks({n: stored[n].shape for n in names})
    skeleton = sparse.sparse_graph(skeleton, chunks)
    tensors: list[tuple[str, np.ndarray]] = []
    nonzero = 0
    for i, chunk in enumerate(chunks):
        flat = np.concatenate([stored[layer.key].reshape(-1) for layer in chunk.layers])
        occupied = flat != 0
        nonzero += int(occupied.sum())
        tensors.append((f"c{i}.bits", np.packbits(occupied, bitorder="little").reshape(-1, 1)))
        tensors.append((f"c{i}.vals", np.concatenate([np.zeros(1, np.int8), flat[occupied]])))
    others = [(n, a) for n, a in stored.items() if n not in set(names)]
    tensors += others
    weights = sum(stored[n].size for n in names)
    return SparseInt8(skeleton, tensors, nonzero, weights, sum(a.nbytes for _, a in others))


def _shorten(graph: onnx.GraphProto) -> dict[str, str]:
    """Rename every initializer and intermediate value of ``graph`` ``q<n>`` (inputs and
    outputs keep their names); returns the mapping."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        return name if name in keep else short.setdefault(name, f"q{len(short)}")

    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
    del graph.value_info[:]
    return short


# ----------------------------------------------------------------- fp16
def to_fp16(model: onnx.ModelProto, fp16_io: bool = False) -> onnx.ModelProto:
    """``model`` in float16 (a copy; onnxruntime's converter edits its argument in place).

    Inputs and outputs stay float32 (casts inside the graph) unless ``fp16_io``.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet_quantizer():
        return convert_float_to_float16(copy.deepcopy(model), keep_io_types=not fp16_io, disable_shape_infer=True)


def split_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """The graph without its top-level initializers, and those as ``(name, array)`` for
    ``export.write_onnx`` (atomic, external data for large models)."""
    tensors = [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer]
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    del skeleton.graph.initializer[:]
    return skeleton, tensors


def precision_metadata(precision: str, calibration: dict | None = None, fp16_io: bool = False,
                       activation_type: str = "uint8") -> dict[str, str]:
    """``packnet.precision`` and how the file was quantized (JSON), for readers and reports."""
    import json

    meta = {"packnet.precision": precision}
    if precision == "int8":
        meta["packnet.quantization"] = json.dumps({
            "format": "QDQ", "weights": "int8 per output channel, symmetric (zero point 0)",
            "activations": f"{activation_type} per tensor, asymmetric, MinMax calibration", "logits": "float32",
            "batch_norm": "folded into the convolutions", **(calibration or {})})
    elif precision == "fp16":
        meta["packnet.io_type"] = "float16" if fp16_io else "float32"
    return meta


def io_dtype(model: onnx.ModelProto) -> np.dtype:
    """The numpy type a client feeds to ``input``."""
    elem = model.graph.input[0].type.tensor_type.elem_type
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
