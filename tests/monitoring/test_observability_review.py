"""Review of the request-id / access-log / tracing change, on real gateways: the paths where an
exchange could be left open or logged with the wrong status, hostile request ids, and the
shutdown with tracing's collector unreachable. The tests under "defects" failed before 2548f62
(they were committed as xfail(strict) in f95169e / 1c9bf91), and the stuck-stdout and stream-status
tests before the change that removed their xfail(strict) marks (cbb2497 / 7f884cf); the others pin
behaviour that was checked and found right."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.frontends import grpc_service
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc
from routing_helpers import metric, metrics
from tcp_relay import TcpRelay

SLOW = """
max_batch_size: 256
instance_group [{ count: 1, kind: KIND_CPU }]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
BIG = np.random.default_rng(0).random((256, 1024), dtype=np.float32)  # runs for seconds on "slow"
SMALL_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("review")
    repo = root / "repo"
    modelzoo.build_scaled(repo, "primary")
    modelzoo.build_slow(repo, "slow", layers=384)
    modelzoo.write_config(repo / "slow", SLOW)
    config = root / "gateway.yaml"
    config.write_text(f'access_log: {{path: "{root / "access.jsonl"}"}}\n', encoding="utf-8")
    # fifo: no predictive admission, so a short deadline runs out during the execution, not before it
    with GatewayProcess(repo, ["--config", str(config), "--scheduler", "fifo"]) as g:
        g.root = root  # type: ignore[attr-defined]
        yield g


def _lines(gw: GatewayProcess) -> list[dict]:
    path = gw.root / "access.jsonl"  # type: ignore[attr-defined]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]  # every line must be JSON


def _line(gw: GatewayProcess, request_id: str) -> dict:
    assert wait_until(lambda: any(r["request_id"] == request_id for r in _lines(gw)), timeout=20), request_id
    found = [r for r in _lines(gw) if r["request_id"] == request_id]
    assert len(found) == 1, found  # finished once
    return found[0]


def _in_flight(gw: GatewayProcess, protocol: str) -> float:
    return metric(metrics(gw), "onnxgate_requests_in_flight", protocol=protocol)


def _raw(gw: GatewayProcess, head: bytes, body: bytes = b"", read: bool = True) -> bytes:
    """One request written on a raw socket; its answer's bytes (b"" when not read)."""
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=30) as s:
        s.sendall(head + body)
        if not read:
            return b""
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def _head(request_id: bytes, length: int, path: bytes = b"/v2/models/primary/infer", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + request_id + b"\r\n" + extra
            + b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def _big_body() -> bytes:
    doc = {"inputs": [{"name": "x", "shape": list(BIG.shape), "datatype": "FP32", "data": BIG.ravel().tolist()}]}
    return json.dumps(doc).encode()


def _slow_grpc_request(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(BIG.shape))
    request.raw_input_contents.append(BIG.tobytes())
    return request


# -- checked and found right -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [b"a\x00b", b"\xff\xfe", b"x" * 5000, b"\x7f"])
def test_hostile_http_request_ids_are_refused_with_400_and_never_echoed(gw, bad):
    answer = _raw(gw, _head(bad, len(SMALL_BODY)), SMALL_BODY.encode())
    status_line, _, headers = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"x-request-id" not in headers.split(b"\r\n\r\n")[0].lower()


def test_duplicate_request_id_headers_echo_one_id_in_one_header(gw):
    answer = _raw(gw, _head(b"dup-one", len(SMALL_BODY), extra=b"X-Request-Id: dup-two\r\n"), SMALL_BODY.encode())
    head = answer.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    echoed = [h for h in head if h.startswith(b"x-request-id:")]
    assert head[0].startswith(b"http/1.1 200") and len(echoed) == 1
    assert echoed[0].split(b":", 1)[1].strip() in (b"dup-one", b"dup-two")


def test_grpc_binary_request_id_metadata_is_ignored_and_the_v2_id_is_used(gw):
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="primary", id="bin-md-v2")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
        _, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id-bin", b"\x00\xff\n"),))
        assert dict(call.trailing_metadata())["x-request-id"] == "bin-md-v2"
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=(("x-request-id", "y" * 129),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_refusal_and_cancellation_path_leaves_no_request_in_flight(gw):
    """413 before the body, a body cut short, a client gone during the execution, a gRPC call
    cancelled and one past its deadline, a stream ended early by triton_grpc_error: each is
    logged once, every line is JSON, and the in-flight gauge comes back to 0."""
    _raw(gw, _head(b"flight-413", 10**12))
    _raw(gw, _head(b"flight-cut", 1000), b'{"inp', read=False)
    big = _big_body()
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=30) as s:
        s.sendall(_head(b"flight-gone", len(big), b"/v2/models/slow/infer") + big)
        assert wait_until(lambda: _in_flight(gw, "http") >= 1, timeout=20)
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        future = stub.ModelInfer.future(_slow_grpc_request("flight-cancel"))
        assert wait_until(lambda: _in_flight(gw, "grpc") >= 1, timeout=20)
        future.cancel()
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(_slow_grpc_request("flight-deadline"), timeout=0.5)

        def stream() -> Iterator[pb.ModelInferRequest]:
            yield _slow_grpc_request("flight-stream-slow")
            assert wait_until(lambda: _in_flight(gw, "grpc") >= 1, timeout=20)
            yield pb.ModelInferRequest(model_name="nope", id="flight-stream-bad")
            wait_until(lambda: False, timeout=5)  # keeps the request side open

        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(stream(), metadata=(("triton_grpc_error", "true"),)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: _in_flight(gw, "http") == 0 and _in_flight(gw, "grpc") == 0, timeout=30), metrics(gw)
    assert _line(gw, "flight-413")["status"] == 413
    assert _line(gw, "flight-stream-bad")["status"] == "NOT_FOUND"
    assert _line(gw, "flight-stream-slow")["status"] == "CANCELLED"
    for request_id in ("flight-cut", "flight-gone", "flight-cancel", "flight-deadline"):
        _line(gw, request_id)


# -- defects found in the review, fixed in 2548f62 ----------------------------------------------
def test_a_client_gone_before_the_whole_body_is_logged_499(gw):
    _raw(gw, _head(b"cut-body", 1000), b'{"inp', read=False)
    line = _line(gw, "cut-body")
    assert line["status"] == 499 and line["outcome"] == "cancelled", line


def test_a_client_gone_during_the_execution_is_logged_cancelled(gw):
    big = _big_body()
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=30) as s:
        s.sendall(_head(b"gone-running", len(big), b"/v2/models/slow/infer") + big)
        assert wait_until(lambda: _in_flight(gw, "http") >= 1, timeout=20)
    line = _line(gw, "gone-running")
    assert line["status"] == 499, line
    assert line["outcome"] == "cancelled", line  # as a cancelled gRPC call is; "error" is a server fault


def test_a_grpc_call_past_its_deadline_is_logged_with_the_status_the_client_got(gw):
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # one row answered: the instance is idle (an execution a cancelled request left runs on)
        idle = pb.ModelInferRequest(model_name="slow")
        idle.inputs.add(name="x", datatype="FP32", shape=[1, 1024]).contents.fp32_contents.extend([0.0] * 1024)
        stub.ModelInfer(idle, timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_slow_grpc_request("past-deadline"), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _line(gw, "past-deadline")["status"] == "DEADLINE_EXCEEDED"


def test_a_deadline_that_runs_out_at_the_client_first_is_logged_deadline_exceeded(gw):
    # the call's headers take 30 ms to arrive, so the gateway's copy of the deadline runs out 30 ms
    # after the client's: the client's cancel (which does not say why) arrives with 30 ms left
    proxy = TcpRelay(gw.grpc_port)
    try:
        with grpc.insecure_channel(proxy.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            idle = pb.ModelInferRequest(model_name="slow")
            idle.inputs.add(name="x", datatype="FP32", shape=[1, 1024]).contents.fp32_contents.extend([0.0] * 1024)
            stub.ModelInfer(idle, timeout=120)
            proxy.lag_for(0.2, lag=0.03)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_slow_grpc_request("lagging-deadline"), timeout=0.5)
    finally:
        proxy.close()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _line(gw, "lagging-deadline")["status"] == "DEADLINE_EXCEEDED"


class _Remaining:
    """The one part of a grpc.aio context that the status of a cancelled call depends on."""

    def __init__(self, *left: float | None) -> None:
        self.left = list(left)

    def time_remaining(self) -> float | None:
        return self.left.pop(0)


@pytest.mark.parametrize(("window", "left", "status"), [
    (0.5, 0.07, "CANCELLED"),  # cancelled 70 ms before a 0.5 s deadline: more than a tenth of it left
    (0.5, 0.03, "DEADLINE_EXCEEDED"),  # the headers' delay: the client's deadline
    (10.0, 0.09, "DEADLINE_EXCEEDED"),
    (10.0, 0.2, "CANCELLED"),  # more than the slack's bound
    (0.05, 0.01, "CANCELLED"),  # a short deadline: not every cancel of its calls is the deadline
    (0.05, 0.0, "DEADLINE_EXCEEDED"),
    (None, None, "CANCELLED"),  # no deadline
])
def test_a_cancel_is_taken_for_the_client_deadline_only_within_the_slack(window, left, status):
    context = _Remaining(window, left)
    slack = grpc_service._deadline_slack(context)  # at the call's start
    code, _ = grpc_service._status_of(asyncio.CancelledError(), context, slack)  # when it is cancelled
    assert code.name == status


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A collector address that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def test_an_unanswering_collector_does_not_hold_the_exit_past_the_drain_budget(tmp_path: Path, blackhole: str):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary")
    env = {
        **os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": blackhole, "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    g = GatewayProcess(repo, ["--drain-timeout-s", "1"], env=env).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", g.http_port, timeout=30)
        for _ in range(20):
            conn.request("POST", "/v2/models/primary/infer", SMALL_BODY)
            response = conn.getresponse()
            response.read()
            assert response.status == 200  # the unanswering collector never fails a request
        conn.close()
        # A liveness bound, not a measurement: the drain budget is 1 s; the SDK's shutdown, called
        # without a timeout, waits its default 30 s for the exporter and the exit waits for it.
        assert g.stop(timeout=20) == 0, g.log[-2000:]
    finally:
        g.kill()


def test_an_unopenable_access_log_fails_the_start_under_workers(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary")
    config = tmp_path / "gateway.yaml"
    config.write_text(f'access_log: {{path: "{tmp_path}"}}\n', encoding="utf-8")  # a directory
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
           "--metrics-port", "0", "--model-repository", str(repo), "--config", str(config), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc = proc.wait(60)  # a liveness bound: the single-process gateway exits at once
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc is not None and rc != 0


def test_a_hostile_tracestate_does_not_write_a_log_line_per_request(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "parentbased_always_off"}
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with GatewayProcess(repo, env=env) as g:
        for i in range(20):
            head = _head(f"ts-{i}".encode(), len(SMALL_BODY), extra=b"traceparent: " + traceparent + b"\r\n"
                         + b"tracestate: \xe9vil=" + str(i).encode() + b"\r\n")
            assert _raw(g, head, SMALL_BODY.encode()).startswith(b"HTTP/1.1 200")
    assert wait_until(lambda: " stopped" in g.log, timeout=30)  # the whole log has been read
    warnings = [line for line in g.lines if "w3c identifiers format" in line]
    assert len(warnings) <= 1, warnings[:3]


def test_the_drain_cut_is_logged_with_the_status_the_client_got(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_slow(repo, "slow", layers=768)
    modelzoo.write_config(repo / "slow", SLOW)
    config = tmp_path / "gateway.yaml"
    config.write_text(f'access_log: {{path: "{tmp_path / "access.jsonl"}"}}\n', encoding="utf-8")
    g = GatewayProcess(repo, ["--config", str(config), "--drain-timeout-s", "1"]).start()
    g.root = tmp_path  # type: ignore[attr-defined]
    try:
        with grpc.insecure_channel(g.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            future = stub.ModelInfer.future(_slow_grpc_request("cut-grpc"), timeout=120)
            assert wait_until(lambda: _in_flight(g, "grpc") >= 1, timeout=20)
            g.signal()
            with pytest.raises(grpc.RpcError) as err:
                future.result()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert g.stop(timeout=60) == 0
    finally:
        g.kill()
    line = _line(g, "cut-grpc")
    assert line["status"] == "UNAVAILABLE" and line["outcome"] == "unavailable", line


# -- still open -----------------------------------------------------------------------------------------
class _StdoutPipeGateway(GatewayProcess):
    """A gateway whose standard output is a pipe nobody reads (a stuck log shipper)."""

    def start(self, timeout: float = 60.0) -> _StdoutPipeGateway:

        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout) or not self.grpc_port:
            self.kill()
            raise RuntimeError(f"did not become ready:\n{self.log}")
        return self


def test_a_stuck_stdout_does_not_hold_the_drain_past_its_budget(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary")
    config = tmp_path / "gateway.yaml"
    config.write_text('access_log: {path: "-"}\n', encoding="utf-8")
    g = _StdoutPipeGateway(repo, ["--config", str(config), "--drain-timeout-s", "1"]).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", g.http_port, timeout=30)
        for i in range(800):  # ~300 kB of lines: the 64 kB pipe is full, the writer blocks in write()
            request_id = f"stuck-{i:04d}-" + "p" * 100
            conn.request("POST", "/v2/models/primary/infer", SMALL_BODY, {"X-Request-Id": request_id})
            response = conn.getresponse()
            response.read()
            assert response.status == 200  # the request path never waits for the writer
        conn.close()
        g.signal()
        assert g.proc is not None
        g.proc.wait(60)
    finally:
        g.kill()
    assert wait_until(lambda: " stopped" in g.log, timeout=30)
    assert "closing access log overran" not in g.log, g.log[-1500:]


def _idle(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """One row of "slow" answered: its instance is idle (an execution a cancelled request left runs on)."""
    idle = pb.ModelInferRequest(model_name="slow")
    idle.inputs.add(name="x", datatype="FP32", shape=[1, 1024]).contents.fp32_contents.extend([0.0] * 1024)
    stub.ModelInfer(idle, timeout=120)


def test_a_stream_message_past_the_streams_deadline_is_logged_deadline_exceeded(gw):
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _idle(stub)

        def stream() -> Iterator[pb.ModelInferRequest]:
            yield _slow_grpc_request("stream-past-deadline")
            wait_until(lambda: False, timeout=5)  # keeps the request side open

        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(stream(), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _line(gw, "stream-past-deadline")["status"] == "DEADLINE_EXCEEDED"


def test_a_stream_message_cut_by_the_drain_is_logged_unavailable(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_slow(repo, "slow", layers=768)
    modelzoo.write_config(repo / "slow", SLOW)
    config = tmp_path / "gateway.yaml"
    config.write_text(f'access_log: {{path: "{tmp_path / "access.jsonl"}"}}\n', encoding="utf-8")
    g = GatewayProcess(repo, ["--config", str(config), "--drain-timeout-s", "1"]).start()
    g.root = tmp_path  # type: ignore[attr-defined]
    try:
        with grpc.insecure_channel(g.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def stream() -> Iterator[pb.ModelInferRequest]:
                yield _slow_grpc_request("cut-stream")
                assert wait_until(lambda: _in_flight(g, "grpc") >= 1, timeout=20)
                g.signal()
                wait_until(lambda: False, timeout=20)  # keeps the request side open

            with pytest.raises(grpc.RpcError) as err:
                list(stub.ModelStreamInfer(stream(), timeout=120))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert g.stop(timeout=60) == 0
    finally:
        g.kill()
    assert _line(g, "cut-stream")["status"] == "UNAVAILABLE"
