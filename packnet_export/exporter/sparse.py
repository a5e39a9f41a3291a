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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .. import masks
from .template import ExportContext, rename_values, task_skeleton, task_tensor, tensor_bytes
from .writer import ExportedFile, Streamed, file_bytes, flat_pieces, pack_bits_stream, write_onnx

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
    The export streams the same encoding (:func:`encode_chunks`); this whole-array form is
    the reference it is tested against.
    """
    flat = torch.cat([w.detach().reshape(-1).float() for w in weights]).numpy()
    occupied = flat != 0
    bits = np.packbits(occupied, bitorder="little").reshape(-1, 1)
    values = np.concatenate([np.zeros(1, np.float32), flat[occupied].astype(np.float32)])
    return bits, values


@dataclass
class EncodedChunk:
    nonzero: int
    bits: Streamed
    """uint8 [ceil(size / 8), 1]: the packed occupancy map."""
    values: Streamed
    """float32 [1 + nonzero]: a leading zero, then the used weights in order."""


def encode_chunks(chunks: list[Chunk], sources: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  task: int) -> list[EncodedChunk]:
    """The encoding of :func:`encode` for task ``task``, computed a piece at a time.

    ``sources[key]`` is ``(weight, owner)``. A weight is stored when task ``task`` uses it
    and it is nonzero. Counting the stored weights is one cheap pass now; the bits and
    values are produced while the file is written, so no chunk is ever held whole.
    """

    def masked(chunk: Chunk):
        for layer in chunk.layers:
            weight, owner = sources[layer.key]
            for w, o in flat_pieces(weight, owner):
                yield torch.where(masks.uses(o, task), w, torch.zeros((), dtype=w.dtype)).float().numpy()

    def encoded(chunk: Chunk) -> EncodedChunk:
        nonzero = sum(int(np.count_nonzero(p)) for p in masked(chunk))

        def bits():
            return pack_bits_stream(p != 0 for p in masked(chunk))

        def values():
            yield np.zeros(1, np.float32)
            for p in masked(chunk):
                yield p[p != 0]

        return EncodedChunk(nonzero, Streamed(((chunk.size + 7) // 8, 1), np.dtype(np.uint8), bits),
                            Streamed((1 + nonzero,), np.dtype(np.float32), values))

    return [encoded(chunk) for chunk in chunks]


def sparse_graph(dense: onnx.ModelProto, chunks: list[Chunk]) -> onnx.ModelProto:
    """The dense graph skeleton (no initializers) with decode nodes producing the prunable weights.

    The returned model expects initializers ``c<i>.bits`` and ``c<i>.vals`` for every chunk
    (see :func:`encode_chunks`) plus the dense graph's other initializers.
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


def size_bound(nonzero: int, weights: int, head_bytes: int, slack: float = 1.05) -> float:
    """The size target of a sparse file: ``slack`` x (nonzero x 4 B + 1 bit per weight + head)."""
    return slack * (nonzero * 4 + weights / 8 + head_bytes)


@dataclass
class SparseParts:
    """A sparse file before it is written: the graph, its tensors (consumed lazily) and sizes."""

    skeleton: onnx.ModelProto
    tensors: Callable[[], Iterator[tuple[str, object]]]
    nonzero: int
    weights: int
    head_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.nonzero * 4 + self.weights // 8 + self.head_bytes


def parts(context: ExportContext, task: int) -> SparseParts:
    """Task ``task``'s sparse graph and its tensors (the fp16 file converts them)."""
    model, template, source_sha256 = context.model, context.template, context.source_sha256
    keys = template.keys
    prunable = [k for k in keys if k in model.owners]
    others = [k for k in keys if k not in model.owners]
    # short tensor names: on a small model the state-dict names would cost more than the 5% allowance
    short = {k: f"p{i}" for i, k in enumerate(keys)}
    skeleton = task_skeleton(template, model, task, "sparse", source_sha256, context.ir_version)
    rename_values(skeleton.graph, short)
    chunks = plan_chunks({short[k]: tuple(model.shared[k].shape) for k in prunable})
    skeleton = sparse_graph(skeleton, chunks)
    task_get = task_tensor(model, task)
    encoded = encode_chunks(chunks, {short[k]: (model.shared[k], model.owners[k]) for k in prunable}, task)

    def tensors():
        for i, c in enumerate(encoded):
            yield f"c{i}.bits", c.bits
            yield f"c{i}.vals", c.values
        for k in others:
            yield short[k], task_get(k)

    return SparseParts(skeleton, tensors, sum(c.nonzero for c in encoded),
                       sum(model.shared[k].numel() for k in prunable), tensor_bytes(model, others, task))


def write(context: ExportContext, task: int, path: Path) -> ExportedFile:
    """Write task ``task`` (1-based) of ``context.model`` to ``path`` as a sparse graph."""
    p = parts(context, task)
    external = write_onnx(path, p.skeleton, p.tensors(), p.total_bytes)
    return ExportedFile(path, "sparse", context.model.tasks[task - 1].name, file_bytes(path, external), external,
                        size_bound(p.nonzero, p.weights, p.head_bytes),
                        {"nonzero_weights": p.nonzero, "prunable_weights": p.weights})
