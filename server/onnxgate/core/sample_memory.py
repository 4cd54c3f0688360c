"""What a sampled request keeps alive, so that ``sample_log.queue_max_mb`` bounds memory.

The sample logger counts each sample at offer time (``Sample.nbytes``) and gives the budget back
once the writer has written it. The count is exact or over, never under:

- a numeric tensor: its buffer; a view counts the whole buffer it is a view of (an array, or a
  request body it was decoded from in place);
- a BYTES tensor (an object array of ``str``): the pointers plus each string's ``__sizeof__``;
- headers: the dict, its keys and values; the sample's own objects: a fixed share.

Counting a view as its whole buffer is right but wasteful: one sampled request of a 64-request
batch would count the whole batch. So the logger first copies such views, only their own rows
(:func:`owned_copies`, ``Sample.compact``): about 0.4 us for 4 KiB, 4 us for 128 KiB, paid only
by sampled requests, and the batch is then freed once its answers are sent.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Measured with tracemalloc (CPython 3.12, numpy 2): a sample's own objects take about 1 KiB; each
# tensor's InferInput/InferOutput, ndarray header and shape list about 300 bytes besides its data.
SAMPLE_OVERHEAD = 1024
_TENSOR_OVERHEAD = 320


def _owner(arr: np.ndarray) -> object:
    """What holds ``arr``'s memory: ``arr`` itself, the array it is a view of, or a foreign buffer."""
    owner: object = arr
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner.obj if isinstance(owner, memoryview) and owner.obj is not None else owner  # a body slice: the body


def _buffer_nbytes(arr: np.ndarray) -> int:
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


def _objects_nbytes(items: Iterable[Any]) -> int:
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
    total = _buffer_nbytes(arr) + _TENSOR_OVERHEAD
    if arr.dtype.hasobject:
        owner = _owner(arr)
        total += _objects_nbytes((owner if isinstance(owner, np.ndarray) else arr).reshape(-1))
    return total


def headers_nbytes(headers: Mapping[str, str] | None) -> int:
    """Memory a header mapping takes: the dict and its keys and values."""
    if not headers:
        return 0
    return sys.getsizeof(headers) + _objects_nbytes(headers.keys()) + _objects_nbytes(headers.values())


def owned_copies(tensors: list) -> list | None:
    """``tensors`` with views into larger buffers replaced by copies; None when none is such a view."""
    out = None
    for i, t in enumerate(tensors):
        arr = t.data
        if isinstance(arr, np.ndarray) and arr.base is not None and _buffer_nbytes(arr) > arr.nbytes:
            if out is None:
                out = list(tensors)
            out[i] = dataclasses.replace(t, data=arr.copy())
    return out
