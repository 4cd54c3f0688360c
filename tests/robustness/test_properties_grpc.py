"""Property-based tests (hypothesis) of the gRPC codec: any message decodes to a request or a
:class:`GatewayError`, never allocates for a claimed shape, reads large requests in place exactly
as protobuf parses them, and writes replies byte for byte as protobuf would."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from alloc_bounds import CONSTANT, GRPC_BYTES_PER_BYTE, Peak
from onnxgate.core.inference import InferOutput, InferRequest, InferResponse
from onnxgate.core.serving import tensors
from onnxgate.errors import GatewayError
from onnxgate.frontends import grpc_codec
from onnxgate_client.pb import grpc_service_pb2 as pb
from property_strategies import arrays, grpc_requests, result_or_gateway_error, settings_


def _check_grpc_decoded(request: InferRequest) -> None:
    for item in request.inputs:
        assert item.datatype in tensors.BY_V2 and list(item.data.shape) == item.shape
        assert item.data.dtype == tensors.BY_V2[item.datatype].numpy


@given(grpc_requests())
@settings_(250)
def test_grpc_decode_any_tensors(req):
    decoded = result_or_gateway_error(grpc_codec.decode_infer, req)
    if decoded is not None:
        _check_grpc_decoded(decoded)


@given(grpc_requests(), st.data())
@settings_(150)
def test_grpc_from_string_of_mutated_bytes(req, data):
    """Whatever bytes arrive: protobuf refuses them (DecodeError, which the servicer maps to
    INVALID_ARGUMENT), or they decode to a request or a GatewayError."""
    raw = bytearray(req.SerializeToString())
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(raw)))
        if data.draw(st.booleans()) and pos < len(raw):
            raw[pos] = data.draw(st.integers(0, 255))
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=6))
    try:
        msg = pb.ModelInferRequest.FromString(bytes(raw))
    except DecodeError:
        return
    decoded = result_or_gateway_error(grpc_codec.decode_infer, msg)
    if decoded is not None:
        _check_grpc_decoded(decoded)


@given(st.binary(max_size=200))
@settings_(300)
def test_grpc_from_string_of_any_bytes(raw):
    try:
        msg = pb.ModelInferRequest.FromString(raw)
    except DecodeError:
        return
    decoded = result_or_gateway_error(grpc_codec.decode_infer, msg)
    if decoded is not None:
        _check_grpc_decoded(decoded)


_TYPED = {v2: field for v2, field in grpc_codec._CONTENTS_FIELD.items()}


@given(st.lists(arrays(), min_size=1, max_size=3), st.booleans())
@settings_(300)
def test_grpc_request_round_trip(cases, typed):
    """Raw contents (every datatype) and typed contents (all but FP16, which has none) decode to
    equal arrays after a trip through the wire format."""
    typed = typed and all(v2 in _TYPED for v2, _ in cases)
    req = pb.ModelInferRequest(model_name="m", id="r")
    for i, (v2, arr) in enumerate(cases):
        t = req.inputs.add(name=f"in{i}", datatype=v2, shape=arr.shape)
        if typed:
            values = [s.encode() for s in arr.ravel()] if v2 == "BYTES" else arr.ravel().tolist()
            getattr(t.contents, _TYPED[v2]).extend(values)
        else:
            req.raw_input_contents.append(tensors.encode_raw(tensors.BY_V2[v2], arr))
    request = grpc_codec.decode_infer(pb.ModelInferRequest.FromString(req.SerializeToString()))
    for (v2, arr), item in zip(cases, request.inputs, strict=True):
        dtype = tensors.BY_V2[v2]
        assert item.shape == list(arr.shape)
        assert tensors.encode_raw(dtype, item.data) == tensors.encode_raw(dtype, arr)


def _message(response: InferResponse) -> pb.ModelInferResponse:
    """The reply as a protobuf message, one raw_output_contents entry per output: the oracle of
    the bytes the gateway writes itself."""
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version, id=response.id)
    for out in response.outputs:
        msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        msg.raw_output_contents.append(tensors.encode_raw(tensors.BY_V2[out.datatype], out.data))
    return msg


@given(st.lists(arrays(), min_size=1, max_size=3))
@settings_(200)
def test_grpc_response_round_trip(cases):
    outputs = [InferOutput(f"out{i}", v2, list(arr.shape), arr) for i, (v2, arr) in enumerate(cases)]
    msg = pb.ModelInferResponse.FromString(grpc_codec.serialize_infer(InferResponse("m", "1", outputs, id="r")))
    assert len(msg.outputs) == len(msg.raw_output_contents) == len(cases)
    for (v2, arr), out, raw in zip(cases, msg.outputs, msg.raw_output_contents, strict=True):
        dtype = tensors.BY_V2[v2]
        assert out.datatype == v2 and list(out.shape) == list(arr.shape)
        assert tensors.encode_raw(dtype, tensors.decode_raw("y", dtype, list(out.shape), raw)) == raw
        assert raw == tensors.encode_raw(dtype, arr)


@given(st.lists(arrays(), min_size=1, max_size=3), st.text(max_size=8), st.text(max_size=8))
@settings_(200)
def test_grpc_reply_bytes_are_the_message_protobuf_writes(cases, version, request_id):
    """The reply the gateway writes itself (unary and stream) is byte for byte what protobuf
    serializes from the same message."""
    outputs = [InferOutput(f"out{i}" if i else "", v2, list(arr.shape), arr) for i, (v2, arr) in enumerate(cases)]
    response = InferResponse("m", version, outputs, id=request_id)
    msg = _message(response)
    assert grpc_codec.serialize_infer(response) == msg.SerializeToString()
    stream = pb.ModelStreamInferResponse(infer_response=msg).SerializeToString()
    assert grpc_codec.serialize_infer(response, stream=True) == stream


def _outcome(parse, data: bytes):
    try:
        r = parse(data)
    except GatewayError as exc:
        return type(exc).__name__, exc.message
    inputs = [(i.name, i.datatype, i.shape, tensors.encode_raw(tensors.BY_V2[i.datatype], i.data)) for i in r.inputs]
    return r.model_name, r.model_version, r.id, r.parameters, inputs, [(o.name, o.parameters) for o in r.outputs]


@given(grpc_requests(), st.binary(max_size=3))
@settings_(200)
def test_grpc_requests_read_in_place_decode_as_protobuf_parses_them(monkeypatch_module, req, junk):
    """A large request's tensors are read in place, without protobuf: the outcome (the request,
    or the error) is the same as protobuf's, for any message and any trailing bytes."""
    data = req.SerializeToString() + junk
    monkeypatch_module.setattr(grpc_codec, "ZERO_COPY_BYTES", 1 << 40)
    expected = _outcome(grpc_codec.parse_infer, data)
    monkeypatch_module.setattr(grpc_codec, "ZERO_COPY_BYTES", 0)
    assert _outcome(grpc_codec.parse_infer, data) == expected


def _big_request(tail: bytes) -> bytes:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 20_000])
    req.raw_input_contents.append(bytes(80_000))
    return req.SerializeToString() + tail


@pytest.mark.parametrize(
    "tail",
    [
        b"\xba\x80\x80\x80\x80\x00\x04abcd",  # field 7 with a 6-byte tag: protobuf refuses it
        b"\xba\x80\x80\x80\x80\x80\x80\x80\x80\x00\x04abcd",  # ... a 10-byte one
        b"\xba\x00\x04abcd",  # a 2-byte tag, which protobuf takes
        b"\x3a\x00" * 5000,  # thousands of empty raw contents
        b"\x08\x00" * 5000,  # thousands of varint fields
    ],
)
def test_large_requests_read_in_place_agree_with_protobuf_on_crafted_fields(monkeypatch, tail):
    data = _big_request(tail)
    assert len(data) >= grpc_codec.ZERO_COPY_BYTES
    in_place = _outcome(grpc_codec.parse_infer, data)
    monkeypatch.setattr(grpc_codec, "ZERO_COPY_BYTES", 1 << 40)
    assert in_place == _outcome(grpc_codec.parse_infer, data)


def test_reading_in_place_costs_no_memory_per_crafted_field():
    """Fields crafted to be many and empty cost the in-place reader no more than protobuf's."""
    data = _big_request(b"\x3a\x00" * 100_000)
    with Peak() as peak:
        peak.measure(lambda: _outcome(grpc_codec.parse_infer, data))
    assert peak.bytes <= GRPC_BYTES_PER_BYTE * len(data) // 8 + CONSTANT, peak.bytes


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@given(grpc_requests())
@settings_(100)
def test_grpc_decode_never_allocates_for_a_claimed_shape(req):
    size = req.ByteSize()
    with Peak() as peak:
        peak.measure(grpc_codec.decode_infer, req)
    assert peak.bytes <= GRPC_BYTES_PER_BYTE * size + CONSTANT, (req, peak.bytes)


