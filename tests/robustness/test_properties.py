"""Property-based tests (hypothesis) of everything that parses client or operator input.

For every decoder and parser: any input gives a result or a :class:`GatewayError` (ConfigError is
one), never another exception; decoders never allocate for a claimed shape the data cannot fill
(tracemalloc peak within a declared multiple of the input size); and encode-then-decode returns
equal arrays for every datatype, BYTES with any Unicode, FP16 and BOOL included.

Every test runs in-process with a fixed, database-less, derandomized profile
(``property_strategies.PROFILE``), so a CI run explores the same examples as a local one. The config
parsers have theirs in ``test_properties_config.py``.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import numpy as np
import orjson
import pytest
from google.protobuf.message import DecodeError
from hypothesis import assume, given
from hypothesis import strategies as st

import modelzoo
from onnxgate.core.inference import InferOutput, InferRequest, InferResponse, RequestedOutput
from onnxgate.core.serving import tensors
from onnxgate.core.serving.model import LoadOptions, ModelVersion
from onnxgate.errors import GatewayError
from onnxgate.frontends import grpc_codec, http_codec
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import model_config_pb2 as mc
from property_strategies import (
    ANY_TEXT,
    SHAPES,
    TEXT,
    V2_NAMES,
    WRONG_DATATYPES,
    arrays,
    grpc_requests,
    infer_bodies,
    json_values,
    model_inputs,
    result_or_gateway_error,
    settings_,
)

# -- memory ------------------------------------------------------------------------------------

KiB = 1024


class Peak:
    """tracemalloc peak of one call, above what was allocated before it (numpy buffers count:
    numpy reports its allocations to tracemalloc)."""

    def __enter__(self) -> Peak:
        tracemalloc.start()
        return self

    def measure(self, fn, *args):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            return result_or_gateway_error(fn, *args)
        finally:
            self.bytes = tracemalloc.get_traced_memory()[1] - base

    def __exit__(self, *exc) -> None:
        tracemalloc.stop()


# Declared bounds: the most a decoder may hold per input byte, plus a constant for the small
# fixed objects of one request. Python objects are what make the multiple larger than 1: a BYTES
# element of 2 bytes (6 on the wire) becomes a 51-byte str plus an 8-byte slot, a JSON "[]," a
# 56-byte list plus its slot. A decoder that allocated for a claimed shape instead (np.empty of
# 2**20 elements from a 100-byte body) passes these bounds by megabytes.
RAW_BYTES_PER_BYTE = 16
JSON_BYTES_PER_BYTE = 48
GRPC_BYTES_PER_BYTE = 48  # typed contents: a 2-byte varint becomes a 32-byte int in a list slot
CONSTANT = 64 * KiB  # one request's fixed objects; the largest seen in these tests is ~25 KiB


# -- tensors -----------------------------------------------------------------------------------


@given(arrays())
@settings_(300)
def test_raw_round_trip_every_datatype(case):
    v2, arr = case
    dtype = tensors.BY_V2[v2]
    raw = tensors.encode_raw(dtype, arr)
    back = tensors.decode_raw("x", dtype, list(arr.shape), raw)
    assert back.shape == arr.shape
    assert tensors.encode_raw(dtype, back) == raw  # bit for bit: NaN payloads and -0.0 kept
    if v2 == "BYTES":
        assert back.tolist() == arr.tolist()


@given(st.sampled_from(V2_NAMES), SHAPES, st.binary(max_size=200))
@settings_(250)
def test_decode_raw_any_bytes_any_shape(v2, shape, buf):
    assume(all(d >= 0 for d in shape))  # the front ends refuse negative dims before decode_raw
    dtype = tensors.BY_V2[v2]
    arr = result_or_gateway_error(tensors.decode_raw, "x", dtype, shape, buf)
    if arr is not None:
        assert list(arr.shape) == shape
        if v2 != "BYTES":
            assert arr.nbytes == len(buf) and arr.dtype == dtype.numpy
        if v2 == "BOOL":
            assert set(np.unique(np.frombuffer(buf, np.uint8))) <= {0, 1}


@given(st.lists(TEXT, max_size=20))
@settings_(200)
def test_serialize_deserialize_bytes_round_trip(items):
    arr = np.array([*items, ""], dtype=object)[:-1]  # keep it 1-d whatever the strings are
    raw = tensors.serialize_bytes(arr)
    back = tensors.deserialize_bytes("x", raw, len(items))
    assert back.tolist() == items
    # bytes elements (UTF-8 text given as bytes) serialize the same way
    as_bytes = np.array([s.encode() for s in items] + [b""], dtype=object)[:-1]
    assert tensors.serialize_bytes(as_bytes) == raw


@given(st.binary(max_size=120), st.integers(0, 2**40))
@settings_(300)
def test_deserialize_bytes_any_bytes(buf, count):
    out = result_or_gateway_error(tensors.deserialize_bytes, "x", buf, count)
    if out is not None:
        assert len(out) == count and all(isinstance(s, str) for s in out)


@given(st.lists(TEXT | st.binary(max_size=4), max_size=8), SHAPES)
@settings_(300)
def test_bytes_array_any_items_any_shape(items, shape):
    assume(all(d >= 0 for d in shape))
    out = result_or_gateway_error(tensors.bytes_array, "x", items, shape)
    if out is not None:
        assert list(out.shape) == shape
        assert out.ravel().tolist() == [s if isinstance(s, str) else s.decode() for s in items]


@given(st.sampled_from(V2_NAMES), st.lists(st.integers(0, 2**40), min_size=1, max_size=4), st.binary(max_size=4096))
@settings_(100)
def test_decode_raw_never_allocates_for_a_claimed_shape(v2, shape, buf):
    with Peak() as peak:
        peak.measure(tensors.decode_raw, "x", tensors.BY_V2[v2], shape, buf)
    assert peak.bytes <= RAW_BYTES_PER_BYTE * len(buf) + CONSTANT, (v2, shape, len(buf), peak.bytes)


# -- HTTP codec --------------------------------------------------------------------------------


def _check_decoded(request: InferRequest) -> None:
    """What decode_infer hands on is consistent and can be echoed in any reply or error."""
    for item in request.inputs:
        assert isinstance(item.name, str) and item.datatype in tensors.BY_V2
        assert list(item.data.shape) == item.shape
        assert item.data.dtype == tensors.BY_V2[item.datatype].numpy
    # The id, names and parameters come back in replies and error messages, which orjson writes.
    orjson.dumps([request.id, [i.name for i in request.inputs], [o.name for o in request.outputs]])
    orjson.dumps([request.parameters, [o.parameters for o in request.outputs]])


@given(infer_bodies())
@settings_(300)
def test_decode_infer_nearly_right_bodies(case):
    body, header_length = case
    decoded = result_or_gateway_error(http_codec.decode_infer, body, header_length, "m", "")
    if decoded is not None:
        _check_decoded(decoded[0])


@given(st.binary(max_size=300), st.none() | st.integers(-3, 400))
@settings_(300)
def test_decode_infer_any_bytes(body, header_length):
    decoded = result_or_gateway_error(http_codec.decode_infer, body, header_length, "m", "")
    if decoded is not None:
        _check_decoded(decoded[0])


@given(infer_bodies(), st.data())
@settings_(150)
def test_decode_infer_mutated_bodies(case, data):
    body, header_length = case
    buf = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and pos < len(buf):
            buf[pos] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del buf[pos:]
        else:
            buf[pos:pos] = data.draw(st.sampled_from([b"[", b"]", b"{", b"}", b",", b'"', b"\\", b"NaN", b"1e999"]))
    decoded = result_or_gateway_error(http_codec.decode_infer, bytes(buf), header_length, "m", "")
    if decoded is not None:
        _check_decoded(decoded[0])


@given(st.lists(arrays(), min_size=1, max_size=3), st.lists(st.booleans(), min_size=3, max_size=3), st.booleans())
@settings_(300)
def test_http_request_round_trip(cases, binary, nested):
    """A client's JSON (nested or flat, NaN tokens included) or binary tensors decode to equal arrays."""
    docs, tail = [], b""
    for i, (v2, arr) in enumerate(cases):
        doc = {"name": f"in{i}", "shape": list(arr.shape), "datatype": v2}
        if binary[i]:
            raw = tensors.encode_raw(tensors.BY_V2[v2], arr)
            doc["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        else:
            doc["data"] = arr.tolist() if nested and arr.ndim else arr.ravel().tolist()
        docs.append(doc)
    header = json.dumps({"id": "r", "inputs": docs, "parameters": {"binary_data_output": True}}).encode()
    request, binary_output = http_codec.decode_infer(header + tail, len(header) if tail else None, "m", "1")
    assert binary_output is True and request.id == "r" and request.model_version == "1"
    for (v2, arr), item in zip(cases, request.inputs, strict=True):
        assert item.datatype == v2 and item.shape == list(arr.shape)
        if v2 == "BYTES":
            assert item.data.tolist() == arr.tolist()
        else:
            np.testing.assert_array_equal(item.data, arr)  # NaN equals NaN here
            if v2.startswith("FP"):
                assert np.signbit(item.data).tolist() == np.signbit(arr).tolist()  # -0.0 stays -0.0


@given(st.lists(arrays(), min_size=1, max_size=3), st.lists(st.sampled_from([None, True, False]), min_size=3,
                                                             max_size=3), st.booleans(), ANY_TEXT.filter(bool) | TEXT)
@settings_(300)
def test_http_response_round_trip(cases, per_output, binary_default, request_id):
    """encode_infer's JSON (strict: NaN and infinities as strings) and binary tensors read back equal."""
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in request_id))  # ids come from decode_infer: no surrogates
    outputs = [InferOutput(f"out{i}", v2, list(arr.shape), arr) for i, (v2, arr) in enumerate(cases)]
    wanted = [
        RequestedOutput(o.name, {} if flag is None else {"binary_data": flag})
        for o, flag in zip(outputs, per_output, strict=False)
    ]
    request = InferRequest("m", "", [], wanted)
    response = InferResponse("m", "1", outputs, id=request_id)
    body, json_length = http_codec.encode_infer(response, request, binary_default)
    header = orjson.loads(body[:json_length] if json_length is not None else body)  # strict JSON
    assert header["model_name"] == "m" and header.get("id", "") == request_id
    offset = json_length or len(body)
    for (v2, arr), entry in zip(cases, header["outputs"], strict=True):
        dtype = tensors.BY_V2[v2]
        assert entry["datatype"] == v2 and entry["shape"] == list(arr.shape)
        if "parameters" in entry:
            size = entry["parameters"]["binary_data_size"]
            back = tensors.decode_raw("y", dtype, entry["shape"], body[offset : offset + size])
            offset += size
            assert tensors.encode_raw(dtype, back) == tensors.encode_raw(dtype, arr)
        elif v2 == "BYTES":
            assert entry["data"] == arr.ravel().tolist()
        else:
            back = np.array(entry["data"], dtype=dtype.numpy).reshape(arr.shape)
            np.testing.assert_array_equal(back, arr)
    assert offset == len(body)


@given(infer_bodies())
@settings_(100)
def test_decode_infer_never_allocates_for_a_claimed_shape(case):
    body, header_length = case
    with Peak() as peak:
        peak.measure(http_codec.decode_infer, body, header_length, "m", "")
    assert peak.bytes <= JSON_BYTES_PER_BYTE * len(body) + CONSTANT, (body[:200], peak.bytes)


def test_decode_infer_huge_claims_small_bodies():
    """The hostile corner the random search reaches rarely: every datatype, shapes of 2**20 to
    2**40 elements, a few bytes of data, JSON and binary."""
    with Peak() as peak:
        for v2 in V2_NAMES:
            for shape in ([2**20], [2**20, 2**20], [1, 2**40], [2**40, 0]):
                for tail in (b"", b"\0" * 4, b"\1" * 64):
                    entry = {"name": "x", "shape": shape, "datatype": v2}
                    if tail:
                        entry["parameters"] = {"binary_data_size": len(tail)}
                    else:
                        entry["data"] = [1]
                    doc = {"inputs": [entry]}
                    header = json.dumps(doc).encode()
                    peak.measure(http_codec.decode_infer, header + tail, len(header), "m", "")
                    assert peak.bytes <= JSON_BYTES_PER_BYTE * (len(header) + len(tail)) + CONSTANT, (v2, shape)


ENCODINGS = st.sampled_from(["gzip", "deflate", "GZIP", " deflate ", "identity", "", "br", "x-gzip", "gzip, deflate"])


@given(st.binary(max_size=300), ENCODINGS, st.integers(0, 4096))
@settings_(300)
def test_decompress_any_bytes(body, encoding, limit):
    out = result_or_gateway_error(http_codec.decompress, body, encoding, limit)
    if out is not None and encoding.strip().lower() not in ("", "identity"):
        assert len(out) <= limit


@given(st.lists(st.binary(max_size=400), min_size=1, max_size=3), st.sampled_from(["gzip", "deflate"]))
@settings_(200)
def test_decompress_round_trip(parts, encoding):
    """gzip bodies may hold several members (RFC 1952 section 2.2): all of them are the body."""
    if encoding == "gzip":
        body = b"".join(gzip.compress(p) for p in parts)
    else:
        parts = [b"".join(parts)]
        body = zlib.compress(parts[0])
    whole = b"".join(parts)
    assert http_codec.decompress(body, encoding, len(whole)) == whole


@given(st.binary(min_size=1, max_size=400), st.sampled_from(["gzip", "deflate"]), st.data())
@settings_(100)
def test_decompress_refuses_a_cut_or_padded_stream(payload, encoding, data):
    """A stream that stops early, or has bytes after its end, is not the body the client meant."""
    body = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    if data.draw(st.booleans()):
        bad = body[: data.draw(st.integers(0, len(body) - 1))]
    else:
        bad = body + data.draw(st.binary(min_size=1, max_size=8).filter(lambda b: not b.startswith(b"\x1f")))
    with pytest.raises(GatewayError):
        http_codec.decompress(bad, encoding, 1 << 20)


@given(st.integers(0, 1 << 16), st.sampled_from(["gzip", "deflate"]), st.integers(1, 4))
@settings_(40)
def test_decompress_memory_stays_within_the_limit(limit, encoding, members):
    """A bomb inflates to ``limit`` bytes at most: 4 MiB of zeros, in up to 4 members."""
    bomb = b"\0" * (4 << 20)
    body = gzip.compress(bomb) * members if encoding == "gzip" else zlib.compress(bomb)
    with Peak() as peak:
        peak.measure(http_codec.decompress, body, encoding, limit)
    assert peak.bytes <= 3 * limit + len(body) + CONSTANT


@given(st.binary(max_size=200) | json_values().map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")))
@settings_(300)
def test_parse_json_object_any_body(body):
    doc = result_or_gateway_error(http_codec.parse_json_object, body)
    if doc is not None:
        assert isinstance(doc, dict)
        orjson.dumps(doc)  # control-plane bodies are echoed too (route PUT answers with the route)


# -- gRPC codec --------------------------------------------------------------------------------


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


@given(st.lists(arrays(), min_size=1, max_size=3))
@settings_(200)
def test_grpc_response_round_trip(cases):
    outputs = [InferOutput(f"out{i}", v2, list(arr.shape), arr) for i, (v2, arr) in enumerate(cases)]
    msg = grpc_codec.encode_infer(InferResponse("m", "1", outputs, id="r"))
    msg = pb.ModelInferResponse.FromString(msg.SerializeToString())
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
    msg = grpc_codec.encode_infer(response)
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


# -- model validation --------------------------------------------------------------------------

ZOO = ("mlp", "add_sub", "string", "int_types", "fp16", "no_batch", "mixed_dtypes")


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory) -> dict[str, ModelVersion]:
    repo = tmp_path_factory.mktemp("props_zoo")
    for name in ZOO:
        getattr(modelzoo, f"build_{name}")(repo)
    options = LoadOptions(default_max_batch_size=8, cpu_threads=1)
    return {n: ModelVersion.load(n, 1, repo / n / "1" / "model.onnx", mc.ModelConfig(), options) for n in ZOO}


@pytest.mark.parametrize("name", ZOO)
def test_model_validate_any_inputs(zoo_models, name):
    """validate gives feeds or InvalidInput; feeds it accepts run in ONNX Runtime (a validated
    request is never the 500 "ONNX Runtime failed on valid inputs")."""
    model = zoo_models[name]

    @given(model_inputs(model))
    @settings_(60)
    def check(inputs):
        checked = result_or_gateway_error(model.validate, inputs)
        if checked is None:
            return
        feeds, rows = checked
        assert set(feeds) == set(model.inputs)
        results = model.run(feeds, model.output_names)
        if model.batched:
            assert rows >= 1 and all(r.shape[0] == rows for r in results)

    check()


def test_known_wrong_datatypes_are_refused():
    """The wrong spellings the strategies use are really wrong (or the campaign would not test)."""
    assert not set(WRONG_DATATYPES) & set(tensors.BY_V2)
