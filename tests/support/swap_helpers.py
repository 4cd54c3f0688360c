"""Shared pieces of the hot-swap tests (issue 4): models whose answers name their version, a load
generator on gRPC and HTTP at once that records every answer, a timeline of the versions allowed
to answer, and small clients for the repository API, the metrics endpoint and the process's RSS.

Versions are built with ``scale = version``: ``y = x * scale``, so an answer of ``X * 2`` must come
back with ``model_version == "2"``; a mismatch means an answer was routed or labelled wrongly.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until

X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
TRANSPORTS = ("grpc", "http")


def build_big_scaled(repo: Path, name: str = "scaled", version: int = 1, scale: float = 1.0, mb: int = 20) -> Path:
    """``y = x * scale`` like ``modelzoo.build_scaled``, plus ``mb`` MB of float weights the session
    must keep: ``y += 0 * Gather(pad, int(x[:, :1] * 0))``. The index depends on the input, so
    ONNX Runtime can neither constant-fold the pad away nor drop it as unused; the answer stays
    exactly ``x * scale`` for finite ``x``."""
    pad = np.random.RandomState(version).uniform(-1, 1, mb * 1024 * 1024 // 4).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Slice", ["x", "zero_i", "one_i", "one_i"], ["col"]),  # x[:, 0:1]
        helper.make_node("Mul", ["col", "zero_f"], ["col0"]),
        helper.make_node("Cast", ["col0"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["pad", "idx"], ["picked"]),  # [batch, 1]
        helper.make_node("Mul", ["picked", "zero_f"], ["nothing"]),
        helper.make_node("Add", ["scaled", "nothing"], ["y"]),
    ]
    inits = [
        modelzoo._init("scale", np.array(scale, np.float32)),
        modelzoo._init("zero_f", np.array(0.0, np.float32)),
        modelzoo._init("zero_i", np.array([0], np.int64)),
        modelzoo._init("one_i", np.array([1], np.int64)),
        modelzoo._init("pad", pad),
    ]
    vi = helper.make_tensor_value_info
    return modelzoo._save(repo, name, version, nodes, [vi("x", TensorProto.FLOAT, ["batch", 4])],
                          [vi("y", TensorProto.FLOAT, ["batch", 4])], inits)


def scaled_check(version: str, y: np.ndarray | None) -> bool:
    """The answer of a ``scale = version`` model is ``X * version``, exactly."""
    return y is not None and version.isdigit() and y.shape == X.shape and np.array_equal(y, X * float(version))


# -- load ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    transport: str
    thread: int
    start: float  # time.monotonic() when sent
    end: float  # ... when answered
    version: str  # model_version of the answer ("" when there was none)
    outcome: str  # ok | inconsistent (answer does not match its version) | error
    detail: str = ""

    def show(self, t0: float) -> str:
        return (f"{self.transport}#{self.thread} {self.start - t0:+.3f}..{self.end - t0:+.3f}s "
                f"v={self.version or '-'} {self.outcome} {self.detail[:160]}")


class Load:
    """``threads`` sync tritonclient clients per transport, each sending ``model`` one request
    after another until stopped, recording every call."""

    def __init__(self, gw: GatewayProcess, model: str, threads: int = 3, x: np.ndarray = X,
                 check: Callable[[str, np.ndarray | None], bool] = scaled_check, output: str = "y") -> None:
        self.gw, self.model, self.x, self.check, self.output = gw, model, x, check, output
        self.calls: list[Call] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], float] = {}  # sent, not answered yet: (transport, thread) -> sent
        self._threads = [threading.Thread(target=self._run, args=(t, i), daemon=True)
                         for i in range(threads) for t in TRANSPORTS]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "load threads hung"
        return self.snapshot()

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def _client(self, transport: str):
        if transport == "grpc":
            return grpcclient.InferenceServerClient(self.gw.grpc_url)
        return httpclient.InferenceServerClient(self.gw.http_url, connection_timeout=10.0, network_timeout=60.0)

    def _run(self, transport: str, idx: int) -> None:
        mod = grpcclient if transport == "grpc" else httpclient
        client = None
        while not self._stop.is_set():
            start = time.monotonic()
            self._pending[transport, idx] = start
            version, outcome, detail = "", "error", ""
            try:
                client = client or self._client(transport)
                inp = mod.InferInput("x", list(self.x.shape), "FP32")
                inp.set_data_from_numpy(self.x)
                result = client.infer(self.model, [inp])
                resp = result.get_response()
                version = resp.model_version if transport == "grpc" else str(resp.get("model_version", ""))
                y = result.as_numpy(self.output)
                if self.check(version, y):
                    outcome = "ok"
                else:
                    outcome, detail = "inconsistent", f"answer {None if y is None else y.ravel()[:4]}"
            except InferenceServerException as exc:
                detail = f"{exc.status()} {exc.message()}"
                if not exc.status():  # no answer from the gateway (connection trouble)
                    client = _close(client)
            except Exception as exc:
                detail, client = repr(exc), _close(client)
            with self._lock:
                self.calls.append(Call(transport, idx, start, time.monotonic(), version, outcome, detail))
                del self._pending[transport, idx]
            if outcome == "error":
                time.sleep(0.005)
        _close(client)

    def in_flight(self, older_than: float) -> int:
        """Requests sent more than ``older_than`` seconds ago and not answered yet."""
        now = time.monotonic()
        with self._lock:
            return sum(now - t > older_than for t in self._pending.values())

    def ok_since(self, since: float, version: str | None = None) -> dict[str, int]:
        """Successful answers per transport sent after ``since`` (from ``version`` if given)."""
        counts = dict.fromkeys(TRANSPORTS, 0)
        for c in self.snapshot():
            if c.start > since and c.outcome == "ok" and (version is None or c.version == version):
                counts[c.transport] += 1
        return counts

    def wait_answers(self, count: int = 10, since: float | None = None, version: str | None = None,
                     timeout: float = 30.0) -> None:
        """Wait until both transports have ``count`` good answers sent after ``since``."""
        since = self.t0 if since is None else since
        ok = wait_until(lambda: min(self.ok_since(since, version).values()) >= count, timeout)
        assert ok, (f"load stalled: {self.ok_since(since, version)} answers (version {version}) since "
                    f"{since - self.t0:+.3f}s; last calls: {[c.show(self.t0) for c in self.snapshot()[-4:]]}")


def _close(client) -> None:
    """Close a client in the thread that used it (tritonclient's HTTP client, left to the garbage
    collector, closes its gevent pool from whichever thread collects it, and fails there)."""
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


# -- which versions may answer when ---------------------------------------------------------------
class Timeline:
    """Epochs of allowed versions. A call may be answered by any version allowed in an epoch that
    overlaps [sent, answered]. Mark the *start* of an uncertain phase before acting, and the
    certain phase only after the gateway showed it (a load call returned, the index changed)."""

    def __init__(self, *allowed: str) -> None:
        self.epochs: list[tuple[float, frozenset[str]]] = [(float("-inf"), frozenset(allowed))]

    def mark(self, *allowed: str) -> float:
        now = time.monotonic()
        self.epochs.append((now, frozenset(allowed)))
        return now

    def allowed(self, start: float, end: float) -> set[str]:
        out: set[str] = set()
        for i, (t, versions) in enumerate(self.epochs):
            t_next = self.epochs[i + 1][0] if i + 1 < len(self.epochs) else float("inf")
            if t <= end and t_next > start:
                out |= versions
        return out


def violations(calls: Iterable[Call], timeline: Timeline) -> list[Call]:
    """Failed or inconsistent calls, and answers from a version not allowed at that moment."""
    return [c for c in calls if c.outcome != "ok" or c.version not in timeline.allowed(c.start, c.end)]


def assert_clean(load: Load, timeline: Timeline, min_calls: int = 20) -> list[Call]:
    """Stop ``load``; zero failed requests, every answer consistent and allowed."""
    calls = load.stop()
    for t in TRANSPORTS:
        n = sum(c.transport == t for c in calls)
        assert n >= min_calls, f"too little {t} load to prove anything: {n} calls"
    bad = violations(calls, timeline)
    epochs = [(round(t - load.t0, 3), sorted(v)) for t, v in timeline.epochs[1:]]
    assert not bad, (f"{len(bad)} of {len(calls)} calls failed or came from a version not allowed then "
                     f"(epochs {epochs}): {[c.show(load.t0) for c in bad[:6]]}")
    return calls


# -- the gateway's repository API, metrics and memory ----------------------------------------------
def http_post(gw: GatewayProcess, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """POST JSON; (status, decoded body or {})."""
    req = urllib.request.Request(f"http://{gw.http_url}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    doc = json.loads(raw) if raw.strip() else {}
    return status, doc


def load_model(gw: GatewayProcess, model: str, **params) -> tuple[int, dict]:
    return http_post(gw, f"/v2/repository/models/{model}/load", {"parameters": params})


def unload_model(gw: GatewayProcess, model: str) -> tuple[int, dict]:
    return http_post(gw, f"/v2/repository/models/{model}/unload", {})


def states(gw: GatewayProcess, model: str) -> dict[str, tuple[str, str]]:
    """version -> (state, reason) of ``model`` in the repository index."""
    status, rows = http_post(gw, "/v2/repository/index", timeout=10.0)
    assert status == 200, rows
    return {r.get("version", ""): (r["state"], r.get("reason", "")) for r in rows if r["name"] == model}


def serving(gw: GatewayProcess, model: str) -> set[str]:
    return {v for v, (state, _) in states(gw, model).items() if state == "READY"}


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    """One sample of the Prometheus endpoint (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            key, _, value = line.rpartition(" ")
            got = key[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want or (not want and not got):
                return float(value)
    return 0.0


def rss_mb(gw: GatewayProcess) -> float:
    """Resident memory of the gateway process (VmRSS), in MB."""
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
