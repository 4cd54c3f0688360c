"""Graceful shutdown: SIGTERM under load drops nothing, readiness turns false first, exit code 0.

A slow model (a chain of 256x256 MatMuls, ~25 ms a row on one thread) keeps requests in flight while the
signal arrives. Every answered request is checked against ONNX Runtime; a request may be
refused (UNAVAILABLE / 503 / connection error) but never fail otherwise or come back wrong,
and every request that was in flight when the signal came must succeed.

The drain timeout is one budget for the whole drain (issue 11, defect B): a stalled client or
a request longer than the budget does not hold the exit; what is unfinished at the deadline is
answered 503 / UNAVAILABLE, not dropped, and every closing step after it gets only what is left.
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess

N, LAYERS, ROWS = 256, 160, 16  # ~25 ms an execution: 10 clients keep ~8 requests waiting > 50 ms
REFUSED = {"503", "StatusCode.UNAVAILABLE"}
# grpcio's aio server cancels calls that reach it while server.stop() runs, before any handler saw
# them (reproduced with a bare grpc.aio server), so the client sees CANCELLED for a request that was
# never accepted. It counts as a refusal only for requests sent at (or after) the signal.
RACING_STOP = "StatusCode.CANCELLED"
ARGS = ["--cpu-threads", "1"]  # leave a core to the clients so the timing below stays meaningful


def build_slow(repo: Path) -> Path:
    """``x`` float32 [batch, N] -> outer product with ones -> LAYERS x (MatMul W, Tanh) -> mean -> ``y``."""
    w = (np.random.RandomState(7).randn(N, N) / np.sqrt(N)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["x", "axis"], ["x3"]), helper.make_node("Mul", ["x3", "ones"], ["m0"])]
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "w"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{LAYERS}"], ["y"], axes=[1], keepdims=0))
    inits = [modelzoo._init("axis", np.array([-1], np.int64)), modelzoo._init("ones", np.ones((1, N), np.float32)),
             modelzoo._init("w", w)]
    return modelzoo._save(repo, "slow", 1, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], inits)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """(repository, inputs [ROWS, N], expected outputs [ROWS, N])."""
    repo = tmp_path_factory.mktemp("slow_repo")
    model_dir = build_slow(repo)
    # No batching: requests queue one after another, so at any moment most of them have been in
    # the gateway for a while (with batching they would start and end together, in waves).
    modelzoo.write_config(model_dir, "max_batch_size: 0\n")
    x = np.random.RandomState(3).uniform(-2, 2, (ROWS, N)).astype(np.float32)
    y = modelzoo.reference_run(model_dir / "1" / "model.onnx", {"x": x})["y"]
    assert not np.allclose(y[0], y[1]), "rows must be told apart"
    return repo, x, y


@dataclass
class Call:
    thread: int
    protocol: str
    start: float
    end: float
    outcome: str  # ok | refused | conn | wrong | error
    detail: str = ""


def _worker(gw, idx, protocol, x, y, stop, calls, lock):
    mod = grpcclient if protocol == "grpc" else httpclient
    client = None
    row = idx % ROWS
    while not stop.is_set():
        start = time.monotonic()
        try:
            if client is None:
                url = gw.grpc_url if protocol == "grpc" else gw.http_url
                client = mod.InferenceServerClient(url) if protocol == "grpc" else \
                    mod.InferenceServerClient(url, connection_timeout=5.0, network_timeout=30.0)
            inp = mod.InferInput("x", [1, N], "FP32")
            inp.set_data_from_numpy(x[row : row + 1])
            got = client.infer("slow", [inp]).as_numpy("y")
            good = got is not None and got.shape == (1, N) and np.allclose(got[0], y[row], rtol=1e-4, atol=1e-5)
            outcome, detail = ("ok", "") if good else ("wrong", f"row {row}: {got!r}")
        except InferenceServerException as exc:
            outcome = "refused" if exc.status() in REFUSED else "racing" if exc.status() == RACING_STOP else "error"
            detail = f"{exc.status()} {exc.message()}"
        except Exception as exc:  # connection refused / reset: the request never got an answer
            outcome, detail = "conn", f"{type(exc).__name__}: {exc}"
            client = None
        with lock:
            calls.append(Call(idx, protocol, start, time.monotonic(), outcome, detail))
        if outcome in ("refused", "conn", "racing"):
            time.sleep(0.01)


class Load:
    """``threads`` workers (alternating gRPC and HTTP) sending infers until stopped."""

    def __init__(self, gw, slow, threads):
        _, x, y = slow
        self.calls: list[Call] = []
        self.stop = threading.Event()
        lock = threading.Lock()
        self.threads = [
            threading.Thread(target=_worker, args=(gw, i, ("grpc", "http")[i % 2], x, y, self.stop, self.calls, lock),
                             daemon=True)
            for i in range(threads)
        ]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def warm(self, ok: int, timeout: float = 20.0) -> None:
        """Wait until ``ok`` requests have succeeded (the machine may be shared and slow)."""
        deadline = time.monotonic() + timeout
        while sum(c.outcome == "ok" for c in list(self.calls)) < ok:
            assert time.monotonic() < deadline, f"no steady load: {list(self.calls)[:5]}"
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "load threads hung"


def _show(calls: list[Call], t0: float) -> list[str]:
    return [f"{c.protocol} {c.start - t0:+.3f}s..{c.end - t0:+.3f}s {c.outcome} {c.detail[:120]}" for c in calls[:5]]


def _assert_nothing_dropped(calls: list[Call], t_signal: float, t_exit: float, min_in_flight: int = 3) -> None:
    """Times in messages are relative to the signal."""
    bad = [c for c in calls if c.outcome in ("wrong", "error") or (c.outcome == "racing" and c.start < t_signal - 0.02)]
    assert not bad, f"{len(bad)} requests failed or came back wrong: {_show(bad, t_signal)}"
    before = [c for c in calls if c.end < t_signal]
    assert sum(c.outcome == "ok" for c in before) >= 5, f"too little load before the signal: {len(before)} calls"
    assert all(c.outcome == "ok" for c in before), _show([c for c in before if c.outcome != "ok"], t_signal)
    # sent well before the signal, answered after it: these were in flight and must have completed
    in_flight = [c for c in calls if c.start < t_signal - 0.05 and c.end > t_signal]
    assert len(in_flight) >= min_in_flight, f"only {len(in_flight)} requests were in flight at the signal"
    dropped = [c for c in in_flight if c.outcome != "ok"]
    assert not dropped, f"{len(dropped)} of {len(in_flight)} in-flight requests dropped: {_show(dropped, t_signal)}"
    after_exit = [c for c in calls if c.start > t_exit]
    assert all(c.outcome in ("refused", "conn", "racing") for c in after_exit), _show(after_exit, t_signal)


def test_sigterm_under_load_drops_nothing(slow):
    repo = slow[0]
    gw = GatewayProcess(repo, ARGS).start()
    try:
        with Load(gw, slow, threads=10) as load:
            load.warm(ok=20)
            time.sleep(0.3)
            t_signal = time.monotonic()
            gw.signal(signal.SIGTERM)
            code = gw.proc.wait(30)
            t_exit = time.monotonic()
            time.sleep(0.2)
        assert code == 0, f"exit code {code}:\n{gw.log[-3000:]}"
        assert "Traceback" not in gw.log, gw.log[-5000:]
        _assert_nothing_dropped(load.calls, t_signal, t_exit)
        assert {c.protocol for c in load.calls if c.outcome == "ok" and c.end > t_signal} == {"grpc", "http"}
    finally:
        gw.kill()


def _poll_ready(gw, stop, seen, grpc_seen):
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    while not stop.is_set():
        t = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            status = conn.getresponse().status
            conn.close()
        except OSError:
            status = 0  # listener closed
        seen.append((t, status))
        try:
            grpc_seen.append((t, client.is_server_ready(client_timeout=2)))
        except InferenceServerException:
            grpc_seen.append((t, None))  # listener closed
        time.sleep(0.02)


def test_drain_delay_turns_readiness_false_while_still_serving(slow):
    repo = slow[0]
    gw = GatewayProcess(repo, [*ARGS, "--drain-delay-s", "1"]).start()
    seen: list[tuple[float, int]] = []
    grpc_seen: list[tuple[float, bool | None]] = []
    try:
        with Load(gw, slow, threads=4) as load:
            poller = threading.Thread(target=_poll_ready, args=(gw, load.stop, seen, grpc_seen), daemon=True)
            poller.start()
            load.warm(ok=8)
            time.sleep(0.2)
            t_signal = time.monotonic()
            gw.signal(signal.SIGTERM)
            code = gw.proc.wait(30)
            t_exit = time.monotonic()
        poller.join(10)
        assert code == 0, f"exit code {code}:\n{gw.log[-3000:]}"
        assert t_exit - t_signal >= 0.9, f"the gateway exited {t_exit - t_signal:.2f}s after SIGTERM, before the delay"
        assert any(s == 200 for t, s in seen if t < t_signal), seen[:5]
        after = [(round(t - t_signal, 3), s) for t, s in seen if t > t_signal + 0.2]
        assert after and all(s != 200 for _, s in after), f"ready after SIGTERM: {after}"
        assert any(s == 503 for t, s in after if t < 0.9), f"no 503 from /v2/health/ready during the delay: {after}"
        grpc_after = [(round(t - t_signal, 3), r) for t, r in grpc_seen if t > t_signal + 0.2]
        assert any(r is True for t, r in grpc_seen if t < t_signal) and grpc_after, grpc_seen[:5]
        assert all(r is not True for _, r in grpc_after), f"gRPC ServerReady true after SIGTERM: {grpc_after}"
        assert any(r is False for t, r in grpc_after if t < 0.9), f"gRPC ServerReady not false: {grpc_after}"
        window = [c for c in load.calls if t_signal + 0.2 < c.start and c.end < t_signal + 0.8]
        assert window, "no request was sent during the drain delay"
        refused = [c for c in window if c.outcome != "ok"]
        assert not refused, (
            f"{len(refused)} of {len(window)} infers sent during --drain-delay-s were not served "
            f"(readiness is false but the gateway must keep serving until the delay ends): {_show(refused, t_signal)}"
        )
        # Requests here are shorter than the in-flight window; the SIGTERM test checks in-flight ones.
        _assert_nothing_dropped(load.calls, t_signal, t_exit, min_in_flight=0)
    finally:
        gw.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_when_idle_exits_zero(slow, sig):
    gw = GatewayProcess(slow[0], ARGS).start()
    try:
        assert httpclient.InferenceServerClient(gw.http_url).is_server_ready()
        gw.signal(sig)
        assert gw.proc.wait(30) == 0, gw.log[-3000:]
        assert "Traceback" not in gw.log and "stopped" in gw.log, gw.log[-3000:]
    finally:
        gw.kill()


# -- the drain timeout is one budget (issue 11, defect B) -----------------------------------------
BOUND = 30.0  # seconds: only ever a failure bound


def _stalled_body(gw) -> socket.socket:
    """A client that sent an infer's head and half its body, then stalls. ``Expect: 100-continue``
    makes the gateway say when its handler is reading the body, so the request is surely in."""
    sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=BOUND)
    sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 4096\r\nExpect: 100-continue\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 100 "), "the gateway did not start reading the body"
    sock.sendall(b'{"inputs": [')
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_drain_timeout_ends_the_drain_despite_stalled_clients(slow):
    gw = GatewayProcess(slow[0], [*ARGS, "--drain-timeout-s", "0.5"]).start()
    try:
        stalled = _stalled_body(gw)
        half_head = socket.create_connection(("127.0.0.1", gw.http_port), timeout=BOUND)
        half_head.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: g")
        gw.signal(signal.SIGTERM)
        code = gw.proc.wait(BOUND)
        assert code == 0, f"exit code {code}:\n{gw.log[-3000:]}"
        answer = _until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 503 "), answer  # answered, not dropped
        assert _until_closed(half_head) == b""  # no request yet: closed
        assert "Traceback" not in gw.log, gw.log[-5000:]
    finally:
        gw.kill()


def _queued(gw, model: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=BOUND)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(rf'^onnxgate_queue_depth{{model="{model}",version="1"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_drain_budget_is_shared_and_unfinished_requests_are_answered(slow, tmp_path):
    """Two requests each far longer than the 1 s budget (one running, one queued behind it) and a
    stalled client: the gateway exits, each got an answer (its result, or 503 / UNAVAILABLE), and
    each closing step was given what was left of the one budget, the sample log's included (it is
    called even with nothing left)."""
    repo, x, y = slow
    rows = np.tile(x, (8, 1))  # 128 rows: seconds of compute on one thread
    expected = np.tile(y, (8, 1))
    (tmp_path / "samples").mkdir()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"sample_log:\n  default: {{rate: 1.0}}\n  sink: {{type: jsonl, path: {tmp_path / 'samples'}}}\n")
    gw = GatewayProcess(repo, [*ARGS, "--drain-timeout-s", "1", "--config", str(cfg)]).start()
    outcomes: dict[str, str] = {}

    def http_call():
        try:
            client = httpclient.InferenceServerClient(gw.http_url, connection_timeout=BOUND, network_timeout=BOUND)
            inp = httpclient.InferInput("x", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows)
            got = client.infer("slow", [inp]).as_numpy("y")
            outcomes["http"] = "ok" if np.allclose(got, expected, rtol=1e-4, atol=1e-5) else "wrong"
        except InferenceServerException as exc:
            outcomes["http"] = str(exc.status())
        except Exception as exc:
            outcomes["http"] = f"dropped: {type(exc).__name__}: {exc}"

    def grpc_call():
        try:
            client = grpcclient.InferenceServerClient(gw.grpc_url)
            inp = grpcclient.InferInput("x", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows)
            got = client.infer("slow", [inp], client_timeout=BOUND).as_numpy("y")
            outcomes["grpc"] = "ok" if np.allclose(got, expected, rtol=1e-4, atol=1e-5) else "wrong"
        except InferenceServerException as exc:
            outcomes["grpc"] = str(exc.status())

    try:
        quick = httpclient.InferInput("x", [1, N], "FP32")
        quick.set_data_from_numpy(x[:1])
        httpclient.InferenceServerClient(gw.http_url).infer("slow", [quick])  # one sample for the log
        calls = [threading.Thread(target=f, daemon=True) for f in (http_call, grpc_call)]
        for call in calls:
            call.start()
        deadline = time.monotonic() + BOUND
        while _queued(gw, "slow") < 1:  # one runs, the other waits behind it: both are in
            assert time.monotonic() < deadline and not outcomes, f"requests not in flight: {outcomes}"
            time.sleep(0.02)
        stalled = _stalled_body(gw)
        gw.signal(signal.SIGTERM)
        code = gw.proc.wait(BOUND)
        for call in calls:
            call.join(BOUND)
        assert code == 0, f"exit code {code}:\n{gw.log[-3000:]}"
        assert outcomes.get("http") in ("ok", "503"), outcomes
        assert outcomes.get("grpc") in ("ok", str(grpc.StatusCode.UNAVAILABLE)), outcomes
        assert _until_closed(stalled).startswith(b"HTTP/1.1 503 ")
        steps = re.findall(r"drain: closing (.+?) with ([\d.]+)s of the drain budget left", gw.log)
        assert [name for name, _ in steps][:2] == ["shadows", "sample log"], gw.log[-3000:]
        left = [float(budget) for _, budget in steps]
        assert left[0] <= 1.0 and left == sorted(left, reverse=True), steps  # one budget, shrinking
        assert "overran" not in gw.log, gw.log[-3000:]  # the versions close without waiting for ORT
        files = sorted(p.name for p in (tmp_path / "samples").iterdir())
        assert files and not [f for f in files if f.endswith(".part")], files  # closed with 0 s left: renamed
    finally:
        gw.kill()
