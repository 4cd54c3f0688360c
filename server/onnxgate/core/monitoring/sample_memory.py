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
from collections.abc import Mapping

import numpy as np

from onnxgate.core.serving.memory import buffer_nbytes, held_nbytes, objects_nbytes

__all__ = ["SAMPLE_OVERHEAD", "headers_nbytes", "held_nbytes", "owned_copies"]

# Measured with tracemalloc (CPython 3.12, numpy 2): a sample's own objects take about 1 KiB.
SAMPLE_OVERHEAD = 1024
def headers_nbytes(headers: Mapping[str, str] | None) -> int:
    """Memory a header mapping takes: the dict and its keys and values."""
    if not headers:
        return 0
    return sys.getsizeof(headers) + objects_nbytes(headers.keys()) + objects_nbytes(headers.values())


def owned_copies(tensors: list) -> list | None:
    """``tensors`` with views into larger buffers replaced by copies; None when none is such a view."""
    out = None
    for i, t in enumerate(tensors):
        arr = t.data
        if isinstance(arr, np.ndarray) and arr.base is not None and buffer_nbytes(arr) > arr.nbytes:
            if out is None:
                out = list(tensors)
            out[i] = dataclasses.replace(t, data=arr.copy())
    return out
