"""numpy arrays <-> Open Inference Protocol tensors, for both transports.

Tensors travel as raw little-endian bytes: ``raw_input_contents`` / ``raw_output_contents`` on
gRPC, the binary tensor data extension (a JSON header, then the bytes) on HTTP. BYTES elements
are a 4-byte little-endian length followed by the bytes; they come back as numpy object arrays
of ``bytes``. Numeric outputs are decoded with ``np.frombuffer`` and are read-only views of the
received message (``.copy()`` one to write to it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxgate_client._errors import InvalidInput, ServerError
from onnxgate_client.pb import grpc_service_pb2 as pb

Scalar = str | int | float | bool

# V2 datatype <-> little-endian numpy dtype (BYTES is handled apart).
_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_V2_BY_KIND_SIZE: dict[tuple[str, int], str] = {(d.kind, d.itemsize): name for name, d in _NUMPY.items()}
_U32 = struct.Struct("<I")


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name for a numpy array (object, bytes and str arrays are BYTES)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    name = _V2_BY_KIND_SIZE.get((kind, array.dtype.itemsize))
    if name is None:
        raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


def encode_bytes(array: np.ndarray) -> bytes:
    """BYTES elements (bytes, or str as UTF-8) as length-prefixed raw bytes, row-major."""
    parts: list[bytes] = []
    for item in array.ravel(order="C").tolist():
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, bytes | bytearray | memoryview):
            raise TypeError(f"BYTES tensors hold bytes or str, not {type(item).__name__}")
        parts.append(_U32.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def decode_bytes(raw: bytes | memoryview, shape: Sequence[int]) -> np.ndarray:
    """Length-prefixed raw BYTES -> numpy object array of ``bytes`` of ``shape``."""
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ServerError("BYTES output is truncated inside a length prefix")
        (size,) = _U32.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise ServerError("BYTES output is truncated inside an element")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return _reshape(out, shape)


def _reshape(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    try:
        return array.reshape(tuple(shape))
    except ValueError:
        raise ServerError(f"output of {array.size} elements does not fit its shape {list(shape)}") from None


def decode_raw(datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Raw little-endian bytes of ``datatype`` -> numpy array of ``shape`` (zero-copy)."""
    if datatype == "BYTES":
        return decode_bytes(raw, shape)
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise ServerError(f"output datatype '{datatype}' is not supported by this client")
    if len(raw) % dtype.itemsize:
        raise ServerError(f"{len(raw)} bytes are not a whole number of {datatype} elements")
    return _reshape(np.frombuffer(raw, dtype=dtype), shape)


@dataclass(frozen=True, slots=True)
class Tensor:
    """One encoded input: V2 datatype, shape and raw bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


def encode_input(name: str, value: Any) -> Tensor:
    """A numpy array (or anything ``np.asarray`` takes) as a raw tensor."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    datatype = datatype_of(array)
    if datatype == "BYTES":
        raw = encode_bytes(array)
    else:
        array = np.ascontiguousarray(array, dtype=_NUMPY[datatype])
        raw = array.tobytes()
    return Tensor(name, datatype, tuple(int(d) for d in array.shape), raw)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A transport-neutral inference request, encoded once."""

    model: str
    version: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] | None
    parameters: Mapping[str, Scalar] = field(default_factory=dict)
    id: str = ""


def make_request(
    model: str,
    inputs: Mapping[str, Any],
    outputs: Sequence[str] | None = None,
    version: str | int | None = None,
    parameters: Mapping[str, Scalar] | None = None,
    request_id: str = "",
) -> InferRequest:
    """Validate the caller's arguments and encode every input."""
    if not inputs:
        raise InvalidInput("infer needs at least one input")
    if isinstance(outputs, str):
        outputs = [outputs]
    try:
        tensors = tuple(encode_input(name, value) for name, value in inputs.items())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"cannot encode inputs: {exc}") from None
    return InferRequest(
        model=model,
        version=version_str(version),
        inputs=tensors,
        outputs=tuple(outputs) if outputs is not None else None,
        parameters=dict(parameters or {}),
        id=request_id,
    )


def version_str(version: str | int | None) -> str:
    return "" if version is None else str(version)


# -- gRPC -----------------------------------------------------------------------------------


def _set_param(target: pb.InferParameter, value: Scalar) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidInput(f"parameter values are str, int, float or bool, not {type(value).__name__}")


def grpc_request(request: InferRequest, request_id: str | None = None) -> pb.ModelInferRequest:
    """The ModelInferRequest for ``request``, every input in ``raw_input_contents``."""
    msg = pb.ModelInferRequest(
        model_name=request.model,
        model_version=request.version,
        id=request.id if request_id is None else request_id,
    )
    for t in request.inputs:
        msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        msg.raw_input_contents.append(t.raw)
    for name in request.outputs or ():
        msg.outputs.add(name=name)
    for key, value in request.parameters.items():
        _set_param(msg.parameters[key], value)
    return msg


def grpc_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs of a ModelInferResponse, read from ``raw_output_contents`` (typed contents as a fallback)."""
    raw = response.raw_output_contents
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(response.outputs):
        if i < len(raw):
            out[t.name] = decode_raw(t.datatype, t.shape, raw[i])
        else:
            out[t.name] = _from_contents(t)
    return out


def _from_contents(t: pb.ModelInferResponse.InferOutputTensor) -> np.ndarray:
    if t.datatype == "BYTES":
        items = np.empty(len(t.contents.bytes_contents), dtype=object)
        items[:] = list(t.contents.bytes_contents)
        return _reshape(items, t.shape)
    dtype = _NUMPY.get(t.datatype)
    if dtype is None:
        raise ServerError(f"output datatype '{t.datatype}' is not supported by this client")
    for name in ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents"):
        if values := getattr(t.contents, name):
            return _reshape(np.asarray(values, dtype=dtype), t.shape)
    for name in ("fp32_contents", "fp64_contents"):
        if values := getattr(t.contents, name):
            return _reshape(np.asarray(values, dtype=dtype), t.shape)
    return _reshape(np.empty(0, dtype=dtype), t.shape)


# -- HTTP -----------------------------------------------------------------------------------


def http_request(request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an HTTP infer request using the binary tensor data extension."""
    doc: dict[str, Any] = {}
    if request.id:
        doc["id"] = request.id
    params: dict[str, Scalar] = dict(request.parameters)
    doc["inputs"] = [
        {
            "name": t.name,
            "shape": list(t.shape),
            "datatype": t.datatype,
            "parameters": {"binary_data_size": len(t.raw)},
        }
        for t in request.inputs
    ]
    if request.outputs is None:
        params["binary_data_output"] = True
    else:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in request.outputs]
    if params:
        doc["parameters"] = params
    header = json.dumps(doc, separators=(",", ":")).encode()
    body = b"".join([header, *(t.raw for t in request.inputs)])
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return body, headers


def http_outputs(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    """Outputs of an HTTP infer reply: a JSON header, then each binary output's bytes in order."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise ServerError(f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body")
    view = memoryview(body)
    try:
        doc = json.loads(bytes(view[:header_length]))
    except ValueError as exc:
        raise ServerError(f"infer reply is not JSON: {exc}") from None
    offset = header_length
    out: dict[str, np.ndarray] = {}
    for entry in doc.get("outputs", []):
        name, datatype, shape = entry["name"], entry["datatype"], entry["shape"]
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if offset + size > len(body):
                raise ServerError(f"output '{name}': binary_data_size {size} runs past the end of the reply")
            out[name] = decode_raw(datatype, shape, view[offset : offset + size])
            offset += size
        elif datatype == "BYTES":
            items = np.empty(_count(shape), dtype=object)
            items[:] = [s.encode("utf-8") if isinstance(s, str) else s for s in _flatten(entry.get("data", []))]
            out[name] = _reshape(items, shape)
        else:
            data = np.asarray(entry.get("data", []), dtype=_NUMPY[datatype])
            out[name] = _reshape(data, shape)
    return out


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat
