"""Helpers for the ``--workers N`` tests: which worker holds which socket, connections pinned
to one worker, fresh gRPC calls, and the supervisor's metrics.

Which worker holds a socket is read from ``/proc`` (the owner of the accepted socket's inode), so
the tests know exactly which worker answered each HTTP request on a pinned connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from gateway import GatewayProcess, wait_until

ARGS = ["--workers", "2", "--cpu-threads", "1", "--drain-delay-s", "0.5", "--drain-timeout-s", "20"]
X = [[1.0, 2.0, 3.0, 4.0]]


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


def kill_and_replace(gw: GatewayProcess, victim: int, timeout: float = 120.0) -> int:
    """SIGKILL the worker ``victim``; the pid of the worker the supervisor starts in its place,
    once it listens. (Right after the signal the victim may still hold its listening socket, so
    two listening workers alone do not say that the newcomer is up.)"""
    assert gw.proc is not None
    os.kill(victim, signal.SIGKILL)
    survivors = children(gw.proc.pid) - {victim}
    assert wait_until(lambda: victim not in children(gw.proc.pid), timeout), gw.log
    assert wait_until(lambda: len(listening_workers(gw, gw.http_port) - survivors - {victim}) == 1, timeout), gw.log
    (newcomer,) = listening_workers(gw, gw.http_port) - survivors - {victim}
    return newcomer


@contextlib.asynccontextmanager
async def following(*workers: Any) -> AsyncIterator[None]:
    """In-process stand-ins of workers (TrafficControl, ModelControlShare) that each follow the
    shared table (``follow()``) for the block, as a worker's loop does."""
    tasks = [asyncio.create_task(w.follow()) for w in workers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()


# -- requests ------------------------------------------------------------------------------------
class Pinned:
    """One HTTP keep-alive connection, and the worker that accepted it."""

    def __init__(self, gw: GatewayProcess, probe: bool = True) -> None:
        assert gw.proc is not None
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
        if probe:
            assert self.infer() == [[3.0, 6.0, 9.0, 12.0]]  # the worker has accepted the connection now
        else:  # a worker where "scaled" may not answer
            self.conn.request("GET", "/v2/health/live")
            assert self.conn.getresponse().read() is not None
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
        """Successful inferences of ``scaled`` as this connection's worker counts them: its own,
        and every other worker's as of their last statistics snapshots."""
        return self.call("GET", "/v2/models/scaled/versions/1/stats")["model_stats"][0]["inference_stats"]["success"][
            "count"]


def pin_each(gw: GatewayProcess, workers: set[int], hits: dict[int, int] | None = None,
             probe: bool = True) -> dict[int, Pinned]:
    """A pinned connection to every worker in ``workers``: fresh connections until each was hit.
    Each connection ran one inference on its worker (``probe``; else a liveness check); ``hits``
    counts them per worker."""
    pinned: dict[int, Pinned] = {}
    for _ in range(100):
        p = Pinned(gw, probe)
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
