"""Property-based tests (hypothesis) of everything that parses client or operator input.

For every decoder and parser: any input gives a result or a :class:`GatewayError` (ConfigError is
one), never another exception; decoders never allocate for a claimed shape the data cannot fill
(tracemalloc peak within a declared multiple of the input size); and encode-then-decode returns
equal arrays for every datatype, BYTES with any Unicode, FP16 and BOOL included.

Every test runs in-process with a fixed, database-less, derandomized profile
(``property_strategies.PROFILE``), so a CI run explores the same examples as a local one. The config
parsers have theirs in ``test_properties_config.py``, the gRPC codec in ``test_properties_grpc.py``.
"""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import orjson
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import modelzoo
from alloc_bounds import CONSTANT, JSON_BYTES_PER_BYTE, RAW_BYTES_PER_BYTE, Peak
from onnxgate.core.inference import InferOutput, InferRequest, InferResponse, RequestedOutput
from onnxgate.core.serving import tensors
from onnxgate.core.serving.model import LoadOptions, ModelVersion
from onnxgate.errors import GatewayError
from onnxgate.frontends import http_codec
from onnxgate_client.pb import model_config_pb2 as mc
from property_strategies import (
    ANY_TEXT,
    SHAPES,
    TEXT,
    V2_NAMES,
    WRONG_DATATYPES,
    arrays,
    infer_bodies,
    json_values,
    model_inputs,
    result_or_gateway_error,
    settings_,
)

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
