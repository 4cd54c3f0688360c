"""The smoke set CI also runs in a venv installed the way a user installs (``pip install .``, newest
versions, no test pins): serve, infer on both transports, pin and roll back, routes, sample log.

It needs only what ``pip install onnxgate`` brings (the onnxgate client, httpx) plus pytest and
onnx to build the models; no tritonclient, whose pins would hold protobuf back.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate_client import Client

X = np.arange(8, dtype=np.float32).reshape(2, 4)
EXPLICIT = ["--model-control-mode", "explicit", "--load-model", "*"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("user_install")
    repo = root / "repo"
    for v in (1, 2):
        modelzoo.build_scaled(repo, version=v, scale=float(v))
    modelzoo.write_config(repo / "scaled", "version_policy: { all { } }\n")
    modelzoo.build_scaled(repo, "candidate", scale=5.0)
    logs = root / "log"
    config = root / "gateway.yaml"
    config.write_text(
        f"""
sample_log:
  default: {{rate: 1.0}}
  include: [inputs, outputs]
  sink: {{type: jsonl, path: {logs}, rotate_mb: 1, rotate_s: 300}}
"""
    )
    with GatewayProcess(repo, [*EXPLICIT, "--config", str(config)]) as g:
        g.logs = logs
        yield g  # the last test stops it


def _http(gw: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=f"http://{gw.http_url}", timeout=30.0)


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_infer_on_both_transports(gw, scheme):
    url = gw.grpc_url if scheme == "grpc" else gw.http_url
    with Client(f"{scheme}://{url}") as client:
        assert client.ready()
        assert client.model_config("scaled")["max_batch_size"] > 0
        assert client.model_metadata("scaled")["inputs"][0]["name"] == "x"
        np.testing.assert_array_equal(client.infer("scaled", {"x": X}, version=1)["y"], X)
        np.testing.assert_array_equal(client.infer("scaled", {"x": X}, version=2)["y"], X * 2)


def test_pin_and_rollback_with_this_protobuf(gw):
    with _http(gw) as http:
        reply = http.post("/v2/repository/models/scaled/load", json={"parameters": {"version": "1"}})
        assert reply.status_code == 200, reply.text
        assert [m for m in http.post("/v2/repository/index").json() if m["name"] == "scaled"] == [
            {"name": "scaled", "version": "1", "state": "READY"}
        ]
        override = json.dumps({"version_policy": {"specific": {"versions": [2]}}})
        reply = http.post("/v2/repository/models/scaled/load", json={"parameters": {"config": override}})
        assert reply.status_code == 200, reply.text
        reply = http.post("/v2/repository/models/scaled/load", json={"parameters": {"rollback": True}})
        assert reply.status_code == 200, reply.text
    with Client(f"grpc://{gw.grpc_url}") as client:
        np.testing.assert_array_equal(client.infer("scaled", {"x": X})["y"], X)  # rolled back to 1
        client.load_model("scaled")  # unpinned: every version again
        np.testing.assert_array_equal(client.infer("scaled", {"x": X})["y"], X * 2)


def test_routes_split_and_shadow(gw):
    route = {"split": [{"target": "scaled:2", "weight": 1}], "shadow": {"target": "candidate", "fraction": 1.0}}
    with _http(gw) as http:
        reply = http.put("/v2/routes/scoring", json=route)
        assert reply.status_code == 200, reply.text
        with Client(f"http://{gw.http_url}") as client:
            for _ in range(3):
                np.testing.assert_array_equal(client.infer("scoring", {"x": X})["y"], X * 2)
        assert wait_until(lambda: http.get("/v2/routes/scoring/comparison").json()["counts"]["compared"] >= 3)
        assert http.delete("/v2/routes/scoring").status_code == 200


def test_sample_log_records_requests(gw):
    with Client(f"grpc://{gw.grpc_url}") as client:
        client.infer("candidate", {"x": X})
    gw.stop()  # the drain flushes the queue and renames the open file
    records = []
    for f in gw.logs.glob("*.jsonl"):
        records += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    record = next(r for r in records if r["model"] == "candidate")
    assert record["outputs"][0]["values"] == (X * 5).tolist()
