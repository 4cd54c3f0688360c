"""Routes under ``--workers N`` (README "Routes and shadows"): a route PUT or DELETE reaches every
worker, whichever worker takes it, and is answered once every worker serves it; changes made on
two workers at once both land; a restarted worker takes up the changes made before it started;
SIGHUP re-reads the config file's routes into every worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

import modelzoo
from gateway import GatewayProcess, wait_until
from workers_helpers import ARGS, Pinned, children, kill_and_replace, listening_workers, pin_each

X = [[1.0, 2.0, 3.0, 4.0]]
ANSWER = {"scaled": [[3.0, 6.0, 9.0, 12.0]], "double": [[2.0, 4.0, 6.0, 8.0]], "tenfold": [[10.0, 20.0, 30.0, 40.0]]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("worker_routes_repo")
    modelzoo.build_scaled(repo, "scaled", scale=3.0)  # what Pinned checks its worker with
    modelzoo.build_scaled(repo, "double", scale=2.0)
    modelzoo.build_scaled(repo, "tenfold", scale=10.0)
    return repo


def _request(p: Pinned, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    p.conn.request(method, path, json.dumps(body).encode() if body is not None else None)
    resp = p.conn.getresponse()
    raw = resp.read()
    return resp.status, json.loads(raw) if raw else None


def _split(target: str) -> dict:
    return {"split": [{"target": target, "weight": 1}]}


def _answering(p: Pinned, route: str) -> str | None:
    """Which model answers ``route`` on this worker (None: the route is unknown there)."""
    status, doc = _request(p, "POST", f"/v2/models/{route}/infer",
                           {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]})
    if status == 404:
        return None
    assert status == 200, doc
    (name,) = [n for n, answer in ANSWER.items() if doc["outputs"][0]["data"] == [v for row in answer for v in row]]
    return name


def _routes(p: Pinned) -> dict[str, dict]:
    status, doc = _request(p, "GET", "/v2/routes")
    assert status == 200, doc
    return {r["name"]: r for r in doc}


def test_a_route_change_on_one_worker_is_served_by_every_worker_when_answered(repo, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("routes:\n  - name: r\n    split: [{target: double, weight: 1}]\n", encoding="utf-8")
    with GatewayProcess(repo, [*ARGS, "--config", str(config)]) as gw:
        assert gw.proc is not None
        a, b = pin_each(gw, children(gw.proc.pid)).values()
        assert _answering(a, "r") == _answering(b, "r") == "double"

        # changed on a, and at once (no waiting) served by b: the PUT answered once b served it
        status, doc = _request(a, "PUT", "/v2/routes/r", _split("tenfold"))
        assert status == 200, doc
        assert _answering(b, "r") == "tenfold" and _answering(a, "r") == "tenfold"
        status, doc = _request(b, "PUT", "/v2/routes/s", _split("double"))
        assert status == 200, doc
        assert _answering(a, "s") == "double"
        assert _routes(a) == _routes(b) and set(_routes(a)) == {"r", "s"}

        # a refused change is refused from either worker, and changes nothing anywhere
        status, doc = _request(b, "PUT", "/v2/routes/r", _split("missing"))
        assert status == 400 and "missing" in doc["error"], doc
        assert _answering(a, "r") == _answering(b, "r") == "tenfold"

        status, doc = _request(b, "DELETE", "/v2/routes/r")
        assert status == 200, doc
        assert _answering(a, "r") is None and _answering(b, "r") is None
        status, doc = _request(a, "DELETE", "/v2/routes/r")  # already gone everywhere
        assert status == 404, doc

        # the two workers changing the table at the same moments: every change lands, on both
        errors: list[object] = []
        puts = 15

        def put(p: Pinned, name: str, target: str) -> None:
            for i in range(puts):
                status, doc = _request(p, "PUT", f"/v2/routes/{name}{i}", _split(target))
                if status != 200:
                    errors.append(doc)

        threads = [threading.Thread(target=put, args=(p, f"t{n}-", t)) for n, (p, t) in
                   enumerate(zip([a, b], ["double", "tenfold"], strict=True))]  # one on each worker
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert set(_routes(a)) == set(_routes(b)) == {"s", *(f"t{n}-{i}" for n in range(2) for i in range(puts))}

        # a restarted worker takes up the changes made before it started, before it listens
        victim, survivor = a.worker, b.worker
        newcomer = kill_and_replace(gw, victim)
        fresh = pin_each(gw, {survivor, newcomer})[newcomer]
        assert _routes(fresh) == _routes(b)
        assert _answering(fresh, "s") == "double"

        # SIGHUP: the file's routes, on every worker (worker 0 publishes them)
        config.write_text("routes:\n  - name: r\n    split: [{target: scaled, weight: 1}]\n", encoding="utf-8")
        os.kill(gw.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: set(_routes(fresh)) == {"r"} and set(_routes(b)) == {"r"}, 30), gw.log
        assert _answering(fresh, "r") == _answering(b, "r") == "scaled"
    assert gw.proc.returncode == 0, gw.log



def _worker_index(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (value,) = [v for v in environ if v.startswith(b"ONNXGATE_WORKER=")]
    return int(value.split(b"=", 1)[1].split(b":")[0])


def test_a_sighup_while_worker_0_restarts_reaches_every_worker_once_it_is_back(repo, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("routes:\n  - name: r\n    split: [{target: double, weight: 1}]\n", encoding="utf-8")
    with GatewayProcess(repo, [*ARGS, "--config", str(config)]) as gw:
        assert gw.proc is not None
        pinned = pin_each(gw, children(gw.proc.pid))
        status, doc = _request(next(iter(pinned.values())), "PUT", "/v2/routes/r", _split("tenfold"))
        assert status == 200, doc  # the workers' shared table exists now: a restarted worker takes it up
        (first,) = [pid for pid in pinned if _worker_index(pid) == 0]
        (other,) = set(pinned) - {first}

        # worker 0, which publishes the file's routes, is down when the file changes and SIGHUP comes
        config.write_text("routes:\n  - name: r\n    split: [{target: scaled, weight: 1}]\n", encoding="utf-8")
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: f"worker 0 (pid {first}) exited" in gw.log, 30), gw.log  # down, restarting
        os.kill(gw.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: len(listening_workers(gw, gw.http_port)) == 2, 120), gw.log
        assert wait_until(lambda: _answering(pinned[other], "r") == "scaled", 30), gw.log
        (newcomer,) = children(gw.proc.pid) - {other}
        assert _answering(pin_each(gw, {newcomer})[newcomer], "r") == "scaled"
    assert gw.proc.returncode == 0, gw.log
