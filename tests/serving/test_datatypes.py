"""Every zoo model answers exactly what ONNX Runtime answers, through every client flavour.

Transports: tritonclient.grpc, tritonclient.http with binary tensors (its default), tritonclient.http
with JSON ``data`` both ways, and the aio variants of both. Expected values always come from
``modelzoo.reference_run`` on the same model file; JSON numbers must round-trip exactly.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from protocol_helpers import (
    TRANSPORTS,
    ZOO_MODELS,
    assert_answer_matches,
    assert_classification,
    assert_tensor_equal,
    http_request,
    infer,
    json_infer_body,
    reference,
    zoo_feeds,
)

MODELS = [m for m in ZOO_MODELS if m != "scaled"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", MODELS)
def test_zoo_model_matches_onnxruntime(gateway, zoo_repo, model, transport):
    feeds = zoo_feeds(model, rows=3, seed=len(model))
    answer = infer(transport, gateway, model, feeds)
    assert answer.model_name == model
    assert answer.model_version == "1"
    assert_answer_matches(answer, reference(zoo_repo, model, feeds))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_scaled_versions_match_onnxruntime(gateway, zoo_repo, version, transport):
    feeds = zoo_feeds("scaled", rows=2, seed=int(version))
    answer = infer(transport, gateway, "scaled", feeds, version=version)
    assert answer.model_version == version
    expected = reference(zoo_repo, "scaled", feeds, version)
    assert_answer_matches(answer, expected)
    np.testing.assert_array_equal(expected["y"], feeds["x"] * np.float32(version))  # the versions differ


@pytest.mark.parametrize("transport", ["grpc", "http", "http_json"])
@pytest.mark.parametrize("rows", [1, 17])
def test_batch_sizes(gateway, zoo_repo, rows, transport):
    feeds = zoo_feeds("mlp", rows=rows, seed=rows)
    answer = infer(transport, gateway, "mlp", feeds)
    assert answer.outputs["y"].shape == (rows, 10)
    assert_answer_matches(answer, reference(zoo_repo, "mlp", feeds))


@pytest.mark.parametrize("transport", ["grpc", "http", "http_json"])
def test_no_batch_model_rejects_a_batch_dimension(gateway, transport):
    feeds = {"x": np.zeros((1, 3, 4), dtype=np.float32)}
    with pytest.raises(InferenceServerException, match="shape"):
        infer(transport, gateway, "no_batch", feeds)


def test_fp16_travels_as_json_numbers_over_http(gateway, zoo_repo):
    """The fact sheet allows FP16 as JSON numbers over HTTP (only BF16 cannot go as JSON)."""
    feeds = zoo_feeds("fp16", rows=4, seed=7)
    client = httpclient.InferenceServerClient(gateway.http_url)
    item = httpclient.InferInput("x", [4, 8], "FP16")
    item.set_data_from_numpy(feeds["x"], binary_data=False)
    result = client.infer("fp16", [item], outputs=[httpclient.InferRequestedOutput("y", binary_data=False)])
    out = result.get_response()["outputs"][0]
    assert out["datatype"] == "FP16" and "data" in out and "parameters" not in out
    assert_tensor_equal(result.as_numpy("y"), reference(zoo_repo, "fp16", feeds)["y"], "y")


def test_json_bytes_outputs_are_strings(gateway, zoo_repo):
    feeds = zoo_feeds("string", rows=6)
    answer_json = infer("http_json", gateway, "string", feeds)
    expected = reference(zoo_repo, "string", feeds)
    client = httpclient.InferenceServerClient(gateway.http_url)
    item = httpclient.InferInput("text", list(feeds["text"].shape), "BYTES")
    item.set_data_from_numpy(feeds["text"], binary_data=False)
    raw = client.infer("string", [item], outputs=[httpclient.InferRequestedOutput("upper", binary_data=False)])
    data = raw.get_response()["outputs"][0]["data"]
    assert data == [str(s) for s in expected["upper"].ravel()]
    assert_answer_matches(answer_json, expected)


# -- classification of every numeric datatype ----------------------------------------------


@pytest.mark.parametrize(
    ("model", "output"),
    [
        ("no_batch", "y"),  # no batch dimension: top-k of the whole tensor, shape [k]
        ("fp16", "y"),
        ("mixed_dtypes", "f64_out"),
        ("mixed_dtypes", "u8_out"),
        ("int_types", "i8_out"),
        ("int_types", "i32_out"),
        ("int_types", "u16_out"),
        ("int_types", "u64_out"),
    ],
)
def test_classification(gateway, zoo_repo, model, output):
    """Top-2 per row as "value:index" (grpc, http, http JSON); extreme and zero integers must
    rank correctly, and integers print as integers (Triton's std::to_string)."""
    feeds = zoo_feeds(model, rows=3, seed=5)
    if model == "mixed_dtypes":
        feeds["u8"][:, 0] = 0  # a zero among unsigned values ranks last
    expected = reference(zoo_repo, model, feeds)[output]
    for transport in ("grpc", "http", "http_json"):
        answer = infer(transport, gateway, model, feeds, outputs=[output], class_count=2)
        assert_classification(answer.outputs[output], expected, 2, batched=model != "no_batch")


# -- gRPC typed contents (not what tritonclient sends, but part of the protocol) ------------


def _stub(gateway):
    channel = grpc.insecure_channel(gateway.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


_CONTENTS = {
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


def _typed_request(model: str, feeds: dict[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    """Data in the typed ``contents`` fields; BYTES elements without length prefixes."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, arr in feeds.items():
        datatype = np_to_triton_dtype(arr.dtype)
        t = request.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        values = arr.ravel().tolist()
        if datatype == "BYTES":
            values = [v.encode() if isinstance(v, str) else v for v in values]
        getattr(t.contents, _CONTENTS[datatype]).extend(values)
    return request


@pytest.mark.parametrize("model", ["mixed_dtypes", "string", "mlp", "int_types"])
def test_grpc_typed_contents_match_onnxruntime(gateway, zoo_repo, model):
    feeds = zoo_feeds(model, rows=2, seed=3)
    channel, stub = _stub(gateway)
    with channel:
        response = stub.ModelInfer(_typed_request(model, feeds))
    assert len(response.raw_output_contents) == len(response.outputs), "one raw entry per output"
    result = grpcclient.InferResult(response)
    expected = reference(zoo_repo, model, feeds)
    assert sorted(o.name for o in response.outputs) == sorted(expected)
    for name, arr in expected.items():
        assert_tensor_equal(result.as_numpy(name), arr, name)


def test_grpc_fp16_is_raw_only(gateway):
    request = service_pb2.ModelInferRequest(model_name="fp16")
    t = request.inputs.add(name="x", datatype="FP16", shape=[1, 8])
    t.contents.fp32_contents.extend([1.0] * 8)
    channel, stub = _stub(gateway)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw" in err.value.details()


def test_grpc_mixing_contents_and_raw_is_invalid(gateway):
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    a = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    a.contents.fp32_contents.extend([1.0] * 16)
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones(16, dtype=np.float32).tobytes())
    channel, stub = _stub(gateway)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x02\x00\x00\x00ab\x05\x00\x00\x00xy", "element longer than the data"),
        (b"\x02\x00\x00\x00\xff\xfe", "not UTF-8"),
        (b"\x01\x00\x00\x00a\x00", "trailing bytes"),
    ],
)
def test_grpc_malformed_raw_bytes_is_invalid(gateway, raw, why):
    request = service_pb2.ModelInferRequest(model_name="string")
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1] if why != "element longer than the data" else [2, 1])
    request.raw_input_contents.append(raw)
    channel, stub = _stub(gateway)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    assert "text" in err.value.details()


def test_grpc_raw_bool_must_be_0_or_1(gateway):
    request = service_pb2.ModelInferRequest(model_name="mixed_dtypes")
    feeds = zoo_feeds("mixed_dtypes", rows=1)
    for name, arr in feeds.items():
        request.inputs.add(name=name, datatype=np_to_triton_dtype(arr.dtype), shape=list(arr.shape))
        request.raw_input_contents.append(b"\x02" if name == "flag" else arr.tobytes())
    channel, stub = _stub(gateway)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "flag" in err.value.details()


@pytest.mark.parametrize("transport", ["grpc", "http", "http_json"])
def test_wrong_datatype_names_the_input(gateway, transport):
    feeds = {"x": np.zeros((1, 16), dtype=np.float64)}
    with pytest.raises(InferenceServerException) as err:
        infer(transport, gateway, "mlp", feeds)
    assert "'x'" in str(err.value) and "FP32" in str(err.value)
    assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")


# -- non-finite floats (JSON has no NaN/Infinity; Triton and Python's json use the tokens) --


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", ["scaled", "fp16", "mixed_dtypes"])
def test_nonfinite_floats(gateway, zoo_repo, model, transport):
    feeds = zoo_feeds(model, rows=2, seed=1)
    key = "f32" if model == "mixed_dtypes" else "x"
    special = np.array([np.inf, -np.inf, np.nan, 0.5], dtype=feeds[key].dtype)
    feeds[key][0, :4] = special
    if model == "fp16":
        feeds[key][1, :2] = 60000  # finite in, +-inf out (x * 2 overflows FP16)
        feeds[key][1, 1] *= -1
    answer = infer(transport, gateway, model, feeds)
    expected = reference(zoo_repo, model, feeds, 3 if model == "scaled" else 1)
    assert not np.isfinite(next(iter(expected.values()))).all()
    assert_answer_matches(answer, expected)


def test_nonfinite_json_tokens_on_the_wire(gateway):
    body = json_infer_body({"x": np.array([[np.inf, -np.inf, np.nan, 1.0]], dtype=np.float32)})
    assert b"Infinity" in body and b"NaN" in body  # what json.dumps (and tritonclient) sends
    status, _, reply = http_request(gateway, "POST", "/v2/models/scaled/versions/2/infer", body)
    assert status == 200, reply
    data = orjson.loads(reply)["outputs"][0]["data"]  # strict JSON: non-finite values come back as strings
    assert data == ["Infinity", "-Infinity", "NaN", 2.0]


def test_lone_surrogate_in_json_bytes_is_400(gateway):
    body = b'{"inputs":[{"name":"text","shape":[1,1],"datatype":"BYTES","data":["\\ud800"]}]}'
    status, _, reply = http_request(gateway, "POST", "/v2/models/string/infer", body)
    # The whole document is refused as it is parsed (f60d324): a lone surrogate anywhere (an id, a
    # name) would make the reply impossible to encode, so the error names the encoding, not the input.
    assert status == 400 and "surrogates not allowed" in json.loads(reply)["error"]
