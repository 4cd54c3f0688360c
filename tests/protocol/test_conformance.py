"""What clients and test suites the project did not write expect of the V2 protocol: strict
JSON for non-finite floats, Triton's raw binary request, the OIP's health bodies, one answer
(501 / UNIMPLEMENTED naming the extension) for every unsupported extension, and the leniencies
other clients need (an empty typed ``contents`` beside raw contents)."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import sys

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

import modelzoo
from gateway import GatewayProcess
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("conformance") / "repo"
    modelzoo.build_scaled(repo, scale=2.0)
    modelzoo.build_rowwise(repo)
    modelzoo.build_no_batch(repo)
    modelzoo.build_string(repo)
    modelzoo.build_add_sub(repo)
    with GatewayProcess(repo) as g:
        yield g


def post(gw: GatewayProcess, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data


def get(gw: GatewayProcess, path: str) -> tuple[int, dict, bytes]:
    return post(gw, path, None)


# -- 1. non-finite floats are strict JSON ------------------------------------------------------------

def test_nan_and_infinities_in_json_outputs_are_strict_json(gw):
    values = ["NaN", "Infinity", "-Infinity", 1.5]  # a client may send them as strings too
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": values}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": False}}]}).encode()
    status, _, data = post(gw, "/v2/models/scaled/infer", body)
    assert status == 200, data
    doc = orjson.loads(data)  # a strict parser: bare NaN / Infinity tokens would fail here
    assert doc["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 3.0]


def test_tritonclient_reads_non_finite_json_outputs(gw):
    client = httpclient.InferenceServerClient(gw.http_url)
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)  # JSON on the way in: bare NaN tokens (json.dumps)
    out = httpclient.InferRequestedOutput("y", binary_data=False)
    y = client.infer("scaled", [inp], outputs=[out]).as_numpy("y")
    np.testing.assert_array_equal(y, x * 2)


# -- 3. the raw binary request ------------------------------------------------------------------------

RAW = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}


def _binary_outputs(headers: dict, data: bytes) -> tuple[dict, bytes]:
    length = int(headers["inference-header-content-length"])
    return orjson.loads(data[:length]), data[length:]


def test_raw_binary_request_to_a_batching_model_is_a_batch_of_one(gw):
    x = np.arange(4, dtype=np.float32)
    status, headers, data = post(gw, "/v2/models/scaled/infer", x.tobytes(), RAW)
    assert status == 200, data
    doc, tail = _binary_outputs(headers, data)
    assert doc["outputs"][0]["shape"] == [1, 4] and doc["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(np.frombuffer(tail, np.float32), x * 2)


def test_raw_binary_request_fills_the_one_variable_dimension(gw):
    x = np.arange(6, dtype=np.float32)
    status, headers, data = post(gw, "/v2/models/rowwise/infer", x.tobytes(), RAW)
    assert status == 200, data
    doc, _ = _binary_outputs(headers, data)
    assert {o["name"]: o["shape"] for o in doc["outputs"]} == {"y": [1, 6], "s": [1, 1]}
    status, _, data = post(gw, "/v2/models/rowwise/infer", b"\0" * 7, RAW)  # not whole FP32 elements
    assert status == 400 and b"whole number" in data


def test_raw_binary_request_fixed_shape_without_batching(gw):
    x = np.arange(12, dtype=np.float32)
    assert post(gw, "/v2/models/no_batch/infer", x.tobytes(), RAW)[0] == 200
    status, _, data = post(gw, "/v2/models/no_batch/infer", x[:8].tobytes(), RAW)
    assert status == 400, data


def test_raw_binary_request_bytes_and_refusals(gw):
    text = b"hello"
    status, headers, data = post(gw, "/v2/models/string/infer", struct.pack("<I", len(text)) + text, RAW)
    assert status == 200, data
    doc, _ = _binary_outputs(headers, data)
    assert {o["name"] for o in doc["outputs"]} == {"same", "upper"}
    status, _, data = post(gw, "/v2/models/add_sub/infer", b"\0" * 64, RAW)
    assert status == 400 and b"exactly one input" in data


# -- 7. unsupported extensions answer 501 / UNIMPLEMENTED, naming the extension --------------------

@pytest.mark.parametrize(("method", "path", "needle"), [
    ("GET", "/v2/systemsharedmemory/status", b"shared memory"),
    ("POST", "/v2/systemsharedmemory/region/r/register", b"shared memory"),
    ("POST", "/v2/cudasharedmemory/unregister", b"shared memory"),
    ("GET", "/v2/trace/setting", b"trace"),
    ("POST", "/v2/models/scaled/trace/setting", b"trace"),
    ("GET", "/v2/logging", b"logging"),
])
def test_unsupported_http_extensions_are_501(gw, method, path, needle):
    status, _, data = post(gw, path, b"{}" if method == "POST" else None)
    assert status == 501 and needle in json.loads(data)["error"].encode(), data


@pytest.mark.parametrize("where", ["input", "output"])
def test_shared_memory_parameters_are_501_on_http(gw, where):
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 16}
    if where == "input":
        doc["inputs"][0]["parameters"] = shm
    else:
        doc["outputs"] = [{"name": "y", "parameters": shm}]
    status, _, data = post(gw, "/v2/models/scaled/infer", json.dumps(doc).encode())
    assert status == 501 and b"shared memory" in data, data


@pytest.mark.parametrize("where", ["input", "output"])
def test_shared_memory_parameters_are_unimplemented_on_grpc(gw, where):
    request = pb.ModelInferRequest(model_name="scaled")
    inp = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    target = inp if where == "input" else request.outputs.add(name="y")
    target.parameters["shared_memory_region"].string_param = "r"
    with grpc.insecure_channel(gw.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "shared memory" in err.value.details()


def test_unsupported_grpc_methods_name_their_extension(gw):
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.TraceSetting(pb.TraceSettingRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "trace" in err.value.details()


# -- 9. health bodies and lenient contents ---------------------------------------------------------

def test_health_answers_carry_the_oip_bodies(gw):
    assert get(gw, "/v2/health/live")[::2] == (200, b'{"live":true}')
    assert get(gw, "/v2/health/ready")[::2] == (200, b'{"ready":true}')
    status, _, data = get(gw, "/v2/models/scaled/ready")
    assert status == 200 and orjson.loads(data) == {"name": "scaled", "ready": True}


def test_an_empty_typed_contents_beside_raw_contents_is_absent(gw):
    request = pb.ModelInferRequest(model_name="scaled")
    inp = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    inp.contents.SetInParent()  # contents {} on the wire, as MLServer's converter sends
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    with grpc.insecure_channel(gw.grpc_url) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), np.arange(4) * 2)
    inp.contents.fp32_contents.append(1.0)  # contents that hold data still may not be mixed with raw
    with grpc.insecure_channel(gw.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- 8. a busy port at start is one clear line -----------------------------------------------------

@pytest.mark.parametrize("which", ["--grpc-port", "--http-port"])
def test_a_busy_port_fails_the_start_in_one_line(tmp_path, which):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--http-port": "0", "--grpc-port": "0", "--metrics-port": "0", which: str(port)}
        args = [sys.executable, "-m", "onnxgate", "serve", *(x for kv in ports.items() for x in kv)]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("onnxgate: ") and f"127.0.0.1:{port}" in last and "Traceback" not in out.stderr


# -- 4. duplicate requested outputs, 8. Triton's wording for unknown models -------------------------

def test_a_duplicate_requested_output_is_refused_on_both_transports(gw):
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
           "outputs": [{"name": "y"}, {"name": "y"}]}
    status, _, data = post(gw, "/v2/models/scaled/infer", json.dumps(doc).encode())
    assert status == 400 and b"'y' is requested twice" in data, data
    request = pb.ModelInferRequest(model_name="scaled", outputs=[{"name": "y"}, {"name": "y"}])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    with grpc.insecure_channel(gw.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in err.value.details()


@pytest.mark.parametrize(("path", "message"), [
    ("/v2/models/nope", "Request for unknown model: 'nope' is not found"),
    ("/v2/models/scaled/versions/7", "Request for unknown model: 'scaled' version 7 is not found"),
    ("/v2/models/nope/ready", "Request for unknown model: 'nope' is not found"),
])
def test_unknown_models_in_tritons_words(gw, path, message):
    status, _, data = get(gw, path)
    assert status == 404 and json.loads(data)["error"] == message
    with grpc.insecure_channel(gw.grpc_url) as channel:
        parts = path.split("/")
        request = pb.ModelMetadataRequest(name=parts[3], version=parts[5] if len(parts) > 5 else "")
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == message



# -- 6. reshape, 10. schedulers that cannot be served --------------------------------------------

RESHAPED = """
max_batch_size: 8
input [{ name: "x", data_type: TYPE_FP32, dims: [4], reshape: { shape: [2, 2] } }]
output [{ name: "y", data_type: TYPE_FP32, dims: [4], reshape: { shape: [2, 2] } }]
"""


@pytest.fixture(scope="module")
def configs_gw(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("configs") / "repo"
    modelzoo.write_config(modelzoo.build_doubler(repo, "reshaped"), RESHAPED)
    modelzoo.write_config(modelzoo.build_doubler(repo, "bad_reshape"), RESHAPED.replace("[2, 2]", "[4, 1]", 1))
    modelzoo.write_config(modelzoo.build_scaled(repo, "stateful"), "sequence_batching { }\n")
    modelzoo.write_config(modelzoo.build_scaled(repo, "ensemble"), "ensemble_scheduling { }\n")
    with GatewayProcess(repo) as g:
        yield g


def test_reshape_clients_see_dims_onnx_runtime_sees_the_reshape(configs_gw):
    meta = orjson.loads(get(configs_gw, "/v2/models/reshaped")[2])
    assert meta["inputs"][0]["shape"] == [-1, 4] and meta["outputs"][0]["shape"] == [-1, 4]
    client = httpclient.InferenceServerClient(configs_gw.http_url)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    inp = httpclient.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer("reshaped", [inp]).as_numpy("y")
    np.testing.assert_array_equal(y, x * 2)  # shape [3, 4] back, as the config's dims say
    with grpc.insecure_channel(configs_gw.grpc_url) as channel:
        request = pb.ModelInferRequest(model_name="reshaped")
        request.inputs.add(name="x", datatype="FP32", shape=[3, 4])
        request.raw_input_contents.append(x.tobytes())
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert list(reply.outputs[0].shape) == [3, 4]
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(3, 4), x * 2)


@pytest.mark.parametrize(("model", "reason"), [
    ("bad_reshape", "reshape [4, 1], the model has [2, 2]"),
    ("stateful", "sequence_batching is not supported"),
    ("ensemble", "ensemble_scheduling is not supported"),
])
def test_models_that_cannot_be_served_as_configured_are_refused(configs_gw, model, reason):
    index = orjson.loads(post(configs_gw, "/v2/repository/index", b"{}")[2])
    row = next(r for r in index if r["name"] == model)
    assert row["state"] == "UNAVAILABLE" and reason in row["reason"], row
    assert get(configs_gw, f"/v2/models/{model}/ready")[0] != 200
