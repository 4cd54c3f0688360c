"""Access beyond the scope table: the default without tokens off loopback, the per-peer limit on
failed authentications, the metrics token, the tokens file and its SIGHUP reload, bad security
config, and real clients (tritonclient) sending a token."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("access") / "repo"
    modelzoo.build_scaled(repo)
    return repo


def _status(port: int, method: str, path: str, token: str | None = None, body: bytes | None = None) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"} if token else {})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data


def _config(tmp_path: Path, security: dict) -> list[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"security": security}))
    return ["--config", str(path)]


def test_without_tokens_off_loopback_admin_is_closed_and_the_rest_open(repo):
    with GatewayProcess(repo, ["--host", "0.0.0.0", "--model-control-mode", "explicit", "--load-model", "*"]) as gw:
        status, _, body = _status(gw.http_port, "POST", "/v2/repository/models/scaled/unload", body=b"{}")
        assert status == 403 and "security.tokens" in json.loads(body)["error"]
        status, _, body = _status(gw.http_port, "PUT", "/v2/routes/r", body=b'{"split": [{"target": "scaled"}]}')
        assert status == 403, body
        with grpc.insecure_channel(gw.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="scaled"), timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert stub.ModelReady(pb.ModelReadyRequest(name="scaled"), timeout=30).ready  # still loaded
        client = httpclient.InferenceServerClient(gw.http_url)
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        np.testing.assert_array_equal(client.infer("scaled", [inp]).as_numpy("y"), X)  # infer stays open
        assert "admin endpoints are closed" in gw.log and "WARNING" in gw.log


def test_without_tokens_on_loopback_admin_is_open(repo):
    with GatewayProcess(repo, ["--model-control-mode", "explicit", "--load-model", "*"]) as gw:
        assert _status(gw.http_port, "POST", "/v2/repository/models/scaled/load", body=b"{}")[0] == 200
        assert "admin endpoints are closed" not in gw.log


def test_failed_authentications_are_limited_per_peer(repo, tmp_path):
    good = "good-token-1"
    args = _config(tmp_path, {"tokens": [{"name": "app", "sha256": sha(good), "scopes": ["infer"]}],
                              "auth_failures_per_minute": 3})
    with GatewayProcess(repo, args) as gw:
        for _ in range(3):
            assert _status(gw.http_port, "GET", "/v2/models/scaled", "wrong")[0] == 401
        status, headers, body = _status(gw.http_port, "GET", "/v2/models/scaled", "wrong")
        assert status == 429 and int(headers["retry-after"]) >= 1, body
        # the peer is refused before its token is looked at, on both transports
        assert _status(gw.http_port, "GET", "/v2/models/scaled", good)[0] == 429
        with grpc.insecure_channel(gw.grpc_url) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                    pb.ModelMetadataRequest(name="scaled"), metadata=(("authorization", f"Bearer {good}"),), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _status(gw.http_port, "GET", "/v2/health/ready")[0] == 200  # health needs no token


def test_metrics_port_wants_its_token(repo, tmp_path):
    scrape = "scrape-token-9"
    args = _config(tmp_path, {"tokens": [{"name": "app", "sha256": sha("x"), "scopes": ["infer"]}],
                              "metrics_token_sha256": sha(scrape)})
    with GatewayProcess(repo, args) as gw:
        status, headers, _ = _status(gw.metrics_port, "GET", "/metrics")
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert _status(gw.metrics_port, "GET", "/metrics", "x")[0] == 401
        status, _, body = _status(gw.metrics_port, "GET", "/metrics", scrape)
        assert status == 200 and b"onnxgate_" in body


def test_tokens_file_is_reread_on_sighup_and_a_bad_one_keeps_the_old(repo, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(json.dumps({"tokens": [{"name": "first", "sha256": sha("one"), "scopes": ["read"]}]}))
    with GatewayProcess(repo, _config(tmp_path, {"tokens_file": str(tokens)})) as gw:
        assert _status(gw.http_port, "GET", "/v2/models/stats", "one")[0] == 200
        assert _status(gw.http_port, "GET", "/v2/models/stats", "two")[0] == 401
        tokens.write_text(json.dumps([{"name": "second", "sha256": sha("two"), "scopes": ["read"]}]))
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: _status(gw.http_port, "GET", "/v2/models/stats", "two")[0] == 200)
        assert _status(gw.http_port, "GET", "/v2/models/stats", "one")[0] == 401
        tokens.write_text("tokens: [{name: broken, sha256: nothex, scopes: [read]}]")
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: "tokens not changed" in gw.log)
        assert _status(gw.http_port, "GET", "/v2/models/stats", "two")[0] == 200
        assert "two" not in gw.log.replace("second", "")


@pytest.mark.parametrize(
    ("security", "needle"),
    [
        ({"tokens": [{"name": "a", "sha256": "abc", "scopes": ["read"]}]}, "SHA-256"),
        ({"tokens": [{"name": "a", "sha256": sha("t"), "scopes": ["root"]}]}, "scopes"),
        ({"tokens": [{"name": "a", "sha256": sha("t"), "scopes": ["read"]},
                     {"name": "a", "sha256": sha("u"), "scopes": ["read"]}]}, "used twice"),
        ({"tokens_file": "/nonexistent/tokens.yaml"}, "tokens_file"),
        ({"token": []}, "unknown key"),
        ({"auth_failures_per_minute": 0}, "auth_failures_per_minute"),
    ],
)
def test_bad_security_config_stops_the_start(repo, tmp_path, security, needle):
    args = [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo), "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "0", *_config(tmp_path, security)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and needle in out.stderr, out.stderr


def test_tritonclient_sends_the_token_on_both_transports(repo, tmp_path):
    token = "triton-client-token"
    args = _config(tmp_path, {"tokens": [{"name": "app", "sha256": sha(token), "scopes": ["infer"]}]})
    with GatewayProcess(repo, args) as gw:
        headers = {"Authorization": f"Bearer {token}"}
        http_client = httpclient.InferenceServerClient(gw.http_url)
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        assert http_client.get_model_metadata("scaled", headers=headers)["name"] == "scaled"
        np.testing.assert_array_equal(http_client.infer("scaled", [inp], headers=headers).as_numpy("y"), X)
        with pytest.raises(InferenceServerException) as err:
            http_client.infer("scaled", [inp])
        assert "401" in str(err.value.status())
        grpc_client = grpcclient.InferenceServerClient(gw.grpc_url)
        ginp = grpcclient.InferInput("x", [1, 4], "FP32")
        ginp.set_data_from_numpy(X)
        metadata = {"authorization": f"Bearer {token}"}  # gRPC metadata keys are lowercase
        np.testing.assert_array_equal(grpc_client.infer("scaled", [ginp], headers=metadata).as_numpy("y"), X)
        with pytest.raises(InferenceServerException) as err:
            grpc_client.infer("scaled", [ginp])
        assert "UNAUTHENTICATED" in str(err.value.status())


def test_workers_metrics_port_wants_its_token(repo, tmp_path):
    scrape = "scrape-token-workers"
    args = _config(tmp_path, {"tokens": [{"name": "app", "sha256": sha("x"), "scopes": ["infer"]}],
                              "metrics_token_sha256": sha(scrape)})
    with GatewayProcess(repo, [*args, "--workers", "2", "--cpu-threads", "1"]) as gw:
        status, headers, _ = _status(gw.metrics_port, "GET", "/metrics")
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        status, _, body = _status(gw.metrics_port, "GET", "/metrics", scrape)
        assert status == 200 and b"onnxgate_" in body
