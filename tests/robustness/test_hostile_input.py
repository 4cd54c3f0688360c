"""Malformed and hostile client input: always a 4xx / client status with a short message, never
a 500 or a traceback, never an unbounded metric label; the gateway keeps serving."""

from __future__ import annotations

import http.client
import json
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

HUGE_SHAPE = [0, 4611686018427387904, 4611686018427387904]
MAX_MESSAGE = 2048


def _http(gw, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, data


def _stub(gw) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url))


def _grpc_code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _mlp_body(shape=(1, 16)) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32", "data": [0.0] * int(np.prod(shape))}]}
    ).encode()


@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A3", "9" * 5000, "-1", "1.0"])
def test_a_version_that_is_not_ascii_digits_is_not_found(gateway, version):
    status, body = _http(gateway, "POST", f"/v2/models/mlp/versions/{version}/infer", _mlp_body())
    assert status == 404, body
    status, body = _http(gateway, "GET", f"/v2/models/mlp/versions/{version}")
    assert status == 404, body
    for raw in ("²", "٣", "9" * 5000):
        req = pb.ModelMetadataRequest(name="mlp", version=raw)
        code, details = _grpc_code(lambda req=req: _stub(gateway).ModelMetadata(req))
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert len(details) <= MAX_MESSAGE


def test_shapes_no_array_can_have_are_invalid(gateway):
    doc = {"inputs": [{"name": "x", "shape": HUGE_SHAPE, "datatype": "FP32", "data": []}]}
    status, body = _http(gateway, "POST", "/v2/models/mlp/infer", json.dumps(doc).encode())
    assert status == 400, body
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": HUGE_SHAPE, "datatype": "FP32", "parameters": {"binary_data_size": 0}}]}
    ).encode()
    status, body = _http(
        gateway, "POST", "/v2/models/mlp/infer", header, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 400, body
    for contents in (None, pb.InferTensorContents()):
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=HUGE_SHAPE)
        if contents is not None:
            tensor.contents.CopyFrom(contents)
        req = pb.ModelInferRequest(model_name="mlp", inputs=[tensor])
        if contents is None:
            req.raw_input_contents.append(b"")
        code, details = _grpc_code(lambda req=req: _stub(gateway).ModelInfer(req))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def test_over_long_names_get_short_errors(gateway):
    long_name = "m" * 200_000
    req = pb.ModelInferRequest(
        model_name=long_name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[bytes(64)],
    )
    code, details = _grpc_code(lambda: _stub(gateway).ModelInfer(req))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) <= MAX_MESSAGE
    req = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="i" * 200_000, datatype="FP32", shape=[1, 16])],
        raw_input_contents=[bytes(64)],
    )
    code, details = _grpc_code(lambda: _stub(gateway).ModelInfer(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) <= MAX_MESSAGE
    body = json.dumps(
        {"inputs": [{"name": "i" * 200_000, "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
    ).encode()
    status, reply = _http(gateway, "POST", "/v2/models/mlp/infer", body)
    assert status == 400 and len(json.loads(reply)["error"]) <= MAX_MESSAGE


def test_unknown_model_names_never_become_metric_labels(gateway):
    for i in range(100):
        _http(gateway, "POST", f"/v2/models/no_such_model_{i}/infer", _mlp_body())
        req = pb.ModelInferRequest(model_name=f"no_such_grpc_model_{i}")
        _grpc_code(lambda req=req: _stub(gateway).ModelInfer(req))
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    assert "no_such_" not in text
    status, index = _http(gateway, "POST", "/v2/repository/index")
    assert status == 200
    known = {m["name"] for m in json.loads(index)} | {""}
    labels = {
        s.labels["model"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "model" in s.labels
    }
    assert labels <= known, labels - known
    unknown = [
        s
        for family in text_string_to_metric_families(text)
        if family.name == "onnxgate_requests"
        for s in family.samples
        if s.labels["model"] == "" and s.name == "onnxgate_requests_total"
    ]
    assert {s.labels["protocol"] for s in unknown} == {"http", "grpc"}
    assert all(s.labels["outcome"] == "not_found" for s in unknown)
    assert sum(s.value for s in unknown) >= 200


def test_the_gateway_still_serves_and_logged_no_traceback(gateway):
    status, body = _http(gateway, "POST", "/v2/models/mlp/infer", _mlp_body())
    assert status == 200, body
    assert "Traceback" not in gateway.log, gateway.log[-5000:]


def test_unknown_names_leave_nothing_behind_in_the_control_plane(tmp_path):
    """Load and unload calls for names the repository lacks are 404s that keep no state: each
    used to leave a lock behind (keyed by the name), so a client could grow the gateway at will."""
    import modelzoo
    import swap_helpers as sh
    from gateway import GatewayProcess

    modelzoo.build_mlp(tmp_path / "repo")
    with GatewayProcess(tmp_path / "repo", ["--model-control-mode", "explicit"]) as gw:
        conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)

        def call(path: str) -> int:
            conn.request("POST", path, body=b"{}")
            reply = conn.getresponse()
            reply.read()
            return reply.status

        call("/v2/repository/models/warm-up/unload")
        before = sh.rss_mb(gw)
        for i in range(1500):  # 1500 names of 20 KB: 30 MB if each is kept
            assert call(f"/v2/repository/models/{'n' * 20000}{i}/{'load' if i % 2 else 'unload'}") == 404
        assert sh.rss_mb(gw) < before + 15, (before, sh.rss_mb(gw))
        conn.close()
