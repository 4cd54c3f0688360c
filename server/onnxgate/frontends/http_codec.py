"""HTTP/REST wire format <-> core types: JSON bodies and the binary tensor data extension."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from onnxgate.core.inference import InferInput, InferRequest, InferResponse, RequestedOutput
from onnxgate.core.service import IndexRow, ModelMetadata, TensorMetadata
from onnxgate.core.serving import tensors
from onnxgate.core.serving.stats import INFERENCE_STAT_FIELDS, Duration, VersionStats
from onnxgate.errors import InvalidInput, PayloadTooLarge, Unsupported
from onnxgate.frontends.endpoints import uses_shared_memory
from onnxgate_client.pb import model_config_pb2 as mc

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
_COMPRESS_MIN_BYTES = 1024


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a request's Content-Encoding (gzip or deflate), refusing more than ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise Unsupported(f"unsupported Content-Encoding '{encoding}'; use gzip or deflate")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size, rest = 0, body
    while True:  # a gzip body may be several members, each a stream (RFC 1952 section 2.2)
        try:
            inflater = zlib.decompressobj(wbits)
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {encoding}: {exc}") from None
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"decompressed request body exceeds {limit} bytes")
        parts.append(part)
        if not inflater.eof:
            raise InvalidInput(f"request body is not valid {encoding}: the stream ends early")
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if encoding == "deflate":
            raise InvalidInput(f"request body is not valid deflate: {len(rest)} bytes after the stream's end")


BODY_SLACK_BYTES = 64 * 1024  # names, parameters and JSON punctuation beyond the elements
JSON_BYTES_PER_ELEMENT = 64  # "-1.2345678901234567e-308, " with room for pretty-printing


def body_limit(elements: int | None, transport_limit: int) -> int:
    """The largest body a valid request of at most ``elements`` tensor elements can have in
    JSON or the binary extension (None: no model bound, the transport's limit)."""
    if elements is None:
        return transport_limit
    return min(transport_limit, BODY_SLACK_BYTES + JSON_BYTES_PER_ELEMENT * elements)


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """Compress an infer reply when the caller accepts gzip or deflate and it is worth it."""
    if len(body) < _COMPRESS_MIN_BYTES or not accept_encoding:
        return body, None
    accepted = _accepted_encodings(accept_encoding)
    wildcard = accepted.get("*", 0.0)
    if accepted.get("gzip", wildcard) > 0:
        return gzip.compress(body, compresslevel=1), "gzip"
    if accepted.get("deflate", wildcard) > 0:
        return zlib.compress(body, 1), "deflate"
    return body, None


def _accepted_encodings(accept_encoding: str) -> dict[str, float]:
    """Accept-Encoding as coding -> q-value; ``gzip;q=0`` means "not gzip" (RFC 9110)."""
    out: dict[str, float] = {}
    for part in accept_encoding.split(","):
        coding, *params = part.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if coding.strip():
            out[coding.strip().lower()] = q
    return out


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson rejects the NaN/Infinity/-Infinity tokens that Python clients send for
        # non-finite floats (json.dumps allows them) and that Triton accepts; retry with json,
        # but accept nothing else orjson refuses: text that is not UTF-8, lone surrogates
        # ("\ud800"), integers past 64 bits. Those could not be echoed back (orjson writes every
        # reply and error) and reach code that expects what orjson produces.
        try:
            doc = json.loads(bytes(raw).decode("utf-8"))
            orjson.dumps(doc)
        except (ValueError, RecursionError):
            raise InvalidInput(f"request JSON is malformed: {exc}") from None
        except orjson.JSONEncodeError as retry:
            raise InvalidInput(f"request JSON is malformed: {retry}") from None
        return doc


def _shape(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise InvalidInput(f"input '{name}': shape must be a list of non-negative integers, got {value!r}")
    tensors.check_rank(name, value)
    return value


def decode_raw_request(
    body: bytes | memoryview, inputs: list[TensorMetadata], batched: bool, model_name: str, model_version: str
) -> tuple[InferRequest, bool]:
    """A raw binary request (``Inference-Header-Content-Length: 0``, Triton's rule): the whole
    body is the data of the model's only input, its datatype and shape from the model; a
    batching model gets a batch of one, at most one other dimension may be variable (its size
    follows from the body's), a BYTES input must have shape [1]. Every output comes back binary."""
    if len(inputs) != 1:
        raise InvalidInput(
            f"a raw binary request (Inference-Header-Content-Length: 0) needs a model with exactly one input; "
            f"'{model_name}' has {len(inputs)}"
        )
    spec = inputs[0]
    dtype = tensors.BY_V2[spec.datatype]
    shape = list(spec.shape)
    if batched:
        shape[0] = 1
    variable = [i for i, d in enumerate(shape) if d < 0]
    if dtype.v2 == "BYTES":
        if tensors.element_count([d for d in shape if d >= 0]) != 1 or variable:
            raise InvalidInput(f"a raw binary request for BYTES input '{spec.name}' needs its shape to be [1]")
    elif len(variable) > 1:
        raise InvalidInput(
            f"a raw binary request cannot tell the shape of input '{spec.name}' ({spec.shape}): "
            "more than one dimension is variable; send the inference header"
        )
    elif variable:
        fixed = tensors.element_count([d for d in shape if d >= 0]) * dtype.itemsize
        if fixed == 0 or len(body) % fixed:
            raise InvalidInput(
                f"a raw binary body of {len(body)} bytes is not a whole number of rows of input "
                f"'{spec.name}' ({spec.datatype} {spec.shape})"
            )
        shape[variable[0]] = len(body) // fixed
    data = tensors.decode_raw(spec.name, dtype, shape, body)
    request = InferRequest(model_name, model_version, [InferInput(spec.name, dtype.v2, shape, data)], [],
                           protocol="http")
    return request, True


def decode_infer(
    body: bytes, header_length: int | None, model_name: str, model_version: str
) -> tuple[InferRequest, bool]:
    """Decode an infer body; returns the request and the request-level binary_data_output flag."""
    if header_length is None:
        header_length = len(body)
    if header_length < 0 or header_length > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
    view = memoryview(body)
    doc = _loads(view[:header_length])
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    offset = header_length
    inputs: list[InferInput] = []
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("every input needs a 'name'")
        name = item["name"]
        shape = _shape(name, item.get("shape"))
        datatype = item.get("datatype")
        dtype = tensors.BY_V2.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise InvalidInput(f"input '{name}': unknown datatype {item.get('datatype')!r}")
        in_params = item.get("parameters") or {}
        if isinstance(in_params, dict) and uses_shared_memory(in_params):
            raise Unsupported(f"input '{name}': the shared memory extension is not supported")
        size = in_params.get("binary_data_size") if isinstance(in_params, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(body):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size} exceeds the binary data sent: "
                    f"{len(body) - offset} bytes left after the JSON header and earlier inputs"
                )
            data = tensors.decode_raw(name, dtype, shape, view[offset : offset + size])
            offset += size
        elif "data" in item:
            data = _from_json(name, dtype, shape, item["data"])
        else:
            raise InvalidInput(f"input '{name}': no 'data' and no binary_data_size")
        inputs.append(InferInput(name, dtype.v2, shape, data))
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes of binary data are not claimed by any input")
    requested = doc.get("outputs") or []
    if not isinstance(requested, list):
        raise InvalidInput(f"'outputs' must be a list, got {type(requested).__name__}")
    outputs = []
    for out in requested:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput("every requested output needs a 'name'")
        out_params = out.get("parameters") or {}
        if isinstance(out_params, dict) and uses_shared_memory(out_params):
            raise Unsupported(f"output '{out['name']}': the shared memory extension is not supported")
        outputs.append(RequestedOutput(out["name"], out_params if isinstance(out_params, dict) else {}))
    request_id = doc.get("id", "")
    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=outputs,
        id=request_id if isinstance(request_id, str) else str(request_id),
        parameters=params,
        protocol="http",
    )
    return request, bool(params.get("binary_data_output", False))


def _from_json(name: str, dtype: tensors.DataType, shape: list[int], data: Any) -> np.ndarray:
    if dtype.v2 == "BYTES":
        flat = np.asarray(data, dtype=object).ravel() if isinstance(data, list) else np.asarray([data], dtype=object)
        items = flat.tolist()
        if not all(isinstance(x, str) for x in items):
            raise InvalidInput(f"input '{name}': BYTES data must be JSON strings")
        try:
            "".join(items).encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
            raise InvalidInput(f"input '{name}': BYTES element is not valid Unicode text ({exc.reason})") from None
        return tensors.bytes_array(name, items, shape)
    try:
        arr = np.asarray(data, dtype=dtype.numpy)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data is not a valid {dtype.v2} array: {exc}") from None
    count = tensors.element_count(shape)
    if arr.size != count:
        raise InvalidInput(f"input '{name}': shape {shape} needs {count} elements, got {arr.size}")
    return arr.reshape(shape)


def encode_infer(response: InferResponse, request: InferRequest, binary_default: bool) -> tuple[bytes, int | None]:
    """Encode an infer reply; returns the body and the JSON header length when binary follows."""
    wanted = {o.name: o.parameters for o in request.outputs}
    tail: list[bytes | np.ndarray] = []
    outs = []
    for out in response.outputs:
        binary = wanted.get(out.name, {}).get("binary_data", binary_default)
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary:
            raw = tensors.raw_buffer(tensors.BY_V2[out.datatype], out.data)  # copied once, by the join below
            entry["parameters"] = {"binary_data_size": tensors.buffer_size(raw)}
            tail.append(raw)
        elif out.datatype == "BYTES":
            entry["data"] = tensors.as_text_list(out.data)
        else:
            data = np.ascontiguousarray(out.data).ravel()
            entry["data"] = _nonfinite_as_text(data) if data.dtype.kind == "f" and not np.isfinite(data).all() else data
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["outputs"] = outs
    header = orjson.dumps(doc, option=_JSON_OPTS)
    if not tail:
        return header, None
    return b"".join([header, *tail]), len(header)


def _nonfinite_as_text(data: np.ndarray) -> list:
    """Float data holding NaN or infinities, as JSON can hold it: no JSON number is NaN or
    infinite (RFC 8259), so those elements are the strings "NaN", "Infinity" and "-Infinity",
    which strict parsers accept and ``float()`` / numpy read back (README, "Protocol")."""
    values = data.astype(object)
    values[np.isnan(data)] = "NaN"
    values[np.isposinf(data)] = "Infinity"
    values[np.isneginf(data)] = "-Infinity"
    return values.tolist()


def metadata_json(meta: ModelMetadata) -> bytes:
    return orjson.dumps(
        {
            "name": meta.name,
            "versions": meta.versions,
            "platform": meta.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in meta.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in meta.outputs],
        }
    )


def index_json(rows: list[IndexRow]) -> bytes:
    out = []
    for r in rows:
        entry = {"name": r.name, "state": r.state}
        if r.version:
            entry["version"] = r.version
        if r.reason:
            entry["reason"] = r.reason
        out.append(entry)
    return orjson.dumps(out)


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def stats_json(stats: list[VersionStats]) -> bytes:
    return orjson.dumps(
        {
            "model_stats": [
                {
                    "name": s.name,
                    "version": str(s.version),
                    "last_inference": s.last_inference_ms,
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": {k: _duration(getattr(s, k)) for k in INFERENCE_STAT_FIELDS},
                    "batch_stats": [
                        {
                            "batch_size": b.batch_size,
                            "compute_input": _duration(b.compute_input),
                            "compute_infer": _duration(b.compute_infer),
                            "compute_output": _duration(b.compute_output),
                        }
                        for _, b in sorted(s.batches.items())
                    ],
                }
                for s in stats
            ]
        }
    )


def parse_json_object(body: bytes) -> dict:
    """An optional JSON object body (empty body = {})."""
    if not body.strip():
        return {}
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


def config_json(config: mc.ModelConfig) -> bytes:
    """ModelConfig as Triton's JSON: proto field names, enum names, defaults included.

    Like Triton's ``ModelConfigToJson``, 64-bit integers (``dims``, queue delays, ...) are JSON
    numbers, not the strings of protobuf's JSON mapping.
    """
    doc = json_format.MessageToDict(config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _int64_as_numbers(config.DESCRIPTOR, doc)
    return orjson.dumps(doc)


_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _int64_as_numbers(descriptor, doc: dict) -> None:
    """Turn the string-valued 64-bit integer fields of a MessageToDict result into ints, in place."""
    for field in descriptor.fields:
        value = doc.get(field.name)
        if value is None:
            continue
        sub = field.message_type
        if sub is not None and sub.GetOptions().map_entry:  # map keys stay strings, as in JSON
            value_field = sub.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in value.values():
                    _int64_as_numbers(value_field.message_type, item)
            elif value_field.type in _INT64_TYPES:
                doc[field.name] = {k: int(v) for k, v in value.items()}
        elif sub is not None:
            for item in value if isinstance(value, list) else [value]:
                _int64_as_numbers(sub, item)
        elif field.type in _INT64_TYPES:
            doc[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
