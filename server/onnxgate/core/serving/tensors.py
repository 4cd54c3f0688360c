"""Datatypes (V2 name <-> numpy <-> ONNX Runtime <-> model config) and tensor byte codecs.

Raw tensor bytes are little-endian and row-major. BYTES elements travel as a 4-byte
little-endian length followed by the bytes; ONNX string tensors hold UTF-8 text, so BYTES
elements are decoded to ``str`` on the way in and encoded on the way out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxgate.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class DataType:
    """One tensor datatype under all the names the gateway meets."""

    v2: str  # Open Inference Protocol name, e.g. "FP32"
    config: str  # ModelConfig enum name, e.g. "TYPE_FP32"
    ort: str  # ONNX Runtime type string, e.g. "tensor(float)"
    numpy: np.dtype  # little-endian numpy dtype (object for BYTES)

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for variable-size BYTES."""
        return 0 if self.v2 == "BYTES" else self.numpy.itemsize


def _dt(v2: str, config: str, ort: str, np_type: str) -> DataType:
    dtype = np.dtype(np_type)
    return DataType(v2, config, ort, dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)


DATATYPES: tuple[DataType, ...] = (
    _dt("BOOL", "TYPE_BOOL", "tensor(bool)", "bool"),
    _dt("UINT8", "TYPE_UINT8", "tensor(uint8)", "uint8"),
    _dt("UINT16", "TYPE_UINT16", "tensor(uint16)", "uint16"),
    _dt("UINT32", "TYPE_UINT32", "tensor(uint32)", "uint32"),
    _dt("UINT64", "TYPE_UINT64", "tensor(uint64)", "uint64"),
    _dt("INT8", "TYPE_INT8", "tensor(int8)", "int8"),
    _dt("INT16", "TYPE_INT16", "tensor(int16)", "int16"),
    _dt("INT32", "TYPE_INT32", "tensor(int32)", "int32"),
    _dt("INT64", "TYPE_INT64", "tensor(int64)", "int64"),
    _dt("FP16", "TYPE_FP16", "tensor(float16)", "float16"),
    _dt("FP32", "TYPE_FP32", "tensor(float)", "float32"),
    _dt("FP64", "TYPE_FP64", "tensor(double)", "float64"),
    _dt("BYTES", "TYPE_STRING", "tensor(string)", "object"),
)

BY_V2: dict[str, DataType] = {d.v2: d for d in DATATYPES}
BY_CONFIG: dict[str, DataType] = {d.config: d for d in DATATYPES}
BY_ORT: dict[str, DataType] = {d.ort: d for d in DATATYPES}

_U32 = struct.Struct("<I")

# numpy (1.x) arrays have at most 32 dimensions; more would fail deep inside numpy.
MAX_RANK = 32
# No request tensor comes near this many elements (bodies are bounded far below); the bound
# keeps every size computation inside numpy's index range, even for shapes holding a 0.
MAX_ELEMENTS = 1 << 40


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor with this (fully known) shape."""
    n = 1
    for d in shape:
        n *= d
    return n


def check_rank(name: str, shape: Sequence[int]) -> None:
    """Reject shapes no array can have: too many dimensions, or dimensions whose product (zeros
    counted as 1) passes :data:`MAX_ELEMENTS`, which numpy cannot index even when a 0 empties it."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input '{name}': shape has {len(shape)} dimensions, at most {MAX_RANK} are supported")
    n = 1
    for d in shape:
        n *= d or 1
        if n > MAX_ELEMENTS:
            raise InvalidInput(f"input '{name}': shape {list(shape)[:MAX_RANK]} is too large")


def decode_raw(
    name: str, dtype: DataType, shape: Sequence[int], buf: bytes | memoryview, rank_checked: bool = False
) -> np.ndarray:
    """Turn raw little-endian bytes into an array of ``shape``; checks the byte length (and the
    shape with :func:`check_rank`, unless the caller did)."""
    if not rank_checked:
        check_rank(name, shape)
    count = element_count(shape)
    if dtype.v2 == "BYTES":
        arr = deserialize_bytes(name, buf, count)
        return arr.reshape(shape)
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise InvalidInput(
            f"input '{name}': expected {expected} bytes for {dtype.v2} shape {list(shape)}, got {len(buf)}"
        )
    arr = np.frombuffer(buf, dtype=dtype.numpy)
    if dtype.v2 == "BOOL" and arr.size and arr.view(np.uint8).max() > 1:
        raise InvalidInput(f"input '{name}': BOOL elements must be 0 or 1")
    return arr.reshape(shape)


def deserialize_bytes(name: str, buf: bytes | memoryview, count: int) -> np.ndarray:
    """Split length-prefixed BYTES elements into an object array of ``str``."""
    view = memoryview(buf)
    pos, end = 0, len(view)
    if count * 4 > end:  # every element has a 4-byte length; never allocate for a shape the data cannot fill
        raise InvalidInput(
            f"input '{name}': {count} BYTES elements need at least {count * 4} bytes (4-byte lengths), got {end}"
        )
    out = np.empty(count, dtype=object)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(f"input '{name}': BYTES data ends before element {i} of {count}")
        (length,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(f"input '{name}': BYTES element {i} claims {length} bytes, data ends first")
        out[i] = _utf8(name, view[pos : pos + length], i)
        pos += length
    if pos != end:
        raise InvalidInput(f"input '{name}': {end - pos} bytes left after {count} BYTES elements")
    return out


def _utf8(name: str, raw: bytes | memoryview, index: int) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"input '{name}': BYTES element {index} must be UTF-8 text (ONNX strings), got invalid bytes "
            f"({exc.reason} at byte {exc.start})"
        ) from None


def bytes_array(name: str, items: Sequence[bytes | str], shape: Sequence[int]) -> np.ndarray:
    """An object array of ``str`` from BYTES elements given one by one (JSON or typed contents)."""
    check_rank(name, shape)
    count = element_count(shape)
    if len(items) != count:
        raise InvalidInput(f"input '{name}': shape {list(shape)} needs {count} elements, got {len(items)}")
    out = np.empty(count, dtype=object)
    for i, item in enumerate(items):
        out[i] = item if isinstance(item, str) else _utf8(name, item, i)
    return out.reshape(shape)


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Length-prefix every element of a string/bytes array, row-major."""
    parts: list[bytes] = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def encode_raw(dtype: DataType, arr: np.ndarray) -> bytes:
    """Raw little-endian bytes of ``arr`` in the wire form of ``dtype``."""
    buf = raw_buffer(dtype, arr)
    return buf.tobytes() if isinstance(buf, np.ndarray) else buf


def raw_buffer(dtype: DataType, arr: np.ndarray) -> bytes | np.ndarray:
    """What :func:`encode_raw` returns, without copying numeric data that is already contiguous
    in its wire form: a buffer for ``b"".join`` to copy once into a reply. Its length in bytes
    is :func:`buffer_size`."""
    if dtype.v2 == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=dtype.numpy)


def buffer_size(buf: bytes | np.ndarray) -> int:
    return buf.nbytes if isinstance(buf, np.ndarray) else len(buf)


def as_text_list(arr: np.ndarray) -> list[str]:
    """BYTES elements as JSON strings, row-major."""
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in arr.ravel()]
