"""The OpenAPI document of the HTTP API (``GET /v2/openapi.json``) against the endpoint table and a
live gateway.

The document is valid OpenAPI and has every HTTP route of ``endpoints.ENDPOINTS``; an endpoint
without a schema fails its build. Schemathesis then generates requests from the served document
(a bounded, seeded number per operation) against a gateway with tokens, routes and explicit model
control, and checks every answer: no 5xx but the documented 501 and 503, and status, content
type, headers and body as the document says; an operation that lists the bearer scheme refuses a
request without the token, and a method a path does not serve is 405. Answers a generator rarely
reaches (binary replies, 413, 429, 501) are sent here directly and checked against the same
document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from openapi_spec_validator import validate

import modelzoo
from gateway import GatewayProcess
from onnxgate.core.security.access import PUBLIC
from onnxgate.frontends import openapi
from onnxgate.frontends.endpoints import ENDPOINTS, Endpoint

TOKEN = "tok-openapi-0123"
DEMO = Path(__file__).resolve().parents[2] / "server" / "onnxgate" / "demo" / "models"
ROUTE = {"name": "ab", "split": [{"target": "mlp", "weight": 3}, {"target": "mlp_b:1", "weight": 1}],
         "shadow": {"target": "mlp_b", "fraction": 1.0, "max_in_flight": 8}}
X = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
MAX_EXAMPLES = 25  # per operation
AIMED_EXAMPLES = 60  # per infer operation whose bodies fit its model
SEED = 20260417


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openapi")
    repo = root / "repo"
    modelzoo.build_mlp(repo, "mlp")
    modelzoo.build_mlp(repo, "mlp_b", seed=1)
    modelzoo.build_string(repo, "words")
    modelzoo.build_scaled(repo, "spare")  # only load and unload touch it
    shutil.copytree(DEMO / "iris_classifier", repo / "iris_classifier")
    config = {
        "routes": [ROUTE],
        "security": {
            "tokens": [{"name": "all", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        "scopes": ["infer", "read", "admin"]}],
            "auth_failures_per_minute": 1_000_000,
        },
    }
    (root / "gateway.yaml").write_text(json.dumps(config))
    args = ["--config", str(root / "gateway.yaml"), "--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, args) as g:
        g.base = f"http://{g.http_url}"
        g.root = root
        for _ in range(4):  # the shadow comparison has pairs to show
            assert _infer(g, "ab", _json_request()).status_code == 200
        yield g


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _json_request(**parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape),
                                        "data": X.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return body


def _infer(gw: GatewayProcess, model: str, body: dict | bytes, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{gw.base}/v2/models/{model}/infer", data=data, headers={**_auth(), **(headers or {})},
                         timeout=30)


# -- the document ----------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_with_every_http_route():
    doc = openapi.document()
    validate(doc)
    ids = []
    for endpoint in ENDPOINTS:
        for index, (method, path) in enumerate(endpoint.http):
            op = doc["paths"][path][method.lower()]
            assert op["x-onnxgate-endpoint"] == endpoint.name and op["x-onnxgate-scope"] == endpoint.scope
            assert op["security"] == ([] if endpoint.scope == PUBLIC else [{openapi.SECURITY_SCHEME: []}])
            assert ("200" in op["responses"]) == endpoint.implemented
            assert endpoint.implemented or "501" in op["responses"]
            ids.append(op["operationId"])
            assert index or op["operationId"] == endpoint.name
    assert len(ids) == len(set(ids)) == sum(len(ops) for ops in doc["paths"].values())


def test_an_endpoint_without_a_schema_fails_the_build():
    new = Endpoint("rollouts.list", "read", "Every rollout", (("GET", "/v2/rollouts"),))
    assert openapi.undescribed((*ENDPOINTS, new)) == ["rollouts.list"]
    with pytest.raises(LookupError, match=r"rollouts\.list"):
        openapi.document((*ENDPOINTS, new))
    assert openapi.undescribed() == []


def test_the_document_is_served_without_a_token(gw):
    reply = requests.get(f"{gw.base}/v2/openapi.json", timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json() == json.loads(json.dumps(openapi.document()))
    assert requests.get(f"{gw.base}/v2", timeout=30).status_code == 401  # tokens are configured


# -- schemathesis against the live gateway ----------------------------------------------------------

# Names the generated requests use, so they reach real models and routes as well as unknown ones.
# State-changing operations get names of their own: "spare" (load; unload is tested below, never
# fuzzed) and "scratch" (routes put/delete), so what the other operations see does not depend
# on the order of the cases.
NAMES = {"model": ["mlp", "iris_classifier", "words", "ab", "nosuch"], "version": ["1", "2", "x"],
         "route": ["ab", "nosuch"], "region": ["r"]}
AIMED = {"repository.load": {"model": ["spare", "nosuch"]}, "routes.put": {"route": ["scratch"]},
         "routes.delete": {"route": ["scratch", "nosuch"]}}


def _aimed(doc: dict[str, Any]) -> dict[str, Any]:
    """The served document with each path parameter narrowed to the names above."""
    doc = json.loads(json.dumps(doc))
    declared = doc["components"]["parameters"]
    for ops in doc["paths"].values():
        for op in ops.values():
            params = []
            for param in op.get("parameters", []):
                name = param["$ref"].rsplit("/", 1)[1]
                if name in NAMES:
                    values = AIMED.get(op["x-onnxgate-endpoint"], {}).get(name, NAMES[name])
                    param = {**declared[name], "schema": {"type": "string", "enum": values}}
                params.append(param)
            if params:
                op["parameters"] = params
    doc["paths"].update(_aimed_infer(doc["paths"]["/v2/models/{model}/infer"]["post"]))
    return doc


def _tensor(name: str, datatype: str, shape: list[int], items: dict) -> dict:
    """A request input of exactly one shape: only its values are generated."""
    count = int(np.prod(shape))
    return {"type": "object", "required": ["name", "datatype", "shape", "data"], "additionalProperties": False,
            "properties": {"name": {"enum": [name]}, "datatype": {"enum": [datatype]},
                           "shape": {"enum": [shape]},
                           "data": {"type": "array", "items": items, "minItems": count, "maxItems": count}}}


def _request(tensor: dict, outputs: list[str]) -> dict:
    output = {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {"name": {"enum": outputs}, "parameters": {
                  "type": "object", "additionalProperties": False,
                  "properties": {"binary_data": {"type": "boolean"},
                                 "classification": {"type": "integer", "minimum": 1, "maximum": 4}}}}}
    return {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "additionalProperties": False,
                       "properties": {"binary_data_output": {"type": "boolean"},
                                      "priority": {"type": "integer", "minimum": 0, "maximum": 3},
                                      "timeout": {"type": "integer", "minimum": 0}}},
        "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "items": output, "maxItems": len(outputs), "uniqueItems": True}}}


def _aimed_infer(infer: dict) -> dict[str, dict]:
    """Infer operations at concrete model paths whose bodies fit the model, so that generated
    requests get past validation and their answers (JSON, binary, compressed, classified) are
    checked too: each model by its JSON form, mlp also by a raw binary body."""
    numbers = {"type": "number"}
    bodies = {
        "mlp": _request(_tensor("x", "FP32", [1, 16], numbers), ["y"]),
        "ab": _request(_tensor("x", "FP32", [1, 16], numbers), ["y"]),
        "iris_classifier": _request(_tensor("input", "FP32", [2, 4], numbers), ["label", "probabilities"]),
        "words": _request(_tensor("text", "BYTES", [1, 1], {"type": "string"}), ["same", "upper"]),
    }
    headers = [p for p in infer["parameters"] if "$ref" in p and not p["$ref"].endswith("headerLength")]
    out = {}
    for model, body in bodies.items():
        op = {**infer, "operationId": f"aimed.infer.{model}", "parameters": headers,
              "requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}
        out[f"/v2/models/{model}/infer"] = {"post": op}
    raw = {"name": "Inference-Header-Content-Length", "in": "header", "required": True,
           "schema": {"type": "string", "enum": ["0"]}}
    out["/v2/models/mlp/versions/1/infer"] = {"post": {
        **infer, "operationId": "aimed.infer.mlp_raw", "parameters": [raw],
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary", "minLength": 64, "maxLength": 64}}}}}}
    return out


# 501 (an unsupported extension or feature) and 503 (not ready) are documented answers, not failures.
CONFIG = f"""
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "501", "503"]

[[operations]]
include-operation-id-regex = "^aimed[.]"
generation.max-examples = {AIMED_EXAMPLES}
"""
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "ignored_auth", "unsupported_method")


def test_schemathesis_finds_nothing(gw):
    work: Path = gw.root / "schemathesis"
    work.mkdir()
    doc = requests.get(f"{gw.base}/v2/openapi.json", timeout=30).json()
    (work / "openapi.json").write_text(json.dumps(_aimed(doc)))
    (work / "schemathesis.toml").write_text(CONFIG)
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(work / "schemathesis.toml"), "--no-color",
        "run", str(work / "openapi.json"), "--url", gw.base, "-H", f"Authorization: Bearer {TOKEN}",
        "--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing", "--mode", "positive",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-deterministic",
        "--workers", "1", "--request-timeout", "30",
        "--exclude-operation-id", "repository.unload", "--continue-on-failure",
    ]
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    print(run.stdout[-4000:])  # the summary: operations, cases, checks (pytest -s shows it)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]


# -- what generated requests rarely reach, checked against the same document ---------------------------


@pytest.fixture(scope="module")
def schema(gw) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(requests.get(f"{gw.base}/v2/openapi.json", timeout=30).json())


def _conforms(schema, method: str, path: str, reply: requests.Response, status: int) -> None:
    assert reply.status_code == status, reply.text
    operation = schema[path][method]
    assert str(status) in operation.definition.raw["responses"], f"{status} is not documented for {method} {path}"
    operation.validate_response(reply)


def test_infer_answers_match_the_document(gw, schema):
    path = "/v2/models/{model}/infer"
    json_reply = _infer(gw, "mlp", {**_json_request(), "id": "r-1"})
    _conforms(schema, "POST", path, json_reply, 200)
    assert json_reply.json()["id"] == "r-1" and json_reply.headers["x-request-id"] == "r-1"
    echoed = _infer(gw, "mlp", {**_json_request(), "id": "r-2"}, {"X-Request-Id": "client-7"})
    _conforms(schema, "POST", path, echoed, 200)
    assert echoed.headers["x-request-id"] == "client-7"

    binary = _infer(gw, "mlp", _json_request(binary_data_output=True))
    _conforms(schema, "POST", path, binary, 200)
    assert binary.headers["content-type"] == "application/octet-stream"
    header = json.loads(binary.content[: int(binary.headers["inference-header-content-length"])])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4

    raw = _infer(gw, "mlp", X[:1].tobytes(), {"Inference-Header-Content-Length": "0"})
    _conforms(schema, "POST", path, raw, 200)

    big = np.zeros((64, 16), dtype=np.float32)
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [64, 16], "data": big.ravel().tolist()}]}
    compressed = _infer(gw, "mlp", gzip.compress(json.dumps(request).encode()),
                        {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    _conforms(schema, "POST", path, compressed, 200)
    assert compressed.headers["content-encoding"] == "gzip"

    versioned = "/v2/models/{model}/versions/{version}/infer"
    _conforms(schema, "POST", versioned, requests.post(f"{gw.base}/v2/models/mlp/versions/1/infer",
                                                        json=_json_request(), headers=_auth(), timeout=30), 200)


def test_error_answers_match_the_document(gw, schema):
    path = "/v2/models/{model}/infer"
    too_large = _infer(gw, "mlp", b" " * (2 << 20))
    _conforms(schema, "POST", path, too_large, 413)
    shed = _infer(gw, "mlp", _json_request(), {"X-Request-Deadline-Ms": "0.000001"})
    _conforms(schema, "POST", path, shed, 429)
    assert shed.json()["reason"] == "deadline" and int(shed.headers["retry-after"]) >= 1
    unsupported = _infer(gw, "mlp", b"{}", {"Content-Encoding": "br"})
    _conforms(schema, "POST", path, unsupported, 501)
    no_token = requests.get(f"{gw.base}/v2/models/mlp", timeout=30)
    _conforms(schema, "GET", "/v2/models/{model}", no_token, 401)
    assert no_token.headers["www-authenticate"] == "Bearer"
    _conforms(schema, "GET", "/v2/logging", requests.get(f"{gw.base}/v2/logging", headers=_auth(), timeout=30), 501)


def test_unload_and_load_match_the_document(gw, schema):
    def post(action: str) -> requests.Response:
        return requests.post(f"{gw.base}/v2/repository/models/spare/{action}", json={}, headers=_auth(), timeout=60)

    _conforms(schema, "POST", "/v2/repository/models/{model}/unload", post("unload"), 200)
    ready = requests.get(f"{gw.base}/v2/models/spare/ready", headers=_auth(), timeout=30)
    _conforms(schema, "GET", "/v2/models/{model}/ready", ready, 503)
    assert ready.json()["ready"] is False
    index = requests.post(f"{gw.base}/v2/repository/index", json={}, headers=_auth(), timeout=30)
    _conforms(schema, "POST", "/v2/repository/index", index, 200)
    assert {"name": "spare", "state": "UNAVAILABLE", "reason": "unloaded"} in index.json()
    _conforms(schema, "POST", "/v2/repository/models/{model}/load", post("load"), 200)
    _conforms(schema, "GET", "/v2/models/{model}/ready",
              requests.get(f"{gw.base}/v2/models/spare/ready", headers=_auth(), timeout=30), 200)
