"""Tensors written in pieces, so that an export never holds a whole layer's transient copies.

A masked, encoded or packed weight is computed from the model's tensors a few million
elements at a time and written to the file as it is produced. Without this, the largest
layer of vgg16 (fc6, 103 M weights = 411 MB) alone would need several copies of itself
(the masked weight, a boolean mask, the packed bits, the gathered values) at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

PIECE = 1 << 22
"""Elements processed at a time (16 MB of float32): bounds the transient memory of an export."""


@dataclass
class Streamed:
    """A tensor known by its shape and type, whose flat contents ``pieces()`` yields in order.

    ``pieces`` is a callable so that the tensor can be produced more than once (e.g. to
    materialize it for a test after writing it).
    """

    dims: tuple[int, ...]
    dtype: np.dtype
    pieces: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def materialize(self) -> np.ndarray:
        parts = [np.asarray(p, dtype=self.dtype).reshape(-1) for p in self.pieces()]
        flat = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        return flat.reshape(self.dims)


def flat_pieces(*tensors: torch.Tensor, piece: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned slices of the flattened ``tensors`` (same number of elements), ``piece``
    (default :data:`PIECE`) elements at a time."""
    piece = piece or PIECE
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    for start in range(0, n, piece):
        yield tuple(f[start:start + piece] for f in flats)


def pack_bits_stream(pieces: Iterator[np.ndarray], bitorder: str = "little") -> Iterator[np.ndarray]:
    """``np.packbits`` of the concatenation of boolean ``pieces``, produced piece by piece."""
    carry = np.zeros(0, dtype=bool)
    for occupied in pieces:
        if carry.size:
            occupied = np.concatenate([carry, occupied])
        whole = occupied.size - occupied.size % 8
        if whole:
            yield np.packbits(occupied[:whole], bitorder=bitorder)
        carry = occupied[whole:]
    if carry.size:
        yield np.packbits(carry, bitorder=bitorder)


def as_array(value) -> np.ndarray:
    """A little-endian contiguous numpy view (or copy when needed) of a tensor or array.

    Scalars stay 0-d (``np.ascontiguousarray`` would make them shape [1], which turned the
    multi-task graph's scalar ``task_index`` checks and ``num_classes`` output into [1]).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, order="C")
    return array.astype(array.dtype.newbyteorder("<"), copy=False)
