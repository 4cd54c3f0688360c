"""Every endpoint of the endpoint table x (no token, a token without its scope, a token with it),
on both transports, against a real gateway with tokens configured.

The request for each endpoint is declared below; a test fails when the table has an endpoint
(an HTTP route or a gRPC method) this module has no request for, so a new endpoint cannot
arrive untested.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.frontends.endpoints import ENDPOINTS
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

TOKENS = {"infer": "tok-infer-0123", "read": "tok-read-4567", "admin": "tok-admin-89ab", "all": "tok-all-cdef"}
SCOPES = {"infer": ["infer"], "read": ["read"], "admin": ["admin"], "all": ["infer", "read", "admin"]}
X = np.arange(4, dtype=np.float32).reshape(1, 4)
ROUTE = {"split": [{"target": "scaled", "weight": 1}]}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scopes")
    repo = root / "repo"
    for name in ("scaled", "victim", "spare"):
        modelzoo.build_scaled(repo, name)
    config = {
        "routes": [{"name": "r1", **ROUTE},
                   {"name": "ro", **ROUTE, "rollout": {"candidate": "spare", "gates": {"agreement_min": 0.99}}}],
        "security": {
            "tokens": [{"name": n, "sha256": sha(t), "scopes": SCOPES[n]} for n, t in TOKENS.items()],
            "audit_log": str(root / "audit.jsonl"),
            "auth_failures_per_minute": 1_000_000,  # this module fails on purpose, many times
        },
    }
    (root / "gateway.yaml").write_text(json.dumps(config))
    args = ["--config", str(root / "gateway.yaml"), "--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, args) as g:
        g.audit_path = root / "audit.jsonl"
        yield g


# -- the requests --------------------------------------------------------------------------------

_INFER_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X.ravel().tolist()}]})

# (method, template) -> (concrete path, body, status of a successful call)
HTTP = {
    ("GET", "/v2/health/live"): ("/v2/health/live", "", 200),
    ("GET", "/v2/health/ready"): ("/v2/health/ready", "", 200),
    ("GET", "/v2"): ("/v2", "", 200),
    ("GET", "/v2/openapi.json"): ("/v2/openapi.json", "", 200),
    ("GET", "/v2/models/{model}"): ("/v2/models/scaled", "", 200),
    ("GET", "/v2/models/{model}/versions/{version}"): ("/v2/models/scaled/versions/1", "", 200),
    ("GET", "/v2/models/{model}/ready"): ("/v2/models/scaled/ready", "", 200),
    ("GET", "/v2/models/{model}/versions/{version}/ready"): ("/v2/models/scaled/versions/1/ready", "", 200),
    ("GET", "/v2/models/{model}/config"): ("/v2/models/scaled/config", "", 200),
    ("GET", "/v2/models/{model}/versions/{version}/config"): ("/v2/models/scaled/versions/1/config", "", 200),
    ("POST", "/v2/models/{model}/infer"): ("/v2/models/scaled/infer", _INFER_BODY, 200),
    ("POST", "/v2/models/{model}/versions/{version}/infer"): ("/v2/models/scaled/versions/1/infer", _INFER_BODY, 200),
    ("GET", "/v2/models/stats"): ("/v2/models/stats", "", 200),
    ("GET", "/v2/models/{model}/stats"): ("/v2/models/scaled/stats", "", 200),
    ("GET", "/v2/models/{model}/versions/{version}/stats"): ("/v2/models/scaled/versions/1/stats", "", 200),
    ("POST", "/v2/repository/index"): ("/v2/repository/index", "{}", 200),
    ("POST", "/v2/repository/models/{model}/load"): ("/v2/repository/models/spare/load", "{}", 200),
    ("POST", "/v2/repository/models/{model}/unload"): ("/v2/repository/models/victim/unload", "{}", 200),
    ("GET", "/v2/models/summary"): ("/v2/models/summary", "", 200),
    ("GET", "/console"): ("/console", "", 200),
    ("GET", "/console/{file}"): ("/console/app.js", "", 200),
    ("GET", "/v2/routes"): ("/v2/routes", "", 200),
    ("GET", "/v2/routes/{route}"): ("/v2/routes/r1", "", 200),
    ("PUT", "/v2/routes/{route}"): ("/v2/routes/r2", json.dumps(ROUTE), 200),
    ("DELETE", "/v2/routes/{route}"): ("/v2/routes/doomed", "", 200),
    ("GET", "/v2/routes/{route}/comparison"): ("/v2/routes/r1/comparison", "", 200),
    ("GET", "/v2/routes/{route}/rollout"): ("/v2/routes/ro/rollout", "", 200),
    ("GET", "/v2/drift/{model}/report"): ("/v2/drift/scaled/report", "", 503),  # no drift configured here
    ("POST", "/v2/routes/{route}/rollout/{action}"): ("/v2/routes/ro/rollout/pause", '{"reason": "scopes"}', 200),
    **{("GET", f"/v2/{k}sharedmemory{p}/status"): (f"/v2/{k}sharedmemory{p.replace('{region}', 'r')}/status", "", 501)
       for k in ("system", "cuda") for p in ("", "/region/{region}")},
    **{("POST", f"/v2/{k}sharedmemory{p}"): (f"/v2/{k}sharedmemory{p.replace('{region}', 'r')}", "{}", 501)
       for k in ("system", "cuda")
       for p in ("/region/{region}/register", "/region/{region}/unregister", "/unregister")},
    **{(m, p): (p.replace("{model}", "scaled"), "{}" if m == "POST" else "", 501)
       for m in ("GET", "POST") for p in ("/v2/trace/setting", "/v2/models/{model}/trace/setting", "/v2/logging")},
}

_INFER = pb.ModelInferRequest(model_name="scaled", inputs=[
    pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4],
                                          contents=pb.InferTensorContents(fp32_contents=X.ravel().tolist()))])
# method -> (request, whether a successful call is UNIMPLEMENTED)
GRPC = {
    "ServerLive": (pb.ServerLiveRequest(), False),
    "ServerReady": (pb.ServerReadyRequest(), False),
    "ServerMetadata": (pb.ServerMetadataRequest(), False),
    "ModelMetadata": (pb.ModelMetadataRequest(name="scaled"), False),
    "ModelReady": (pb.ModelReadyRequest(name="scaled"), False),
    "ModelConfig": (pb.ModelConfigRequest(name="scaled"), False),
    "ModelInfer": (_INFER, False),
    "ModelStreamInfer": (_INFER, False),
    "ModelStatistics": (pb.ModelStatisticsRequest(name="scaled"), False),
    "RepositoryIndex": (pb.RepositoryIndexRequest(), False),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest(model_name="spare"), False),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest(model_name="victim"), False),
    "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest(), True),
    "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest(name="r"), True),
    "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest(name="r"), True),
    "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest(), True),
    "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest(name="r"), True),
    "CudaSharedMemoryUnregister": (pb.CudaSharedMemoryUnregisterRequest(name="r"), True),
    "TraceSetting": (pb.TraceSettingRequest(), True),
    "LogSettings": (pb.LogSettingsRequest(), True),
    "Check": (health_pb2.HealthCheckRequest(), False),
    "Watch": (health_pb2.HealthCheckRequest(), True),
}

# A token that does not have the endpoint's scope; None for public endpoints.
WRONG = {"public": None, "infer": "admin", "read": "infer", "admin": "read"}
RIGHT = {"public": None, "infer": "infer", "read": "read", "admin": "admin"}

HTTP_CASES = [(e, m, p) for e in ENDPOINTS for m, p in e.http]
GRPC_CASES = [(e, m) for e in ENDPOINTS for m in e.grpc]
WHO = ("none", "wrong", "right")  # a public endpoint has no wrong scope
HTTP_CALLS = [(e, m, p, w) for e, m, p in HTTP_CASES for w in WHO if not (w == "wrong" and e.scope == "public")]
GRPC_CALLS = [(e, m, w) for e, m in GRPC_CASES for w in WHO if not (w == "wrong" and e.scope == "public")]


def test_every_endpoint_has_a_request_here():
    assert {(m, p) for _, m, p in HTTP_CASES} == set(HTTP)
    assert {m for _, m in GRPC_CASES} == set(GRPC)
    descriptor = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {m.name for m in descriptor.methods} <= set(GRPC)  # every method of the service is declared


def _setup(gw: GatewayProcess, name: str) -> None:
    """Make a state-changing call repeatable: what it removes exists first (with the admin token)."""
    if name == "routes.delete":
        assert _http(gw, "PUT", "/v2/routes/doomed", json.dumps(ROUTE), TOKENS["admin"])[0] == 200
    if name == "repository.unload":
        assert _http(gw, "POST", "/v2/repository/models/victim/load", "{}", TOKENS["admin"])[0] == 200
    if name == "routes.rollout_action":  # running again, so that it can be paused (409 when it runs already)
        assert _http(gw, "POST", "/v2/routes/ro/rollout/resume", "", TOKENS["admin"])[0] in (200, 409)


def _http(gw: GatewayProcess, method: str, path: str, body: str, token: str | None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body.encode() or None, headers=headers)
    reply = conn.getresponse()
    text = reply.read().decode()
    conn.close()
    return reply.status, text


@pytest.mark.parametrize(("endpoint", "method", "template", "who"), HTTP_CALLS,
                         ids=[f"{m} {p} {w}" for _, m, p, w in HTTP_CALLS])
def test_http_scopes(gw, endpoint, method, template, who):
    path, body, ok = HTTP[(method, template)]
    token = None if who == "none" else TOKENS[(WRONG if who == "wrong" else RIGHT)[endpoint.scope] or "all"]
    _setup(gw, endpoint.name)
    status, text = _http(gw, method, path, body, token)
    if endpoint.scope == "public" or who == "right":
        assert status == ok, text
    elif who == "none":
        assert status == 401 and "token" in json.loads(text)["error"], text
    else:
        assert status == 403 and endpoint.scope in json.loads(text)["error"], text


def _grpc(gw: GatewayProcess, method: str, token: str | None) -> grpc.StatusCode:
    request, _ = GRPC[method]
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(gw.grpc_url) as channel:
        try:
            if method in ("Check", "Watch"):
                stub = health_pb2_grpc.HealthStub(channel)
                call = getattr(stub, method)(request, metadata=metadata, timeout=30)
                if method == "Watch":
                    next(iter(call))
            elif method == "ModelStreamInfer":
                replies = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                    iter([request]), metadata=metadata, timeout=30)
                reply = next(iter(replies))
                assert not reply.error_message, reply.error_message
            else:
                getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("endpoint", "method", "who"), GRPC_CALLS, ids=[f"{m} {w}" for _, m, w in GRPC_CALLS])
def test_grpc_scopes(gw, endpoint, method, who):
    token = None if who == "none" else TOKENS[(WRONG if who == "wrong" else RIGHT)[endpoint.scope] or "all"]
    _setup(gw, endpoint.name)
    code = _grpc(gw, method, token)
    if endpoint.scope == "public" or who == "right":
        assert code == (grpc.StatusCode.UNIMPLEMENTED if GRPC[method][1] else grpc.StatusCode.OK)
    elif who == "none":
        assert code == grpc.StatusCode.UNAUTHENTICATED
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_read_opens_what_infer_may_read_but_not_infer(gw):
    assert _http(gw, "GET", "/v2/models/scaled", "", TOKENS["read"])[0] == 200
    assert _http(gw, "POST", "/v2/models/scaled/infer", _INFER_BODY, TOKENS["read"])[0] == 403
    assert _grpc(gw, "ModelInfer", TOKENS["read"]) == grpc.StatusCode.PERMISSION_DENIED
    assert _grpc(gw, "ModelConfig", TOKENS["read"]) == grpc.StatusCode.OK


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Basic dG9rOng=", f"Token {TOKENS['all']}",
                                    f"Bearer {TOKENS['all']}x", f"Bearer {TOKENS['all'][:-1]}"])
def test_malformed_or_near_miss_tokens_are_401(gw, header):
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request("GET", "/v2/models/scaled", headers={"Authorization": header})
    reply = conn.getresponse()
    assert reply.status == 401 and reply.getheader("WWW-Authenticate") == "Bearer", reply.read()


def test_admin_actions_are_audited_without_the_token(gw):
    assert _http(gw, "PUT", "/v2/routes/audited", json.dumps(ROUTE), TOKENS["admin"])[0] == 200
    assert _http(gw, "DELETE", "/v2/routes/audited", "", TOKENS["read"])[0] == 403
    assert _grpc(gw, "RepositoryModelLoad", TOKENS["all"]) == grpc.StatusCode.OK

    def records() -> list[dict]:
        path: Path = gw.audit_path
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    assert wait_until(lambda: any(r["target"] == "spare" and r["token"] == "all" for r in records()))
    by = {(r["action"], r["target"], r["token"]): r for r in records()}
    put = by[("routes.put", "audited", "admin")]
    assert put["result"] == "ok" and put["peer"] == "127.0.0.1" and put["time"].endswith("Z")
    denied = by[("routes.delete", "audited", "read")]
    assert denied["result"].startswith("403 PermissionDenied")
    grpc_load = by[("repository.load", "spare", "all")]
    assert grpc_load["result"] == "ok" and grpc_load["peer"] == "127.0.0.1"  # the bare address, as on HTTP
    text = gw.audit_path.read_text() + gw.log
    for token in TOKENS.values():
        assert token not in text
