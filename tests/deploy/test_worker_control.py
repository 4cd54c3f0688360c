"""``--workers N`` answers for the whole gateway: model control (load, unload, pin, rollback)
reaches every worker, whichever worker's socket took the call, on both transports, and is
answered once every worker serves the result; statistics add up every worker's counts. Route
changes reach every worker: test_worker_routes.py.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

import modelzoo
from gateway import GatewayProcess, wait_until
from workers_helpers import ARGS, Pinned, children, kill_and_replace, pin_each

CONTROL = ["--model-control-mode", "explicit", "--load-model", "*"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("control_repo")
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    modelzoo.build_scaled(repo, version=2, scale=3.0)  # the same answers: the index tells them apart
    modelzoo.write_config(repo / "scaled", "version_policy: { all { } }\n")
    return repo


def _http(gw: GatewayProcess, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    try:
        conn.request(method, path, json.dumps(body).encode() if body is not None else None)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def _index(p: Pinned) -> list[tuple[str, str, str]]:
    """This worker's repository index: (name, version, state) rows."""
    return sorted((r["name"], r.get("version", ""), r["state"]) for r in p.call("POST", "/v2/repository/index", {}))


def _ready(p: Pinned) -> list[str]:
    return [v for _, v, state in _index(p) if state == "READY"]


def _load(channel: grpc.Channel, **parameters: object) -> None:
    request = service_pb2.RepositoryModelLoadRequest(model_name="scaled")
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].int64_param = int(value)  # type: ignore[call-overload]
    service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=120)


def test_model_control_reaches_every_worker_whichever_takes_it_on_both_transports(repo):
    with GatewayProcess(repo, [*ARGS, *CONTROL]) as gw:
        assert gw.proc is not None
        a, b = pin_each(gw, children(gw.proc.pid)).values()
        assert _ready(a) == _ready(b) == ["1", "2"]

        # a pin taken by one worker: answered once the other serves it too
        status, doc = _http_on(a, "/v2/repository/models/scaled/load", {"parameters": {"version": 1}})
        assert status == 200, doc
        assert _ready(b) == _ready(a) == ["1"]
        # a rollback on gRPC, whichever worker takes it: the version that served before, everywhere
        with grpc.insecure_channel(gw.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            _load(channel, rollback=True)
            assert _ready(a) == _ready(b) == ["2"]
            _load(channel)  # a load without a pin: every version again
            assert _ready(a) == _ready(b) == ["1", "2"]

        # a load refused on the worker that took it changes nothing anywhere
        status, doc = _http_on(b, "/v2/repository/models/scaled/load", {"parameters": {"config": "{\"input\": 5}"}})
        assert status == 400, doc
        assert _ready(a) == _ready(b) == ["1", "2"]

        # an unload on one worker: the model answers nowhere
        status, doc = _http_on(b, "/v2/repository/models/scaled/unload", {})
        assert status == 200, doc
        assert _ready(a) == _ready(b) == []
        a.conn.request("POST", "/v2/models/scaled/infer", json.dumps(_infer_body()).encode())
        response = a.conn.getresponse()
        assert response.status in (404, 503), response.read()
        response.read()

        # a restarted worker takes up what was changed before it started, before it listens
        victim, survivor = a.worker, b.worker
        newcomer = kill_and_replace(gw, victim)
        pinned = pin_each(gw, {survivor, newcomer}, probe=False)
        assert _ready(pinned[newcomer]) == [] and ("scaled", "1", "READY") not in _index(pinned[newcomer])
        status, doc = _http_on(pinned[newcomer], "/v2/repository/models/scaled/load", {})
        assert status == 200, doc
        assert _ready(pinned[survivor]) == _ready(pinned[newcomer]) == ["1", "2"]
        assert pinned[survivor].infer("scaled") == [[3.0, 6.0, 9.0, 12.0]]
    assert gw.proc.returncode == 0, gw.log


def _infer_body() -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1.0, 2.0, 3.0, 4.0]]}]}


def _http_on(p: Pinned, path: str, body: dict) -> tuple[int, dict]:
    p.conn.request("POST", path, json.dumps(body).encode())
    resp = p.conn.getresponse()
    raw = resp.read()
    return resp.status, json.loads(raw) if raw else {}


def _counts(doc: dict) -> tuple[int, int]:
    """(inference_count, successes) of ``scaled`` version 1 in a statistics answer."""
    (row,) = [r for r in doc["model_stats"] if r["name"] == "scaled" and r["version"] == "1"]
    return int(row["inference_count"]), int(row["inference_stats"]["success"]["count"])


def _grpc_counts(gw: GatewayProcess) -> tuple[int, int]:
    with grpc.insecure_channel(gw.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="scaled", version="1"), timeout=30)
    (row,) = reply.model_stats
    return row.inference_count, row.inference_stats.success.count


def test_statistics_add_up_every_worker_from_any_worker_and_outlive_a_killed_one(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        workers = children(gw.proc.pid)
        hits: dict[int, int] = {}
        pinned = pin_each(gw, workers, hits)  # each connection ran one inference on its worker
        for n, (pid, p) in enumerate(sorted(pinned.items())):
            for _ in range(3 + 9 * n):  # unequal shares
                p.infer()
            hits[pid] += 3 + 9 * n
        total = sum(hits.values())
        # each worker's own counts come at once, the other's with its next snapshot: poll
        for p in pinned.values():
            assert wait_until(lambda p=p: _counts(p.call("GET", "/v2/models/scaled/versions/1/stats"))
                              == (total, total), 30), (hits, p.call("GET", "/v2/models/stats"))
            assert _counts(p.call("GET", "/v2/models/stats")) == (total, total)  # every model
            assert _counts(p.call("GET", "/v2/models/scaled/stats")) == (total, total)  # every version
        for _ in range(4):  # fresh gRPC connections, whichever worker takes each
            assert _grpc_counts(gw) == (total, total)

        # a killed worker's counts stay in the total, as its last snapshot (it had shared them all:
        # the other worker's answer above included them)
        victim, survivor = sorted(workers)
        lost = hits[victim]
        newcomer = kill_and_replace(gw, victim)
        assert wait_until(lambda: _counts(pinned[survivor].call("GET", "/v2/models/scaled/versions/1/stats"))
                          == (total, total), 30)
        more: dict[int, int] = {}
        fresh = pin_each(gw, {survivor, newcomer}, more)[newcomer]  # each connection ran one inference
        total += sum(more.values())
        assert wait_until(lambda: _counts(fresh.call("GET", "/v2/models/scaled/versions/1/stats"))
                          == (total, total), 30), lost
    assert gw.proc.returncode == 0, gw.log


def test_a_worker_restarts_while_a_pin_leaves_a_config_route_without_its_version(repo, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("routes:\n  - name: r\n    split: [{target: 'scaled:2', weight: 1}]\n", encoding="utf-8")
    with GatewayProcess(repo, [*ARGS, *CONTROL, "--config", str(config)]) as gw:
        assert gw.proc is not None
        a, b = pin_each(gw, children(gw.proc.pid)).values()
        status, doc = _http_on(a, "/v2/repository/models/scaled/load", {"parameters": {"version": 1}})
        assert status == 200, doc  # the route to version 2 answers 503 now, on both workers
        # the restarted worker checks the config's routes against the repository, then takes the pin up
        newcomer = kill_and_replace(gw, b.worker)
        fresh = pin_each(gw, {a.worker, newcomer})[newcomer]
        assert _ready(fresh) == _ready(a) == ["1"]
    assert gw.proc.returncode == 0, gw.log
    assert "restart 2" not in gw.log, gw.log  # it came back at the first try
