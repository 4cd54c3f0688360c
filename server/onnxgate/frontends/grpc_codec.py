"""gRPC messages <-> core types. Raw contents are decoded with ``np.frombuffer``."""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from onnxgate.core.inference import InferInput, InferRequest, InferResponse, RequestedOutput
from onnxgate.core.service import IndexRow, ModelMetadata
from onnxgate.core.serving import tensors
from onnxgate.core.serving.stats import INFERENCE_STAT_FIELDS, Duration, VersionStats
from onnxgate.errors import InvalidInput, Unsupported
from onnxgate.frontends.endpoints import uses_shared_memory
from onnxgate_client.pb import grpc_service_pb2 as pb

# Typed contents field per datatype (FP16 travels raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

def param_value(p: pb.InferParameter) -> Any:
    """The Python value of one InferParameter."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def params_dict(params) -> dict[str, Any]:
    return {k: param_value(v) for k, v in params.items()} if params else {}


MESSAGE_SLACK_BYTES = 64 * 1024  # names, parameters and framing beyond the elements
BYTES_PER_ELEMENT = 10  # the most an element takes: a 10-byte varint in typed contents


def message_limit(elements: int | None) -> int | None:
    """The largest ModelInferRequest a valid request of at most ``elements`` tensor elements
    can be (None: no model bound; the transport's message limit applies)."""
    return None if elements is None else MESSAGE_SLACK_BYTES + BYTES_PER_ELEMENT * elements


def peek_target(data: bytes) -> tuple[str, str, str] | None:
    """``(model_name, model_version, id)`` from the leading fields of a serialized
    ModelInferRequest, without parsing the rest; None when the message does not start with
    field 1 (model_name) in canonical order (every protobuf library writes fields in number
    order), so that only a full parse can tell."""
    out = ["", "", ""]
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field > 3 or wire_type != 2:
            break
        length, pos = _varint(data, pos)
        if field < 1 or pos + length > end:
            return None
        try:
            out[field - 1] = data[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError:
            return None
        pos += length
    return (out[0], out[1], out[2]) if out[0] else None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return 1 << 62, len(data)  # cut or overlong: a field number no loop goes past


#: From this size on, a request's raw_input_contents are not parsed by protobuf (which copies
#: them into the message, and again on every access) but read in place (see ``_split_raw``).
ZERO_COPY_BYTES = 64 * 1024
_RAW_INPUT_TAG = 0x3A  # raw_input_contents: field 7, length-delimited
MAX_SPLIT_FIELDS = 1024  # top-level fields read in Python (the memory and time of a field each)


def parse_infer(data: bytes) -> InferRequest:
    """Parse and decode a serialized ModelInferRequest. A large one's tensors are views of
    ``data`` itself: the only copy of a request's bytes is grpc's, into ``data``."""
    split = _split_raw(data) if len(data) >= ZERO_COPY_BYTES else None
    rest, raw = split if split is not None else (data, None)
    try:
        req = pb.ModelInferRequest.FromString(rest)
    except DecodeError:
        raise InvalidInput("the request is not a valid inference.ModelInferRequest message") from None
    return decode_infer(req, raw)


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """The message without its raw_input_contents (the rest, for protobuf to parse: names,
    shapes, parameters) and those contents as views of ``data``; None when the top level does
    not read as plain protobuf (protobuf's own parse then decides)."""
    view = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    pos, end, kept, fields = 0, len(data), 0, 0
    while pos < end:
        fields += 1
        if fields > MAX_SPLIT_FIELDS:
            return None  # a valid request has a few fields per input: protobuf walks the rest in C
        start = pos
        tag, pos = _varint(data, pos)
        if pos - start > 5:
            return None  # no field number needs more than 5 bytes; protobuf refuses longer tags
        wire_type = tag & 7
        if wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                return None
            if tag == _RAW_INPUT_TAG:
                raw.append(view[pos : pos + length])
                if start > kept:
                    rest.append(view[kept:start])
                kept = pos + length
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            return None
        if pos > end:
            return None
    if not raw:
        return None  # nothing to keep out of protobuf's copy
    rest.append(view[kept:end])
    return b"".join(rest), raw


def decode_infer(req: pb.ModelInferRequest, raw_contents: list[memoryview] | None = None) -> InferRequest:
    """Decode a ModelInferRequest; every error names the input at fault. ``raw_contents``, when
    given, stands for its raw_input_contents (read in place by ``parse_infer``)."""
    raw = req.raw_input_contents if raw_contents is None else raw_contents
    items = list(req.inputs)
    if raw:
        for t in items:
            if t.HasField("contents") and t.contents.ByteSize() > 0:
                raise InvalidInput(
                    f"input '{t.name}': contents and raw_input_contents cannot be mixed; "
                    "send every input's data in raw_input_contents or every input's in contents"
                )
        if len(raw) != len(items):
            raise InvalidInput(
                f"{len(items)} inputs need {len(items)} raw_input_contents entries "
                f"(one per input, in order), got {len(raw)}"
            )
    inputs: list[InferInput] = []
    by_v2 = tensors.BY_V2
    for i, t in enumerate(items):
        name = t.name
        dtype = by_v2.get(t.datatype)
        if dtype is None:
            raise InvalidInput(f"input '{name}': unknown datatype '{t.datatype}'")
        shape = list(t.shape)
        if shape and min(shape) < 0:
            raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
        tensors.check_rank(name, shape)
        if uses_shared_memory(t.parameters):
            raise Unsupported(f"input '{name}': the shared memory extension is not supported")
        if raw:  # no input has contents (an empty typed ``contents {}``, as MLServer sends, is none)
            data = tensors.decode_raw(name, dtype, shape, raw[i], rank_checked=True)
        elif t.HasField("contents"):
            data = _from_contents(name, dtype, shape, t.contents)
        else:
            raise InvalidInput(f"input '{name}': no data (neither raw_input_contents nor contents)")
        inputs.append(InferInput(name, dtype.v2, shape, data))
    outputs = []
    for o in req.outputs:
        if uses_shared_memory(o.parameters):
            raise Unsupported(f"output '{o.name}': the shared memory extension is not supported")
        outputs.append(RequestedOutput(o.name, params_dict(o.parameters)))
    return InferRequest(
        model_name=req.model_name,
        model_version=req.model_version,
        inputs=inputs,
        outputs=outputs,
        id=req.id,
        parameters=params_dict(req.parameters),
        protocol="grpc",
    )


def _from_contents(name: str, dtype: tensors.DataType, shape: list[int], contents) -> np.ndarray:
    field = _CONTENTS_FIELD.get(dtype.v2)
    if field is None:
        raise InvalidInput(f"input '{name}': {dtype.v2} must be sent in raw_input_contents")
    values = getattr(contents, field)
    if dtype.v2 == "BYTES":
        return tensors.bytes_array(name, list(values), shape)
    count = tensors.element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': shape {shape} needs {count} elements, got {len(values)}")
    try:
        return np.array(values, dtype=dtype.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidInput(f"input '{name}': value out of range for {dtype.v2}: {exc}") from None


def serialize_infer(response: InferResponse, stream: bool = False) -> bytes:
    """The serialized ModelInferResponse (or, with ``stream``, ModelStreamInferResponse holding it)
    written directly from the outputs: each output's bytes are copied once, from the batch's
    result into the reply, where building a message would copy them three times (to bytes, into
    the message, out of it). The same bytes as protobuf writes for that message (tested)."""
    parts: list[Any] = []
    for field_tag, text in ((b"\x0a", response.model_name), (b"\x12", response.model_version), (b"\x1a", response.id)):
        if text:
            data = text.encode("utf-8")
            parts += (field_tag, _uvarint(len(data)), data)
    raws: list[Any] = []
    for out in response.outputs:
        name, datatype = out.name.encode("utf-8"), out.datatype.encode("utf-8")
        tensor = [b"\x0a", _uvarint(len(name)), name, b"\x12", _uvarint(len(datatype)), datatype] if name else [
            b"\x12", _uvarint(len(datatype)), datatype]
        if out.shape:
            dims = b"".join(_uvarint(int(d) & _U64) for d in out.shape)
            tensor += (b"\x1a", _uvarint(len(dims)), dims)
        body = b"".join(tensor)
        parts += (b"\x2a", _uvarint(len(body)), body)
        raw = tensors.raw_buffer(tensors.BY_V2[out.datatype], out.data)
        raws += (b"\x32", _uvarint(tensors.buffer_size(raw)), raw)
    parts += raws
    if stream:  # ModelStreamInferResponse.infer_response (field 2)
        size = sum(map(tensors.buffer_size, parts))
        parts[:0] = (b"\x12", _uvarint(size))
    return b"".join(parts)


_U64 = (1 << 64) - 1  # int64 dims as protobuf writes them (two's complement varints)
_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def _uvarint(value: int) -> bytes:
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 127:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def metadata_message(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    TM = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[TM(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[TM(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


def index_message(rows: list[IndexRow]) -> pb.RepositoryIndexResponse:
    MI = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[MI(name=r.name, version=r.version, state=r.state, reason=r.reason) for r in rows]
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def stats_message(stats: list[VersionStats]) -> pb.ModelStatisticsResponse:
    out = pb.ModelStatisticsResponse()
    for s in stats:
        m = out.model_stats.add(
            name=s.name,
            version=str(s.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        for k in INFERENCE_STAT_FIELDS:
            getattr(m.inference_stats, k).CopyFrom(_duration(getattr(s, k)))
        for _, b in sorted(s.batches.items()):
            m.batch_stats.add(
                batch_size=b.batch_size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
    return out


def repository_params(params) -> dict[str, Any]:
    """ModelRepositoryParameter map as Python values."""
    out = {}
    for k, v in params.items():
        kind = v.WhichOneof("parameter_choice")
        out[k] = getattr(v, kind) if kind else None
    return out
