"""Every kind of bad inference request, over tritonclient gRPC and HTTP and over raw wire calls.

Each bad request must get the right status (HTTP 400/404/405/501/503 with a JSON ``{"error": ...}``
body; gRPC INVALID_ARGUMENT/NOT_FOUND/UNAVAILABLE) and a message that names the input and says
what was expected and what came. After every bad request the gateway must still answer a good one.
"""

from __future__ import annotations

import gzip
import http.client
import json
import random
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelzoo import reference_run
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
F32 = np.ones((1, 16), np.float32)
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module")
def env(gateway, zoo_repo):
    """Clients, a raw gRPC stub and the expected answer of the known-good request."""
    channel = grpc.insecure_channel(gateway.grpc_url)
    yield {
        "gw": gateway,
        "repo": zoo_repo,
        "http": httpclient.InferenceServerClient(gateway.http_url),
        "grpc": grpcclient.InferenceServerClient(gateway.grpc_url),
        "stub": pb_grpc.GRPCInferenceServiceStub(channel),
        "channel": channel,
        "want": reference_run(zoo_repo / "mlp" / "1" / "model.onnx", {"x": X})["y"],
    }
    channel.close()


def assert_serving(env) -> None:
    """The known-good request still works on both protocols (and the process is alive)."""
    assert env["gw"].proc.poll() is None, f"gateway died:\n{env['gw'].log[-3000:]}"
    for mod, client in ((httpclient, env["http"]), (grpcclient, env["grpc"])):
        inp = mod.InferInput("x", [2, 16], "FP32")
        inp.set_data_from_numpy(X)
        got = client.infer("mlp", [inp]).as_numpy("y")
        np.testing.assert_allclose(got, env["want"], rtol=1e-5, atol=1e-6)


def _check_message(msg: str, needles) -> None:
    for needle in needles:
        assert needle in msg, f"error message {msg!r} does not mention {needle!r}"


def client_infer(mod, client, model, tensors, outputs=None, version=""):
    inputs = []
    for name, datatype, arr in tensors:
        inp = mod.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    outs = [mod.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, inputs, model_version=version, outputs=outs)


def expect_client_error(env, status, needles, model, tensors, outputs=None, version=""):
    """The same request over tritonclient HTTP and gRPC: both fail with ``status``, then serve."""
    for mod, client, want in ((httpclient, env["http"], str(status)), (grpcclient, env["grpc"], str(CODES[status]))):
        with pytest.raises(InferenceServerException) as info:
            client_infer(mod, client, model, tensors, outputs, version)
        assert info.value.status() == want, f"{mod.__name__}: {info.value}"
        _check_message(info.value.message(), needles)
        assert_serving(env)


def _t(name, datatype, arr):
    return (name, datatype, arr)


CLIENT_CASES = {
    "unknown_input": ("mlp", [_t("x", "FP32", F32), _t("z", "FP32", F32)], None, "", 400, ["'z'", "['x']"]),
    "missing_input": ("add_sub", [_t("INPUT0", "FP32", F32)], None, "", 400, ["INPUT1"]),
    "wrong_datatype": ("mlp", [_t("x", "FP64", F32.astype(np.float64))], None, "", 400, ["'x'", "FP32", "FP64"]),
    "wrong_rank": ("mlp", [_t("x", "FP32", np.ones(16, np.float32))], None, "", 400, ["'x'", "[-1, 16]", "[16]"]),
    "wrong_fixed_dim": ("mlp", [_t("x", "FP32", np.ones((1, 15), np.float32))], None, "", 400, ["[-1, 16]", "[1, 15]"]),
    "wrong_fixed_dim_no_batch": (
        "no_batch", [_t("x", "FP32", np.ones((3, 5), np.float32))], None, "", 400, ["'x'", "[3, 4]", "[3, 5]"],
    ),
    "batch_over_max": ("mlp", [_t("x", "FP32", np.ones((257, 16), np.float32))], None, "", 400, ["'x'", "257", "256"]),
    "batch_dims_disagree": (
        "add_sub",
        [_t("INPUT0", "FP32", F32), _t("INPUT1", "FP32", np.ones((2, 16), np.float32))],
        None, "", 400, ["INPUT1", "2", "1"],
    ),
    "bytes_not_utf8": (
        "string", [_t("text", "BYTES", np.array([[b"ok"], [b"\xff\xfe"]], dtype=object))], None, "", 400,
        ["'text'", "UTF-8", "element 1"],
    ),
    "unknown_output": ("mlp", [_t("x", "FP32", F32)], ["nope"], "", 400, ["'nope'", "['y']"]),
    "unknown_model": ("no_such_model", [_t("x", "FP32", F32)], None, "", 404, ["no_such_model"]),
    "unknown_version": ("mlp", [_t("x", "FP32", F32)], None, "7", 404, ["7", "mlp"]),
    "non_numeric_version": ("mlp", [_t("x", "FP32", F32)], None, "abc", 404, ["'abc'", "integer"]),
}


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_bad_request_through_tritonclient(env, case):
    model, tensors, outputs, version, status, needles = CLIENT_CASES[case]
    expect_client_error(env, status, needles, model, tensors, outputs, version)


def test_broken_model_is_unavailable_with_its_load_reason(env):
    rows = {(m["name"], m.get("version", "")): m for m in env["http"].get_model_repository_index()}
    reason = rows[("broken", "1")]["reason"]
    assert rows[("broken", "1")]["state"] == "UNAVAILABLE" and reason
    expect_client_error(env, 503, ["broken", reason], "broken", [_t("x", "FP32", F32)])


# -- gRPC requests tritonclient would never build -----------------------------------------------


F32_RAW = F32.tobytes()


def _raw_request(model="mlp", inputs=(("x", "FP32", [1, 16]),), raw=(F32_RAW,)) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.extend(raw)
    return req


def expect_grpc_error(env, request, code, needles) -> None:
    with pytest.raises(grpc.RpcError) as info:
        env["stub"].ModelInfer(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    _check_message(info.value.details(), needles)
    assert_serving(env)


def _mixed_request():
    req = _raw_request("add_sub", (("INPUT0", "FP32", [1, 16]), ("INPUT1", "FP32", [1, 16])), (F32.tobytes(),))
    req.inputs[1].contents.fp32_contents.extend(F32.ravel().tolist())
    return req


def _contents_request(model, count):
    req = _raw_request(model, (("x", "FP32", [1, 16]),), ())
    req.inputs[0].contents.fp32_contents.extend([1.0] * count)
    return req


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
UNAVAILABLE, UNKNOWN = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN
GRPC_CASES = {
    "raw_too_short": (lambda: _raw_request(raw=(F32.tobytes()[:60],)), ["'x'", "64", "60"]),
    "raw_too_long": (lambda: _raw_request(raw=(F32.tobytes() + b"\0" * 4,)), ["'x'", "64", "68"]),
    "more_raw_than_inputs": (lambda: _raw_request(raw=(F32_RAW, F32_RAW)), ["raw_input_contents", "1 inputs", "got 2"]),
    "fewer_raw_than_inputs": (
        lambda: _raw_request("add_sub", (("INPUT0", "FP32", [1, 16]), ("INPUT1", "FP32", [1, 16]))),
        ["raw_input_contents", "2 inputs", "got 1"],
    ),
    "mixing_contents_and_raw": (_mixed_request, ["INPUT1", "mixed"]),
    "contents_wrong_count": (lambda: _contents_request("mlp", 15), ["'x'", "16", "15"]),
    "no_data_at_all": (lambda: _raw_request(raw=()), ["'x'", "no data"]),
    "unknown_datatype": (lambda: _raw_request(inputs=(("x", "FLOAT", [1, 16]),)), ["'x'", "FLOAT"]),
    "too_many_dims": (lambda: _raw_request(inputs=(("x", "FP32", [1] * 100),), raw=(b"\0" * 4,)), ["'x'", "100"]),
    "bytes_shape_beyond_data": (
        lambda: _raw_request("string", (("text", "BYTES", [10**12, 1]),), (b"\0" * 4,)), ["'text'", "bytes"],
    ),
    "bytes_not_utf8_raw": (
        lambda: _raw_request("string", (("text", "BYTES", [1, 1]),), (struct.pack("<I", 2) + b"\xc3\x28",)),
        ["'text'", "UTF-8"],
    ),
}


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_bad_raw_grpc_request(env, case):
    build, needles = GRPC_CASES[case]
    expect_grpc_error(env, build(), INVALID, needles)


def test_typed_contents_inputs_work_and_match_onnxruntime(env, zoo_repo):
    feeds = {
        "f32": np.arange(8, dtype=np.float32).reshape(2, 4) / 3,
        "i64": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        "flag": np.array([[True], [False]]),
        "u8": np.array([[0, 7, 255], [1, 2, 3]], dtype=np.uint8),
    }
    fields = {"f32": ("FP32", "fp32_contents"), "i64": ("INT64", "int64_contents"),
              "flag": ("BOOL", "bool_contents"), "u8": ("UINT8", "uint_contents")}
    req = pb.ModelInferRequest(model_name="mixed_dtypes")
    for name, arr in feeds.items():
        datatype, field = fields[name]
        t = req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        getattr(t.contents, field).extend(arr.ravel().tolist())
    reply = env["stub"].ModelInfer(req, timeout=10)
    want = reference_run(zoo_repo / "mixed_dtypes" / "1" / "model.onnx", feeds)
    assert len(reply.raw_output_contents) == len(reply.outputs) == len(want)
    for out, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        ref = want[out.name]
        got = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<")).reshape(out.shape)
        np.testing.assert_array_equal(got, ref, err_msg=out.name)
    texts = pb.ModelInferRequest(model_name="string")
    texts.inputs.add(name="text", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend([b"ab", "é".encode()])
    reply = env["stub"].ModelInfer(texts, timeout=10)
    upper = reply.raw_output_contents[[o.name for o in reply.outputs].index("upper")]
    assert upper == struct.pack("<I", 2) + b"AB" + struct.pack("<I", 2) + "é".encode()
    assert_serving(env)


# -- HTTP requests tritonclient would never send --------------------------------------------------


def raw_http(env, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", env["gw"].http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.getheaders(), reply.read()
    finally:
        conn.close()


def expect_http_error(env, status, needles, method, path, body=b"", headers=None):
    got, headers_out, data = raw_http(env, method, path, body, headers)
    assert got == status, f"{method} {path}: {got} {data[:300]!r}"
    types = [v for k, v in headers_out if k.lower() == "content-type"]
    assert types == ["application/json"], f"content-type headers: {types}"
    doc = json.loads(data)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
    _check_message(doc["error"], needles)
    assert_serving(env)
    return dict((k.lower(), v) for k, v in headers_out)


def _binary(doc, tail, header_length=None):
    js = json.dumps(doc).encode()
    return js + tail, {"Inference-Header-Content-Length": str(len(js) if header_length is None else header_length)}


def _x(**fields):
    return {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", **fields}]}


INFER = "/v2/models/mlp/infer"
HTTP_CASES = {
    "malformed_json": (b'{"inputs": [{"name": "x", ', {}, ["malformed"]),
    "empty_body": (b"", {}, ["malformed"]),
    "json_not_object": (b"[1, 2]", {}, ["JSON object"]),
    "json_too_few_elements": (json.dumps(_x(data=[0.5] * 15)).encode(), {}, ["'x'", "16", "15"]),
    "json_too_many_elements": (json.dumps(_x(data=[0.5] * 17)).encode(), {}, ["'x'", "16", "17"]),
    "json_not_numbers": (json.dumps(_x(data=["a"] * 16)).encode(), {}, ["'x'", "FP32"]),
    "datatype_not_a_string": (json.dumps(_x(datatype=["FP32"], data=[0] * 16)).encode(), {}, ["'x'", "datatype"]),
    "shape_negative": (json.dumps({"inputs": [{"name": "x", "shape": [-1, 16], "datatype": "FP32"}]}).encode(), {},
                       ["'x'", "shape"]),
    "outputs_not_a_list": (json.dumps({**_x(data=[0] * 16), "outputs": 5}).encode(), {}, ["outputs"]),
    "binary_beyond_body": (*_binary(_x(parameters={"binary_data_size": 64}), F32.tobytes()[:60]),
                           ["'x'", "binary_data_size 64", "60"]),
    "binary_size_not_int": (*_binary(_x(parameters={"binary_data_size": "64"}), F32.tobytes()), ["'x'", "'64'"]),
    "binary_wrong_length_for_shape": (*_binary(_x(parameters={"binary_data_size": 60}), F32.tobytes()[:60]),
                                      ["'x'", "64", "60"]),
    "binary_unclaimed_bytes": (*_binary(_x(data=[0] * 16), b"\0" * 8), ["8 bytes"]),
    "header_length_not_int": (*_binary(_x(data=[0] * 16), b"", "abc"), ["Inference-Header-Content-Length", "abc"]),
    "header_length_beyond_body": (*_binary(_x(data=[0] * 16), b"", 10_000), ["10000", "does not fit"]),
    "header_length_negative": (*_binary(_x(data=[0] * 16), b"", -1), ["-1"]),
    "too_many_dims": (*_binary({"inputs": [{"name": "x", "shape": [1] * 100, "datatype": "FP32",
                                            "parameters": {"binary_data_size": 4}}]}, b"\0" * 4), ["'x'", "100"]),
    "gzip_garbage": (b"not gzip at all", {"Content-Encoding": "gzip"}, ["gzip"]),
}


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_bad_raw_http_infer(env, case):
    body, headers, needles = HTTP_CASES[case]
    expect_http_error(env, 400, needles, "POST", INFER, body, headers)


def test_http_bytes_shape_beyond_data_is_rejected_without_allocating(env):
    doc = {"inputs": [{"name": "text", "shape": [10**12, 1], "datatype": "BYTES",
                       "parameters": {"binary_data_size": 4}}]}
    body, headers = _binary(doc, b"\0" * 4)
    expect_http_error(env, 400, ["'text'", "4"], "POST", "/v2/models/string/infer", body, headers)


def test_gzip_body_is_accepted(env):
    body = gzip.compress(json.dumps({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                                 "data": X.ravel().tolist()}]}).encode())
    status, _, data = raw_http(env, "POST", INFER, body, {"Content-Encoding": "gzip"})
    assert status == 200, data
    got = np.array(json.loads(data)["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, env["want"], rtol=1e-5, atol=1e-6)


def test_unsupported_content_encoding_is_501(env):
    body = json.dumps(_x(data=[0] * 16)).encode()
    headers = expect_http_error(env, 501, ["br", "gzip"], "POST", INFER, body, {"Content-Encoding": "br"})
    assert "gzip" in headers.get("accept-encoding", ""), headers


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", INFER, "POST"), ("PUT", INFER, "POST"), ("POST", "/v2/health/ready", "GET"),
     ("DELETE", "/v2/models/mlp", "GET"), ("GET", "/v2/repository/index", "POST")],
)
def test_wrong_http_method_is_405(env, method, path, allowed):
    headers = expect_http_error(env, 405, [method, allowed], method, path, b"{}" if method != "GET" else b"")
    assert headers.get("allow") == allowed


@pytest.mark.parametrize("path", ["/", "/nope", "/v1/models/mlp", "/v2/nope", "/v2/models/mlp/bogus",
                                  "/v2/models/mlp/versions/1/bogus", "/v2/health/alive"])
def test_unknown_path_is_404(env, path):
    expect_http_error(env, 404, [], "GET", path)


# -- garbage -------------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.5 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind < 0.7 and buf:
            del buf[rng.randrange(len(buf)) :]
        else:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(buf)


def test_garbage_never_crashes_or_500s(env):
    rng = random.Random(20240607)
    good_json = json.dumps({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                        "data": X.ravel().tolist()}], "outputs": [{"name": "y"}]}).encode()
    good_bin, _ = _binary(_x(parameters={"binary_data_size": 64}), F32.tobytes())
    http_statuses = set()
    conn = http.client.HTTPConnection("127.0.0.1", env["gw"].http_port, timeout=10)
    for i in range(200):
        body = rng.randbytes(rng.randint(0, 300)) if i % 4 == 0 else _mutate(rng, rng.choice([good_json, good_bin]))
        headers = {}
        if rng.random() < 0.5:
            headers["Inference-Header-Content-Length"] = str(rng.randint(-5, len(body) + 5))
        conn.request("POST", rng.choice([INFER, "/v2/models/string/infer", "/v2/models/add_sub/infer"]), body, headers)
        reply = conn.getresponse()
        data = reply.read()
        http_statuses.add(reply.status)
        assert reply.status in (200, 400, 404), f"HTTP garbage #{i} got {reply.status}: {data[:300]!r}"
        if reply.status != 200:
            assert isinstance(json.loads(data)["error"], str)
    conn.close()

    call = env["channel"].unary_unary("/inference.GRPCInferenceService/ModelInfer")  # identity (de)serializers
    good = _raw_request(raw=(X[:1].tobytes(),))
    good.outputs.add(name="y")
    seeds = [m.SerializeToString() for m in (good, _contents_request("mlp", 16), _mixed_request())]
    codes = set()
    for i in range(200):
        msg = rng.randbytes(rng.randint(0, 300)) if i % 4 == 0 else _mutate(rng, rng.choice(seeds))
        try:
            call(msg, timeout=10)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.add(exc.code())
            assert "internal error" not in exc.details(), f"gRPC garbage #{i}: unhandled error: {exc.details()}"
            # A message that does not even parse is INVALID_ARGUMENT too, never UNKNOWN.
            assert exc.code() in (INVALID, NOT_FOUND, UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED), exc
    assert INVALID in codes and 400 in http_statuses, (codes, http_statuses)
    assert_serving(env)
