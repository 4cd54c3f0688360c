"""Request ids and the access log through a real gateway: both transports, streams, refusals,
routes and the sample log all speak of a request by the same id."""

from __future__ import annotations

import http.client
import json
import queue
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.core.monitoring.access_log import AccessLogConfig, AccessLogger, format_line
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

X = np.arange(8, dtype=np.float32).reshape(2, 4)
FIELDS = {
    "time", "request_id", "trace_id", "peer", "protocol", "model", "route", "version", "status", "outcome", "rows",
    "queue_ms", "compute_ms", "latency_ms", "reason", "error",
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("access")
    repo = root / "repo"
    modelzoo.build_scaled(repo, "primary", scale=2.0)
    modelzoo.build_scaled(repo, "candidate", scale=3.0)
    config = root / "gateway.yaml"
    config.write_text(
        f"""
routes:
  - name: scoring
    split: [{{target: primary, weight: 1}}]
    shadow: {{target: candidate, fraction: 1.0}}
access_log: {{path: {root / "access.jsonl"}}}
sample_log:
  default: {{rate: 1.0}}
  sink: {{type: jsonl, path: {root / "samples"}, rotate_s: 0.2}}
""",
        encoding="utf-8",
    )
    with GatewayProcess(repo, ["--config", str(config)]) as g:
        g.root = root  # type: ignore[attr-defined]
        yield g


def _lines(gw: GatewayProcess) -> list[dict]:
    path = gw.root / "access.jsonl"  # type: ignore[attr-defined]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _line(gw: GatewayProcess, request_id: str) -> dict:
    """The one access-log line of ``request_id`` (waiting for the writer)."""
    def matching() -> list[dict]:
        return [r for r in _lines(gw) if r["request_id"] == request_id]

    assert wait_until(lambda: bool(matching()), timeout=10), f"no access-log line for {request_id}"
    found = matching()
    assert len(found) == 1, found
    assert set(found[0]) == FIELDS
    return found[0]


def _post(gw: GatewayProcess, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    try:
        conn.request("POST", path, body, headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if raw else {}
    finally:
        conn.close()


def _infer_body(request_id: str | None = None) -> bytes:
    doc: dict = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()


def test_http_the_client_id_wins_and_is_echoed_and_logged(gw):
    status, headers, body = _post(gw, "/v2/models/primary/infer", _infer_body("v2-id"), {"X-Request-Id": "client-1"})
    assert status == 200, body
    assert headers["x-request-id"] == "client-1"
    assert body["id"] == "v2-id"  # the V2 id is the protocol's and is echoed as it was
    line = _line(gw, "client-1")
    assert line["protocol"] == "http" and line["model"] == "primary" and line["version"] == "1"
    assert line["status"] == 200 and line["outcome"] == "ok" and line["rows"] == 2
    assert line["route"] is None and line["reason"] is None and line["error"] is None
    assert line["peer"].startswith("127.0.0.1:")
    assert line["latency_ms"] >= line["compute_ms"] > 0 and line["queue_ms"] >= 0
    assert line["trace_id"] is None  # tracing is off


def test_http_the_v2_id_is_used_else_one_is_made(gw):
    _, headers, _ = _post(gw, "/v2/models/primary/infer", _infer_body("only-v2"))
    assert headers["x-request-id"] == "only-v2"
    _line(gw, "only-v2")
    made = {_post(gw, "/v2/models/primary/infer", _infer_body())[1]["x-request-id"] for _ in range(3)}
    assert len(made) == 3 and all(made)
    for request_id in made:
        assert _line(gw, request_id)["status"] == 200
    # a V2 id that cannot be a header value is not used as the request id (the body still echoes it)
    status, headers, body = _post(gw, "/v2/models/primary/infer", _infer_body("bad id\twith spaces"))
    assert status == 200 and body["id"] == "bad id\twith spaces"
    assert headers["x-request-id"] != body["id"]
    _line(gw, headers["x-request-id"])


@pytest.mark.parametrize("bad", ["x" * 129, "tab\there", "sp ace", "é"])
def test_http_a_bad_client_id_is_refused_with_400(gw, bad):
    status, _, body = _post(gw, "/v2/models/primary/infer", _infer_body(), {"X-Request-Id": bad.encode("utf-8")})
    assert status == 400, body
    assert "X-Request-Id" in body["error"]


def test_http_refusals_are_logged_with_their_status_and_reason(gw):
    status, headers, _ = _post(gw, "/v2/models/nope/infer", _infer_body(), {"X-Request-Id": "unknown-model"})
    assert status == 404 and headers["x-request-id"] == "unknown-model"
    line = _line(gw, "unknown-model")
    assert line["status"] == 404 and line["outcome"] == "not_found" and "nope" in line["error"]
    status, headers, _ = _post(gw, "/v2/models/primary/infer", b"{not json", {"X-Request-Id": "bad-json"})
    assert status == 400 and headers["x-request-id"] == "bad-json"
    line = _line(gw, "bad-json")
    assert line["status"] == 400 and line["outcome"] == "invalid_input" and line["version"] is None


def test_grpc_metadata_id_and_trailing_metadata_echo(gw):
    channel = grpc.insecure_channel(gw.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="primary", id="grpc-v2")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(X.ravel().tolist())
    _, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-client"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "grpc-client"
    line = _line(gw, "grpc-client")
    assert line["protocol"] == "grpc" and line["status"] == "OK" and line["model"] == "primary" and line["rows"] == 2
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    # without metadata: the V2 id
    _, call = stub.ModelInfer.with_call(request)
    assert dict(call.trailing_metadata())["x-request-id"] == "grpc-v2"
    # a refusal has the id too, beside its status
    missing = pb.ModelInferRequest(model_name="nope", id="grpc-missing")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(missing)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata())["x-request-id"] == "grpc-missing"
    line = _line(gw, "grpc-missing")
    assert line["status"] == "NOT_FOUND" and line["outcome"] == "not_found"
    channel.close()


def test_grpc_stream_requests_each_have_their_own_id(gw):
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    for i in range(3):
        client.async_stream_infer("primary", [inp], request_id=f"stream-{i}")
    for _ in range(3):
        _, error = results.get(timeout=30)
        assert error is None
    client.stop_stream()
    for i in range(3):
        line = _line(gw, f"stream-{i}")
        assert line["protocol"] == "grpc" and line["status"] == "OK" and line["rows"] == 2


def test_route_requests_name_the_route_and_the_sample_log_has_the_same_id(gw):
    client = httpclient.InferenceServerClient(gw.http_url)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    client.infer("scoring", [inp], headers={"X-Request-Id": "routed-1"})
    line = _line(gw, "routed-1")
    assert line["model"] == "scoring" and line["route"] == "scoring" and line["version"] == "1"

    def records() -> list[dict]:
        out = []
        for f in sorted((gw.root / "samples").glob("*.jsonl")):  # type: ignore[attr-defined]
            out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        return [r for r in out if r["request_id"] == "routed-1"]

    assert wait_until(lambda: len(records()) == 1, timeout=15)
    record = records()[0]
    assert record["route"] == "scoring" and record["model"] == "primary" and record["trace_id"] == ""
    assert record["shadow"]["target"] == "candidate"


def test_access_log_metrics_count_lines(gw):
    _post(gw, "/v2/models/primary/infer", _infer_body(), {"X-Request-Id": "counted"})
    _line(gw, "counted")
    conn = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    written = [float(x.split()[1]) for x in text.splitlines() if x.startswith("onnxgate_access_log_lines_total ")]
    assert written and written[0] >= 1
    assert "onnxgate_access_log_dropped_total 0.0" in text


# -- the logger itself -------------------------------------------------------------------------------
def _entry(request_id: str) -> tuple:
    return (0.0, request_id, "", ("127.0.0.1", 1), "http", "m", "", "1", 200, "ok", 1, 1000, 2000, 5000, "", "")


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path: Path):
    logger = AccessLogger(AccessLogConfig(path=str(tmp_path / "a.log"), queue_size=2))
    logger.offer(_entry("before-start"))  # not started: dropped, counted
    assert logger.dropped._value.get() == 1
    logger._open()  # opened, but its writer not started: the queue fills
    logger._thread = object()  # type: ignore[assignment]
    for i in range(5):
        logger.offer(_entry(f"e{i}"))
    assert logger.dropped._value.get() == 1 + 3
    logger._thread = None


def test_the_file_is_reopened_when_it_is_moved(tmp_path: Path):
    path = tmp_path / "a.log"
    logger = AccessLogger(AccessLogConfig(path=str(path)))
    logger.start()
    try:
        logger.offer(_entry("one"))
        assert wait_until(lambda: path.exists() and "one" in path.read_text())
        path.rename(tmp_path / "a.log.1")  # logrotate's default: move, then the writer reopens
        logger.offer(_entry("two"))
        assert wait_until(lambda: path.exists() and "two" in path.read_text())
        assert "two" not in (tmp_path / "a.log.1").read_text()
    finally:
        logger.close()
    assert logger.written._value.get() == 2


def test_line_format_is_json_with_every_field():
    line = json.loads(format_line((1_700_000_000.5, "id", "ab" * 16, "ipv4:1.2.3.4:5", "grpc", "m", "r", "2",
                                   "RESOURCE_EXHAUSTED", "overloaded", 3, None, None, 7_500_000, "queue_full",
                                   "x" * 1000)))
    assert set(line) == FIELDS
    assert line["time"] == "2023-11-14T22:13:20.500000Z"
    assert line["latency_ms"] == 7.5 and line["queue_ms"] is None and line["reason"] == "queue_full"
    assert len(line["error"]) == 200


def test_close_keeps_to_its_budget_and_counts_the_lines_a_stuck_output_did_not_take(tmp_path: Path):
    import os

    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the pipe fills
    try:
        logger = AccessLogger(AccessLogConfig(path=str(fifo), queue_size=5000))
        logger.start()
        offered = 2000
        for i in range(offered):
            logger.offer(_entry(f"stuck-{i:05d}-" + "p" * 200))
        logger.close(0.2)  # returns (after MIN_CLOSE_S) although the writer is blocked in write()
        written, dropped = logger.written._value.get(), logger.dropped._value.get()
        assert dropped > 0
        assert written + dropped <= offered
        assert written + dropped >= offered - 1024  # at most the batch in the blocked write is in neither
    finally:
        os.close(reader)


def test_an_entry_that_cannot_be_formatted_is_dropped_alone(tmp_path: Path):
    path = tmp_path / "a.log"
    logger = AccessLogger(AccessLogConfig(path=str(path)))
    bad = list(_entry("bad"))
    bad[0] = "not a time"  # format_line raises on it
    logger._thread = object()  # type: ignore[assignment]  # taking entries, its writer not yet started
    for entry in (_entry("one"), tuple(bad), _entry("two")):
        logger.offer(entry)
    logger._thread = None
    logger.start()  # after the offers: all three go in one batch
    logger.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ["one", "two"]
    assert logger.written._value.get() == 2 and logger.dropped._value.get() == 1
