"""Sparse per-task graphs: store only the weights a task uses, decode them at session load.

A task of a PackNet model computes with a fraction of the backbone (the weights owned by it
and by earlier tasks); the rest reads as zero. The sparse format stores, for each group
("chunk") of prunable layers laid end to end:

* ``bits``: a bit-packed occupancy map, one bit per weight (1 = the task uses it and it is
  nonzero), little bit order inside each byte, shaped ``[bytes, 1]``;
* ``vals``: the used weights in row-major order, after one leading zero.

and decodes them inside the graph with operators that onnxruntime evaluates once, when the
session is created (constant folding; every input is an initializer)::

    occ = Reshape(Mod(Div(Cast<int32>(bits), [1, 2, ..., 128]), 2), [-1])[:n]
    weight = Reshape(Gather(vals, CumSum(occ) * occ), shape)

``CumSum(occ) * occ`` is the 1-based position of each used weight in ``vals`` and 0 (the
leading zero) for the others. After folding, the session holds ordinary dense weights, so
batch norm is fused into the convolutions and the graph runs as fast as the dense one. A
decode written with NonZero/ScatterND instead is not folded and runs on every call.

Layers are grouped into chunks of at most ``CHUNK_ELEMENTS`` weights so that small layers
share one decode (a few hundred bytes of graph each would otherwise dominate a small model)
while the transient memory of folding stays bounded for large ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

CHUNK_ELEMENTS = 1 << 22
"""Largest number of weights decoded by one chain of nodes (a bigger layer gets its own)."""


@dataclass
class SparseLayer:
    key: str
    shape: tuple[int, ...]


@dataclass
class Chunk:
    """Consecutive prunable layers decoded together."""

    layers: list[SparseLayer]

    @property
    def size(self) -> int:
        return sum(int(np.prod(layer.shape)) for layer in self.layers)


def plan_chunks(shapes: dict[str, tuple[int, ...]], limit: int = CHUNK_ELEMENTS) -> list[Chunk]:
    """Group layers, in order, into chunks of at most ``limit`` weights."""
    chunks: list[Chunk] = []
    current: list[SparseLayer] = []
    size = 0
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        if current and size + n > limit:
            chunks.append(Chunk(current))
            current, size = [], 0
        current.append(SparseLayer(key, tuple(shape)))
        size += n
    if current:
        chunks.append(Chunk(current))
    return chunks


def encode(weights: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(packed occupancy ``uint8 [bytes, 1]``, ``float32 [1 + nonzero]`` values) of flattened weights.

    ``weights`` are already masked to the task's view: a weight is stored when it is nonzero.
    """
    flat = torch.cat([w.detach().reshape(-1).float() for w in weights]).numpy()
    occupied = flat != 0
    bits = np.packbits(occupied, bitorder="little").reshape(-1, 1)
    values = np.concatenate([np.zeros(1, np.float32), flat[occupied].astype(np.float32)])
    return bits, values


def sparse_graph(dense: onnx.ModelProto, chunks: list[Chunk]) -> onnx.ModelProto:
    """The dense graph skeleton (no initializers) with decode nodes producing the prunable weights.

    The returned model expects initializers ``c<i>.bits`` and ``c<i>.vals`` for every chunk
    (see :func:`chunk_tensors`) plus the dense graph's other initializers.
    """
    model = onnx.ModelProto()
    model.CopyFrom(dense)
    graph = model.graph
    consts = [
        numpy_helper.from_array(np.array([[1, 2, 4, 8, 16, 32, 64, 128]], np.int32), "sp.pow2"),
        numpy_helper.from_array(np.array(2, np.int32), "sp.two"),
        numpy_helper.from_array(np.array([-1], np.int64), "sp.flat"),
        numpy_helper.from_array(np.array([0], np.int64), "sp.zero"),
        numpy_helper.from_array(np.array(0, np.int32), "sp.axis"),
    ]
    nodes = []
    for i, chunk in enumerate(chunks):
        p = f"c{i}."
        n = chunk.size
        nodes += [
            helper.make_node("Cast", [p + "bits"], [p + "u"], to=TensorProto.INT32),
            helper.make_node("Div", [p + "u", "sp.pow2"], [p + "d"]),
            helper.make_node("Mod", [p + "d", "sp.two"], [p + "m"]),
            helper.make_node("Reshape", [p + "m", "sp.flat"], [p + "r"]),
        ]
        occ = p + "r"
        if n % 8:
            consts.append(numpy_helper.from_array(np.array([n], np.int64), p + "n"))
            nodes.append(helper.make_node("Slice", [occ, "sp.zero", p + "n"], [p + "o"]))
            occ = p + "o"
        nodes += [
            helper.make_node("CumSum", [occ, "sp.axis"], [p + "c"]),
            helper.make_node("Mul", [p + "c", occ], [p + "i"]),
            helper.make_node("Gather", [p + "vals", p + "i"], [p + "w"]),
        ]
        flats = [p + "w"]
        if len(chunk.layers) > 1:
            sizes = [int(np.prod(layer.shape)) for layer in chunk.layers]
            consts.append(numpy_helper.from_array(np.array(sizes, np.int64), p + "split"))
            flats = [f"{p}w{j}" for j in range(len(chunk.layers))]
            nodes.append(helper.make_node("Split", [p + "w", p + "split"], flats, axis=0))
        for j, (layer, flat) in enumerate(zip(chunk.layers, flats)):
            shape_name = f"{p}s{j}"
            consts.append(numpy_helper.from_array(np.array(layer.shape, np.int64), shape_name))
            nodes.append(helper.make_node("Reshape", [flat, shape_name], [layer.key]))
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    graph.initializer.extend(consts)
    return model


def chunk_tensors(chunks: list[Chunk], weight) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of each chunk's bits and values; ``weight(key)`` gives a masked weight.

    A generator, so only one chunk's weights are in memory at a time.
    """
    for i, chunk in enumerate(chunks):
        bits, values = encode([weight(layer.key) for layer in chunk.layers])
        yield f"c{i}.bits", bits
        yield f"c{i}.vals", values


def size_bound(nonzero: int, weights: int, head_bytes: int, slack: float = 1.05) -> float:
    """The size target of a sparse file: ``slack`` x (nonzero x 4 B + 1 bit per weight + head)."""
    return slack * (nonzero * 4 + weights / 8 + head_bytes)
