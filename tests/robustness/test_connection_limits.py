"""Connection limits (issue 11, defect A), through real gateways on port 0.

HTTP is spoken over raw sockets, so that a test can send half a head, stall a body or hold a
connection. Every refusal must be an answer the client can read (431, 408, 503) followed by the
server closing the connection; and the gateway must go on serving. Timeouts in the tests are
small and asserted only as behaviour (the server closed the connection, with this status); the
generous socket timeouts are failure bounds, never measurements.

gRPC: with ``max_concurrent_streams`` 1 a second call on the same channel waits for the first
instead of failing; with a small ``max_connection_age`` the client is moved to a new connection
(a counting TCP proxy sees it) while every call succeeds; oversized metadata is refused.
"""

from __future__ import annotations

import contextlib
import http.client
import queue
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

import modelzoo
from gateway import GatewayProcess
from tcp_relay import TcpRelay

BOUND = 30.0  # seconds: only ever a failure bound
HEADER_LIMIT = 8192


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("limits_repo")
    modelzoo.build_scaled(repo)
    return repo


@pytest.fixture(scope="module")
def strict(repo):
    """Small HTTP limits and a small gRPC metadata limit."""
    args = ["--http-max-header-bytes", str(HEADER_LIMIT), "--http-header-timeout-s", "1",
            "--http-body-timeout-s", "1", "--http-keep-alive-timeout-s", "1", "--grpc-max-metadata-bytes", "4096"]
    with GatewayProcess(repo, args) as gw:
        yield gw


@pytest.fixture(scope="module")
def crowded(repo):
    """Two HTTP connections, one gRPC stream per connection."""
    with GatewayProcess(repo, ["--http-max-connections", "2", "--grpc-max-concurrent-streams", "1"]) as gw:
        yield gw


# -- raw HTTP helpers ---------------------------------------------------------------------------
def _connect(gw) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=BOUND)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails at BOUND)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server did not close the connection within {BOUND}s; got {data[:200]!r}")
    except ConnectionResetError:
        pass  # after the answer: the server stopped reading what we still sent
    return data


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def _read_response(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    """One response on a keep-alive connection (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split(b" ", 2)[1]), headers, body


def _get(path: str = "/v2/health/live", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n".encode() + extra + b"\r\n"


def _live(gw) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=BOUND)
    try:
        conn.request("GET", "/v2/health/live")
        return conn.getresponse().status
    finally:
        conn.close()


def _infer_body(rows: int = 1) -> bytes:
    data = ", ".join(["1.0"] * (4 * rows))
    return f'{{"inputs": [{{"name": "x", "shape": [{rows}, 4], "datatype": "FP32", "data": [{data}]}}]}}'.encode()


def _post_head(length: int, extra: bytes = b"") -> bytes:
    return (b"POST /v2/models/scaled/infer HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n" + extra + b"\r\n")


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    def send():
        with contextlib.suppress(OSError):  # the server may close while we are still sending
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# -- HTTP: head size ----------------------------------------------------------------------------
@pytest.mark.parametrize("head", [
    pytest.param(_get(extra=b"X-Big: " + b"a" * (8 * HEADER_LIMIT) + b"\r\n"), id="complete-head"),
    pytest.param(b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * (3 * HEADER_LIMIT), id="unterminated-head"),
    pytest.param(_get(extra=b"X-Big: " + b"a" * (8 << 20) + b"\r\n"), id="8MiB-header"),
    pytest.param(_get(extra=b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))), id="many-headers"),
])
def test_oversized_head_is_answered_431_and_the_gateway_still_serves(strict, head):
    with _connect(strict) as sock:
        sender = _send_in_background(sock, head)
        response = _until_closed(sock)
        sender.join(BOUND)
    assert _status(response) == 431, response[:300]
    assert b"connection: close" in response.lower()
    assert _live(strict) == 200


def test_head_under_the_limit_is_served(strict):
    with _connect(strict) as sock:
        sock.sendall(_get(extra=b"X-Big: " + b"a" * (HEADER_LIMIT - 200) + b"\r\n"))
        status, _, _ = _read_response(sock)
    assert status == 200


# -- HTTP: timeouts -----------------------------------------------------------------------------
def test_half_sent_head_is_answered_408_and_closed(strict):
    with _connect(strict) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\n")  # no blank line: never complete
        response = _until_closed(sock)
    assert _status(response) == 408, response
    assert _live(strict) == 200


def test_slowloris_drip_does_not_keep_a_head_open(strict):
    """A byte every 0.1 s is progress, but the head as a whole must arrive within the timeout."""
    stop = threading.Event()
    with _connect(strict) as sock:

        def drip():
            with contextlib.suppress(OSError):
                for byte in (b"GET /v2/health/live HTTP/1.1\r\nX-Slow: " + b"a" * 10_000):
                    if stop.wait(0.1):
                        return
                    sock.send(bytes([byte]))

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            response = _until_closed(sock)
        finally:
            stop.set()
            dripper.join(BOUND)
    assert _status(response) == 408, response


def test_connection_that_sends_nothing_is_closed_without_an_answer(strict):
    with _connect(strict) as sock:
        assert _until_closed(sock) == b""


def test_stalled_body_is_answered_408_and_closed(strict):
    body = _infer_body()
    with _connect(strict) as sock:
        sock.sendall(_post_head(len(body)) + body[:10])  # and nothing more
        response = _until_closed(sock)
    assert _status(response) == 408, response
    assert _live(strict) == 200


def test_a_slow_body_that_keeps_moving_is_served(strict):
    """The body timeout is a limit on pauses, not on the whole body: pauses of 0.2 s, with the
    timeout at 1 s, are fine however long the body takes."""
    body = _infer_body(rows=8)
    pieces = [body[i : i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
    with _connect(strict) as sock:
        sock.sendall(_post_head(len(body)))
        for piece in pieces:
            time.sleep(0.2)
            sock.sendall(piece)
        status, _, answer = _read_response(sock)
    assert status == 200, answer
    assert len(pieces) * 0.2 > 1.0  # the whole body took longer than the timeout


def test_idle_keep_alive_connection_is_closed_by_the_server(strict):
    with _connect(strict) as sock:
        sock.sendall(_get())
        status, headers, _ = _read_response(sock)
        assert status == 200 and headers.get(b"connection") != b"close"
        assert _until_closed(sock) == b""  # nothing more is sent: the server closes it


# -- HTTP: connection cap -----------------------------------------------------------------------
def test_past_the_cap_a_request_is_answered_503_while_every_served_connection_is_busy(crowded):
    """Two connections that have not sent their request yet hold the two places (they are not
    idle between requests, so not given up): a third connection's request is refused 503."""
    first, second = _connect(crowded), _connect(crowded)  # accepted, in order, before the third
    try:
        with _connect(crowded) as third:
            third.sendall(_get())
            response = _until_closed(third)
        assert _status(response) == 503, response
        assert b"retry-after: 1" in response.lower()
        for sock in (first, second):  # a connection that has a place is served
            sock.sendall(_get())
            assert _read_response(sock)[0] == 200
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + BOUND  # closed connections give their places back
    while _live_or_refused(crowded) != 200:
        assert time.monotonic() < deadline, "a closed connection's place was never given back"
        time.sleep(0.05)


def test_past_the_cap_the_connection_idle_longest_gives_its_place_to_a_new_request(crowded):
    first, second = _connect(crowded), _connect(crowded)
    try:
        for sock in (first, second):
            sock.sendall(_get())
            assert _read_response(sock)[0] == 200  # both now idle between requests, first the longest
            time.sleep(0.1)  # so that the loop's clock (ms resolution) tells their idle times apart
        with _connect(crowded) as third:
            third.sendall(_get())
            assert _read_response(third)[0] == 200
        assert _until_closed(first) == b""  # closed to make room, as a keep-alive timeout would
        second.sendall(_get())
        assert _read_response(second)[0] == 200
    finally:
        first.close()
        second.close()


def test_past_the_cap_new_connections_are_refused_at_once_so_sockets_never_pile_up(crowded):
    """Two connections hold the places without a request: each further connection is answered 503
    and closed as it is accepted, before it sends anything (it was held open, unanswered)."""
    first, second = _connect(crowded), _connect(crowded)
    try:
        time.sleep(0.2)  # both accepted, in order, before the others
        for _ in range(20):
            with _connect(crowded) as extra:
                response = _until_closed(extra)
            assert _status(response) == 503, response
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + BOUND
    while _live_or_refused(crowded) != 200:
        assert time.monotonic() < deadline, "a closed connection's place was never given back"
        time.sleep(0.05)


def _live_or_refused(gw) -> int:
    with _connect(gw) as sock:
        sock.sendall(_get(extra=b"Connection: close\r\n"))
        return _status(_until_closed(sock))


# -- gRPC ---------------------------------------------------------------------------------------
def _scaled(rid: str) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="scaled", id=rid)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return req


def test_with_one_stream_per_connection_a_second_call_waits_instead_of_failing(crowded):
    with grpc.insecure_channel(crowded.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        requests: queue.Queue = queue.Queue()
        ask = requests.put
        stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=BOUND)
        ask(_scaled("open"))
        assert next(stream).error_message == ""  # the stream holds the connection's one slot
        waiting = stub.ServerLive.future(service_pb2.ServerLiveRequest(), timeout=BOUND)
        for i in range(3):  # the server answers on the open stream meanwhile
            ask(_scaled(f"meanwhile-{i}"))
            assert next(stream).error_message == ""
        assert not waiting.done(), "a second call ran while the one stream allowed was open"
        ask(None)
        assert list(stream) == []
        assert waiting.result(timeout=BOUND).live  # it waited, then succeeded


def test_max_connection_age_moves_the_client_to_a_new_connection_and_calls_still_succeed(repo):
    with GatewayProcess(repo, ["--grpc-max-connection-age-s", "1"]) as gw:
        proxy = TcpRelay(gw.grpc_port)  # it counts the connections it accepted
        try:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                deadline = time.monotonic() + BOUND
                calls = 0
                while proxy.accepted < 3:  # the first connection aged out, and the second too
                    assert time.monotonic() < deadline, f"still on connection {proxy.accepted} after {calls} calls"
                    reply = stub.ModelInfer(_scaled(f"r{calls}"), timeout=BOUND, wait_for_ready=True)
                    assert reply.id == f"r{calls}"
                    calls += 1
                    time.sleep(0.02)
        finally:
            proxy.close()


def test_oversized_metadata_is_refused_and_the_gateway_still_serves(strict):
    with grpc.insecure_channel(strict.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=BOUND, metadata=[("x-big", "a" * 8192)])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        small = [("x-small", "a" * 1024)]
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=BOUND, metadata=small).live
