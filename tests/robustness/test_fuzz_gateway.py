"""A bounded fuzz run through a real gateway, on both transports, from one fixed seed.

About 3,700 requests, each a valid request for a zoo model mutated a few times by
``fuzz_helpers`` (shapes, datatypes, counts, huge numbers, NaN tokens, nesting, duplicated and
missing fields, binary sizes, Inference-Header-Content-Length, Content-Encoding with right and
wrong data, content types, parameters of every type, byte flips and cuts), plus a few raw HTTP
framings and a ModelStreamInfer stream. ``test_errors.py::test_garbage_never_crashes_or_500s``
mutates bytes of three requests; this run mutates structure, on every model and datatype.

Every answer must be a client error or a success: no HTTP 5xx but 501 and 503, no gRPC
INTERNAL or UNKNOWN. The process never dies, logs no traceback, its RSS stays within
``RSS_GROWTH`` of what it was after warm-up, and at the end it still answers every model, on
both transports, as ONNX Runtime does.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
from collections import Counter

import grpc
import numpy as np
import pytest

from fuzz_helpers import MODELS, datatype_of, grpc_case, http_case
from gateway import GatewayProcess
from onnxgate.core.serving import tensors
from onnxgate_client.pb import grpc_service_pb2 as pb
from protocol_helpers import reference, zoo_feeds

SEED = 20261201
HTTP_REQUESTS = 2000
GRPC_REQUESTS = 1500
STREAM_REQUESTS = 200
MiB = 1 << 20
# The gateway serves one request at a time here. The largest is a gzip body inflating to 32 MiB
# for the (unbounded) BYTES model: inflated, joined and decoded it peaked ~145 MiB over the
# warm-up RSS (VmHWM); other bodies are at most ~1.5 MiB (4096-row batches). 300 MiB leaves room
# for allocator caches and ONNX Runtime arenas, and still catches a decoder allocating for a
# claimed shape (the fuzz claims up to 2**63 elements; 2**26 float64s, 512 MiB, would break the
# bound) or a leak of ~50 KiB per request over the ~3,700 requests. (The in-process property
# tests bound each decode far more tightly, with tracemalloc.)
RSS_GROWTH = 300 * MiB
ALLOWED_5XX = {501, 503}
LARGE_BODY = 256 * 1024  # past any bounded zoo model's limit: may be refused before it is read
FORBIDDEN_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of ``pid`` now (VmRSS) or at its highest so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


class Watch:
    """The gateway process: alive, RSS within bound, no traceback in its log."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.base = rss(gw.pid)
        self.peak = self.base

    def check(self, where: str) -> None:
        assert self.gw.proc.poll() is None, f"gateway died at {where}:\n{self.gw.log[-3000:]}"
        self.peak = rss(self.gw.pid, "VmHWM")  # the high-water mark: peaks between two checks count
        assert self.peak - self.base <= RSS_GROWTH, f"RSS grew {(self.peak - self.base) / MiB:.0f} MiB at {where}"

    def report(self, what: str) -> str:
        return f"{what}; RSS {self.base / MiB:.0f} MiB after warm-up, peak {self.peak / MiB:.0f} MiB"

    def assert_clean_log(self) -> None:
        for needle in ("Traceback", "unhandled error", "Exception in ASGI application"):
            assert needle not in self.gw.log, f"gateway log has {needle!r}:\n{self.gw.log[-5000:]}"


def _http_infer(gw, model: str, feeds) -> dict[str, np.ndarray]:
    body = json.dumps({"inputs": [{"name": n, "shape": list(a.shape), "datatype": datatype_of(a),
                                   "data": a.ravel().tolist()} for n, a in feeds.items()]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request("POST", f"/v2/models/{model}/infer", body)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    assert reply.status == 200, data[:500]
    outs = json.loads(data)["outputs"]
    return {o["name"]: np.array(o["data"], dtype=tensors.BY_V2[o["datatype"]].numpy).reshape(o["shape"]) for o in outs}


def _grpc_infer(stub, model: str, feeds) -> dict[str, np.ndarray]:
    req = pb.ModelInferRequest(model_name=model)
    for name, arr in feeds.items():
        req.inputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
        req.raw_input_contents.append(tensors.encode_raw(tensors.BY_V2[datatype_of(arr)], arr))
    reply = stub(req.SerializeToString(), timeout=30)
    msg = pb.ModelInferResponse.FromString(reply)
    return {o.name: tensors.decode_raw(o.name, tensors.BY_V2[o.datatype], list(o.shape), raw)
            for o, raw in zip(msg.outputs, msg.raw_output_contents, strict=True)}


def assert_serves_every_model(gw, zoo_repo, channel) -> None:
    """Every zoo model, on both transports, answers what ONNX Runtime answers."""
    stub = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for model in MODELS:
        feeds = zoo_feeds(model, rows=2, seed=3)
        want = reference(zoo_repo, model, feeds, version=3 if model == "scaled" else 1)  # scaled serves 1..3
        for got in (_http_infer(gw, model, feeds), _grpc_infer(stub, model, feeds)):
            assert set(got) == set(want), model
            for name, arr in want.items():
                if arr.dtype == object:
                    assert [str(s) for s in got[name].ravel()] == [str(s) for s in arr.ravel()], (model, name)
                elif arr.dtype.kind == "f":
                    np.testing.assert_allclose(got[name].astype(arr.dtype), arr, rtol=1e-5, err_msg=f"{model}.{name}")
                else:
                    np.testing.assert_array_equal(got[name].astype(arr.dtype), arr, err_msg=f"{model}.{name}")


@pytest.fixture(scope="module")
def fuzzed(zoo_repo):
    """A gateway of our own (its RSS and log are the run's alone), warmed up on every model."""
    with GatewayProcess(zoo_repo) as gw:
        channel = grpc.insecure_channel(gw.grpc_url)
        assert_serves_every_model(gw, zoo_repo, channel)
        yield gw, Watch(gw), channel
        channel.close()


class HttpClient:
    """One keep-alive connection, opened again when the gateway closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("POST", path, body, {k: v.encode() for k, v in headers.items()})
                reply = self.conn.getresponse()
                data = reply.read()
                if reply.getheader("connection", "").lower() == "close":
                    self.close()
                return reply.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # a keep-alive connection the server had closed: once more on a new one
                if attempt and len(body) <= LARGE_BODY:
                    raise
        return 0, b""  # refused (413) and closed before the client could send the whole body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _failure_of(status: int, data: bytes) -> str | None:
    """Why this HTTP answer breaks the rules, or None."""
    if status >= 500 and status not in ALLOWED_5XX:
        return f"HTTP {status}"
    if status >= 400:
        try:
            doc = json.loads(data)
        except ValueError:
            return f"HTTP {status} with a body that is not JSON"
        if not (isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"]):
            return f"HTTP {status} without an error message"
    return None


def test_http_fuzz(fuzzed, zoo_repo):
    gw, watch, channel = fuzzed
    rng = random.Random(SEED)
    client = HttpClient(gw.http_port)
    statuses: Counter[int] = Counter()
    failures = []
    valid = 0
    for i in range(HTTP_REQUESTS):
        case = http_case(rng)
        status, data = client.post(case.path, case.body, case.headers)
        statuses[status] += 1
        why = _failure_of(status, data) or (f"HTTP {status} for a valid request" if case.valid and status != 200
                                            else None)
        if why is not None:
            failures.append(f"#{i} {why} {case.what} {case.path} {case.headers}: {data[:300]!r}")
        valid += case.valid
        if i % 100 == 0:
            watch.check(f"HTTP #{i}")
    client.close()
    print(watch.report(f"HTTP statuses: {dict(sorted(statuses.items()))}, {valid} valid requests"))
    assert not failures, "\n".join(failures[:20])
    assert statuses[200] > HTTP_REQUESTS // 10 and statuses[400] > HTTP_REQUESTS // 10, statuses  # both sides hit
    watch.check("HTTP end")
    watch.assert_clean_log()
    assert_serves_every_model(gw, zoo_repo, channel)


def _raw_exchange(port: int, data: bytes, close_early: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if close_early:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_http_framing_fuzz(fuzzed, zoo_repo):
    """Bodies shorter than their Content-Length (the client hangs up), longer than it (the rest is a
    garbled next request), and chunked bodies with right and wrong chunk sizes."""
    gw, watch, channel = fuzzed
    rng = random.Random(SEED + 1)
    for i in range(60):
        case = http_case(rng)
        body = case.body
        head = f"POST {case.path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in case.headers.items())
        kind = i % 4
        if kind == 0:  # hang up mid-body
            data = (head + f"Content-Length: {len(body) + 10}\r\n\r\n").encode() + body
            _raw_exchange(gw.http_port, data, close_early=True)
            continue
        if kind == 1:  # body longer than Content-Length
            data = (head + f"Content-Length: {len(body) // 2}\r\n\r\n").encode() + body
        elif kind == 2:  # chunked, right sizes
            cut = len(body) // 2
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
            data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
        else:  # chunked, a wrong size
            data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n" % (len(body) + 3) + body
            data += b"\r\n0\r\n\r\n"
        reply = _raw_exchange(gw.http_port, data)
        for line in reply.split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 "):
                status = int(line.split()[1])
                assert status < 500 or status in ALLOWED_5XX, (i, reply[:500])
    watch.check("framing end")
    watch.assert_clean_log()
    assert_serves_every_model(gw, zoo_repo, channel)


def test_grpc_fuzz(fuzzed, zoo_repo):
    gw, watch, channel = fuzzed
    rng = random.Random(SEED + 2)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    codes: Counter[str] = Counter()
    failures = []
    valid_count = 0
    for i in range(GRPC_REQUESTS):
        data, valid = grpc_case(rng)
        valid_count += valid
        try:
            call(data, timeout=30)
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
            if exc.code() in FORBIDDEN_GRPC or valid:
                failures.append(f"#{i} {exc.code().name} (valid: {valid}): {exc.details()} <- {data[:200]!r}")
        if i % 100 == 0:
            watch.check(f"gRPC #{i}")
    print(watch.report(f"gRPC codes: {dict(sorted(codes.items()))}, {valid_count} valid requests"))
    assert not failures, "\n".join(failures[:20])
    assert codes["OK"] > GRPC_REQUESTS // 10 and codes["INVALID_ARGUMENT"] > GRPC_REQUESTS // 10, codes
    watch.check("gRPC end")
    watch.assert_clean_log()
    assert_serves_every_model(gw, zoo_repo, channel)


def test_grpc_stream_fuzz(fuzzed, zoo_repo):
    """Mutated requests (and bytes) on one ModelStreamInfer stream: each failure comes back in its
    reply with a client's status, and the stream carries on."""
    gw, watch, channel = fuzzed
    rng = random.Random(SEED + 3)
    messages = [grpc_case(rng)[0] for _ in range(STREAM_REQUESTS)]  # bytes: some do not even parse
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    codes: Counter[str] = Counter()
    for reply in stream(iter(messages), timeout=120):
        if reply.error_message:
            codes[reply.infer_response.parameters["grpc_status_code"].string_param] += 1
        else:
            codes["OK"] += 1
    print(watch.report(f"stream codes: {dict(sorted(codes.items()))}"))
    assert sum(codes.values()) == STREAM_REQUESTS, codes
    assert not {c.name for c in FORBIDDEN_GRPC} & set(codes), codes
    assert codes["OK"] and codes["INVALID_ARGUMENT"], codes
    watch.check("stream end")
    watch.assert_clean_log()
    assert_serves_every_model(gw, zoo_repo, channel)
