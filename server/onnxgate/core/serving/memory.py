"""What a tensor keeps alive, counted exactly or over, never under: the queue's byte bound and
the sample log's budget both count with :func:`held_nbytes`.

- a numeric tensor: its buffer; a view counts the whole buffer it is a view of (an array, or a
  request body it was decoded from in place);
- a BYTES tensor (an object array of ``str``): the pointers plus each string's ``__sizeof__``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

# Measured with tracemalloc (CPython 3.12, numpy 2): each tensor's InferInput/InferOutput,
# ndarray header and shape list take about 300 bytes besides its data.
_TENSOR_OVERHEAD = 320


def _owner(arr: np.ndarray) -> object:
    """What holds ``arr``'s memory: ``arr`` itself, the array it is a view of, or a foreign buffer."""
    owner: object = arr
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner.obj if isinstance(owner, memoryview) and owner.obj is not None else owner  # a body slice: the body


def buffer_nbytes(arr: np.ndarray) -> int:
    """Bytes of the buffer that ``arr`` keeps alive: its own, or the whole of what it is a view of."""
    if arr.base is None:
        return arr.nbytes
    owner = _owner(arr)
    if isinstance(owner, np.ndarray):
        return max(arr.nbytes, owner.nbytes)
    try:
        return max(arr.nbytes, memoryview(owner).nbytes)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return arr.nbytes


def objects_nbytes(items: Iterable[Any]) -> int:
    """The sizes of ``items`` (a collection, not an iterator: it may be walked twice), summed in C.
    BYTES tensors and headers hold ``str``: ``map`` over ``str.__sizeof__`` costs about 25 ns an
    element, a twentieth of decoding a BYTES element."""
    try:
        return sum(map(str.__sizeof__, items))
    except TypeError:  # not all str (an array a caller built itself)
        return sum(map(sys.getsizeof, items))


def held_nbytes(data: Any) -> int:
    """Memory a tensor keeps alive: its buffer (or what it is a view of), the objects in it, its header."""
    arr = data if isinstance(data, np.ndarray) else np.asarray(data)
    total = buffer_nbytes(arr) + _TENSOR_OVERHEAD
    if arr.dtype.hasobject:
        owner = _owner(arr)
        total += objects_nbytes((owner if isinstance(owner, np.ndarray) else arr).reshape(-1))
    return total


