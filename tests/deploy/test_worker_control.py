"""``--workers N`` answers for the whole gateway (issue 11, item 3): control-plane changes that
would reach only the worker whose socket took the call (model loads and unloads) are refused on
both transports (501 / UNIMPLEMENTED, saying what to do instead), and statistics add up every
worker's counts. Route changes reach every worker: test_worker_routes.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

import modelzoo
from gateway import GatewayProcess, wait_until
from workers_helpers import ARGS, children, listening_workers, pin_each

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


def _refused(message: str) -> bool:
    return "refused under --workers N" in message and "--workers 1" in message and "SIGHUP" in message


def test_control_plane_changes_are_refused_on_both_transports_and_change_nothing(repo):
    with GatewayProcess(repo, [*ARGS, *CONTROL]) as gw:
        assert gw.proc is not None
        for path, body in (
            ("/v2/repository/models/scaled/load", {}),
            ("/v2/repository/models/scaled/load", {"parameters": {"version": 1}}),  # pin
            ("/v2/repository/models/scaled/load", {"parameters": {"rollback": True}}),
            ("/v2/repository/models/scaled/unload", {}),
        ):
            status, doc = _http(gw, "POST", path, body)
            assert status == 501 and _refused(doc["error"]), (path, body, status, doc)

        with grpc.insecure_channel(gw.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for call, request in (
                (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="scaled")),
                (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name="scaled")),
            ):
                with pytest.raises(grpc.RpcError) as failure:
                    call(request, timeout=30)
                assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED, failure.value
                assert _refused(failure.value.details()), failure.value.details()

        # every worker still serves both versions, with no route: nothing changed anywhere
        for p in pin_each(gw, children(gw.proc.pid)).values():
            assert p.infer("scaled") == [[3.0, 6.0, 9.0, 12.0]]
            index = p.call("POST", "/v2/repository/index", {})
            assert sorted((r["name"], r["version"], r["state"]) for r in index) == [
                ("scaled", "1", "READY"), ("scaled", "2", "READY")], index
            p.conn.request("GET", "/v2/routes")
            resp = p.conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read()) == []
    assert gw.proc.returncode == 0, gw.log


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
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(listening_workers(gw, gw.http_port)) == 2, 120), gw.log
        assert wait_until(lambda: _counts(pinned[survivor].call("GET", "/v2/models/scaled/versions/1/stats"))
                          == (total, total), 30)
        (newcomer,) = children(gw.proc.pid) - {survivor}
        more: dict[int, int] = {}
        fresh = pin_each(gw, {survivor, newcomer}, more)[newcomer]  # each connection ran one inference
        total += sum(more.values())
        assert wait_until(lambda: _counts(fresh.call("GET", "/v2/models/scaled/versions/1/stats"))
                          == (total, total), 30), lost
    assert gw.proc.returncode == 0, gw.log
