"""``onnxgate serve --workers 2`` (issue 7, item 3): two worker processes share the HTTP and gRPC
ports (SO_REUSEPORT), each answering for itself; the supervisor serves the metrics of both
together, restarts a worker that dies, and on SIGTERM drains every worker and exits 0.

Which worker holds a socket is read from ``/proc`` (the owner of the accepted socket's inode), so
the tests know exactly which worker answered each HTTP request on a pinned connection.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import modelzoo
from gateway import GatewayProcess, wait_until

ARGS = ["--workers", "2", "--cpu-threads", "1", "--drain-delay-s", "0.5", "--drain-timeout-s", "20"]
X = [[1.0, 2.0, 3.0, 4.0]]
SLOW_ROWS = 128  # one request through 256 layers of 1024x1024: over half a second on one thread


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("workers_repo")
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    return repo


# -- which process holds which socket ------------------------------------------------------------
def children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _sockets(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def _tcp(local_port: int, remote_port: int | None = None) -> set[str]:
    """Inodes of TCP sockets on ``local_port``: listening ones, or the one connected to ``remote_port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, remote = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
            if local == local_port and (remote == remote_port if remote_port else f[3] == "0A"):
                out.add(f[9])
    return out


def listening_workers(gw: GatewayProcess, port: int) -> set[int]:
    """Workers of ``gw`` that hold a listening socket on ``port``."""
    assert gw.proc is not None
    inodes = _tcp(port)
    return {pid for pid in children(gw.proc.pid) if _sockets(pid) & inodes}


# -- requests ------------------------------------------------------------------------------------
class Pinned:
    """One HTTP keep-alive connection, and the worker that accepted it."""

    def __init__(self, gw: GatewayProcess) -> None:
        assert gw.proc is not None
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
        assert self.infer() == [[3.0, 6.0, 9.0, 12.0]]  # the worker has accepted the connection now
        inodes = _tcp(gw.http_port, self.conn.sock.getsockname()[1])
        owners = [pid for pid in children(gw.proc.pid) if _sockets(pid) & inodes]
        assert len(owners) == 1, f"connection owned by {owners}"
        self.worker = owners[0]

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        self.conn.request(method, path, json.dumps(body).encode() if body else None)
        resp = self.conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200, doc
        return doc

    def infer(self, model: str = "scaled", x: list | None = None) -> list:
        x = X if x is None else x
        body = {"inputs": [{"name": "x", "shape": [len(x), len(x[0])], "datatype": "FP32", "data": x}]}
        out = self.call("POST", f"/v2/models/{model}/infer", body)["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"]).tolist()

    def served(self) -> int:
        """Successful inferences of ``scaled`` counted by this connection's worker."""
        return self.call("GET", "/v2/models/scaled/versions/1/stats")["model_stats"][0]["inference_stats"]["success"][
            "count"]


def pin_each(gw: GatewayProcess, workers: set[int], hits: dict[int, int] | None = None) -> dict[int, Pinned]:
    """A pinned connection to every worker in ``workers``: fresh connections until each was hit.
    Each connection ran one inference on its worker; ``hits`` counts them per worker."""
    pinned: dict[int, Pinned] = {}
    for _ in range(100):
        p = Pinned(gw)
        if hits is not None:
            hits[p.worker] = hits.get(p.worker, 0) + 1
        if p.worker in pinned:
            p.conn.close()
        pinned.setdefault(p.worker, p)
        if set(pinned) >= workers:
            return pinned
    raise AssertionError(f"the kernel never sent a connection to each of {workers}: got {set(pinned)}")


def grpc_infer_fresh(gw: GatewayProcess) -> None:
    """One gRPC infer on a channel of its own (own subchannel: a new TCP connection)."""
    client = grpcclient.InferenceServerClient(gw.grpc_url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    try:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.asarray(X, np.float32))
        assert client.infer("scaled", [inp]).as_numpy("y").tolist() == [[3.0, 6.0, 9.0, 12.0]]
    finally:
        client.close()


def metrics(gw: GatewayProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def requests_total(gw: GatewayProcess, protocol: str | None = None) -> float:
    """``onnxgate_requests_total`` of ``scaled`` summed over every other label (and every worker)."""
    total = 0.0
    for line in metrics(gw).splitlines():
        if line.startswith("onnxgate_requests_total{") and 'model="scaled"' in line and (
                protocol is None or f'protocol="{protocol}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- tests ---------------------------------------------------------------------------------------
def test_two_workers_share_the_ports_and_their_metrics_add_up(repo):
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        workers = children(gw.proc.pid)
        assert len(workers) == 2, workers
        # both workers listen on both ports (the supervisor's own reservation is gone)
        assert listening_workers(gw, gw.http_port) == workers
        assert listening_workers(gw, gw.grpc_port) == workers

        hits: dict[int, int] = {}
        pinned = pin_each(gw, workers, hits)
        for n, (pid, p) in enumerate(sorted(pinned.items())):
            for _ in range(5 + 7 * n):  # unequal shares
                assert p.infer() == [[3.0, 6.0, 9.0, 12.0]]
            hits[pid] += 5 + 7 * n
        for _ in range(20):
            grpc_infer_fresh(gw)
        # each worker counts exactly what went to it (its HTTP connections plus its share of the
        # gRPC ones): the ports are shared, the workers are not, and both took gRPC traffic too
        served = {pid: p.served() for pid, p in pinned.items()}
        grpc_shares = {pid: served[pid] - hits[pid] for pid in workers}
        assert min(grpc_shares.values()) > 0 and sum(grpc_shares.values()) == 20, (served, hits)
        # the supervisor's metrics port adds up both workers
        assert requests_total(gw, "http") == sum(hits.values())
        assert requests_total(gw, "grpc") == 20
        text = metrics(gw)
        assert re.search(r'onnxgate_model_ready\{model="scaled",version="1"\} 1\.0', text), text[:2000]
    assert gw.proc.returncode == 0, gw.log


def test_killed_worker_is_restarted_and_serving_resumes(repo):
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        workers = children(gw.proc.pid)
        pinned = pin_each(gw, workers)
        before = requests_total(gw)
        victim, survivor = sorted(workers)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: re.search(rf"worker \d \(pid {victim}\) exited with -9; restarting", gw.log), 10), \
            gw.log
        # the survivor keeps serving meanwhile, on its connection and on fresh ones
        assert pinned[survivor].infer() == [[3.0, 6.0, 9.0, 12.0]]
        for _ in range(10):
            Pinned(gw).conn.close()  # each one asserts its answer
        # a new worker takes the dead one's place, listening on both ports once it has loaded
        assert wait_until(lambda: len(listening_workers(gw, gw.grpc_port)) == 2
                          and len(listening_workers(gw, gw.http_port)) == 2, 60), gw.log
        workers = children(gw.proc.pid)
        assert survivor in workers and victim not in workers and len(workers) == 2, workers
        (newcomer,) = workers - {survivor}
        hits: dict[int, int] = {}
        fresh = pin_each(gw, workers, hits)[newcomer]
        assert fresh.served() == hits[newcomer]  # its counts start afresh
        for _ in range(10):
            grpc_infer_fresh(gw)
        # the killed worker's counts stay in the sum: counters never go down
        assert requests_total(gw) == before + 1 + 10 + sum(hits.values()) + 10
    assert gw.proc.returncode == 0, gw.log


def test_sigterm_drains_every_worker_and_exits_0(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    # no batching: the warm-up runs one row, not the largest batch
    modelzoo.write_config(modelzoo.build_slow(repo, layers=256), "max_batch_size: 0\n")
    rows = np.random.RandomState(0).uniform(-1, 1, (SLOW_ROWS, 1024)).astype(np.float32)
    expected = modelzoo.reference_run(repo / "slow" / "1" / "model.onnx", {"x": rows})["y"]
    gw = GatewayProcess(repo, ARGS).start()
    results: dict[int, tuple[float, object]] = {}
    try:
        assert gw.proc is not None
        pinned = pin_each(gw, children(gw.proc.pid))

        def slow(pid: int, p: Pinned) -> None:
            try:
                got: object = np.asarray(p.infer("slow", rows.tolist()), np.float32)
            except Exception as exc:
                got = exc
            results[pid] = (time.monotonic(), got)

        threads = [threading.Thread(target=slow, args=item) for item in pinned.items()]
        for t in threads:
            t.start()
        time.sleep(0.2)
        t_signal = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert gw.proc.wait(60) == 0, gw.log
        for t in threads:
            t.join(30)
    finally:
        gw.kill()
    assert len(results) == 2, results
    for pid, (end, got) in results.items():
        assert isinstance(got, np.ndarray), f"worker {pid}: in-flight request failed: {got!r}"
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert end > t_signal, "the request was not in flight at the signal: make it slower"
    assert gw.log.count("draining: readiness false") == 2, gw.log
    assert gw.log.count("onnxgate: stopped") == 3, gw.log  # two workers, then the supervisor


def test_sigterm_while_workers_start_or_restart_exits_0(repo):
    # SIGTERM before the workers have installed their handlers (they are still importing)
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1", "--model-repository", str(repo),
           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *ARGS]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening:" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(60) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    # SIGTERM while the supervisor waits to replace a dead worker: no replacement is started
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        victim, survivor = sorted(children(gw.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: f"(pid {victim}) exited with -9; restarting" in gw.log, 10), gw.log
        gw.signal(signal.SIGTERM)
        seen = set()
        while gw.proc.poll() is None:
            seen |= children(gw.proc.pid)
            time.sleep(0.02)
    assert gw.proc.returncode == 0, gw.log
    assert seen <= {survivor}, f"a replacement worker was started while stopping: {seen - {survivor}}"
