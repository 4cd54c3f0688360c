"""A request costs what its model can accept, not what the client sends: the model is looked up
before the body is read, bodies past the model's bound are refused (413 / INVALID_ARGUMENT)
before they are read or decoded, compressed bodies inflate only up to that bound, and the
gateway keeps serving. ``mlp`` takes at most 256 rows of 16 floats: a few hundred KiB."""

from __future__ import annotations

import gzip
import json
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import modelzoo
import swap_helpers as sh
from gateway import GatewayProcess, wait_until
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc
from queue_helpers import GAP_S, SLOW, Call


def _raw_http(gw, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` (and ``body``) on a fresh socket; the reply's status and body. Fails when
    the gateway does not answer within ``timeout`` (it is waiting for a body never sent)."""
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_part, _, rest = data.partition(b"\r\n\r\n")
        lines = head_part.split(b"\r\n")
        lengths = [line.split(b":", 1)[1] for line in lines if line.lower().startswith(b"content-length")]
        length = int(lengths[0]) if lengths else 0
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head_part.split(b" ", 2)[1]), rest


def _head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def test_unknown_model_is_refused_before_its_body_is_read(gateway):
    status, body = _raw_http(gateway, _head("/v2/models/no_such_model/infer", 200 * 1024 * 1024))
    assert status == 404, body
    assert "no_such_model" in json.loads(body)["error"]


def test_a_body_larger_than_the_model_accepts_is_refused_before_it_is_read(gateway):
    status, body = _raw_http(gateway, _head("/v2/models/mlp/infer", 64 * 1024 * 1024))
    assert status == 413, body
    assert "mlp" in json.loads(body)["error"]


def test_a_chunked_body_is_cut_at_the_model_bound(gateway):
    head = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"[" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(64))  # 4 MiB, never finished
    status, reply = _raw_http(gateway, head, body)
    assert status == 413, reply


def test_a_gzip_bomb_inflates_only_up_to_the_model_bound(gateway):
    bomb = gzip.compress(b'{"inputs": [' + b" " * (64 * 1024 * 1024) + b"]}", compresslevel=9)
    assert len(bomb) < 128 * 1024
    status, reply = _raw_http(gateway, _head("/v2/models/mlp/infer", len(bomb), "Content-Encoding: gzip\r\n"), bomb)
    assert status == 413, reply
    assert "decompressed" in json.loads(reply)["error"]


def test_a_grpc_message_larger_than_the_model_accepts_is_invalid(gateway):
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gateway.grpc_url))
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend(np.zeros(1_000_000, np.float32).tolist())
    try:
        stub.ModelInfer(pb.ModelInferRequest(model_name="mlp", inputs=[tensor]), timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        assert "the most a valid request for 'mlp' needs" in exc.details()
    else:
        raise AssertionError("an oversized request was accepted")


def test_the_largest_valid_requests_still_pass_and_the_gateway_serves(gateway):
    x = np.random.default_rng(0).random((256, 16), dtype=np.float32)
    doc = {"inputs": [{"name": "x", "shape": [256, 16], "datatype": "FP32", "data": x.tolist()}]}
    body = json.dumps(doc, indent=4).encode()  # pretty-printed, the largest JSON form in common use
    status, reply = _raw_http(gateway, _head("/v2/models/mlp/infer", len(body)), body)
    assert status == 200, reply[:500]
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gateway.grpc_url))
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[256, 16])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    reply = stub.ModelInfer(pb.ModelInferRequest(model_name="mlp", inputs=[tensor]), timeout=30)
    assert reply.outputs[0].shape == [256, 10]


# -- memory budgets -------------------------------------------------------------------------------
BUDGETS = """
server:
  decode_budget_bytes: 1000
"""
QUEUE_BYTES = """
server:
  max_queued_bytes_per_model: 1500000
"""


def _budget_gateway(root: Path, config_text: str) -> GatewayProcess:
    modelzoo.build_mlp(root / "repo", "mlp")
    modelzoo.build_slow(root / "repo", "slow", layers=256)  # a 256-row request runs for about two seconds
    modelzoo.write_config(root / "repo" / "slow", SLOW.replace("max_queue_size: 2", "max_queue_size: 64"))
    config = root / "gateway.yaml"
    config.write_text(config_text)
    return GatewayProcess(root / "repo", ["--config", str(config)])


@pytest.fixture
def budget_gw(tmp_path: Path):
    with _budget_gateway(tmp_path, BUDGETS) as gw:
        yield gw


@pytest.fixture
def queue_gw(tmp_path: Path):
    with _budget_gateway(tmp_path, QUEUE_BYTES) as gw:
        yield gw


def test_a_request_past_the_decode_budget_is_refused_at_once(budget_gw):
    x = np.zeros((1, 16), np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.tolist()}]})
    body = body.encode() + b" " * 1500  # padding: the body is larger than the whole budget
    with socket.create_connection(("127.0.0.1", budget_gw.http_port), timeout=30) as slow:
        slow.sendall(_head("/v2/models/mlp/infer", len(body)) + body[:100])  # holds the budget, unfinished
        held = lambda: sh.metric(budget_gw, "onnxgate_decode_bytes")  # noqa: E731
        assert wait_until(lambda: held() == 100, timeout=30), held()
        status, reply = _raw_http(budget_gw, _head("/v2/models/mlp/infer", len(body)), body)
        assert status == 429, reply
        assert "decoding" in json.loads(reply)["error"]
        slow.sendall(body[100:])  # alone, a request larger than the budget passes
        data = slow.recv(65536)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert sh.metric(budget_gw, "onnxgate_rejected_requests_total", model="mlp", reason="decode_budget") == 1


def test_queued_tensors_past_the_model_budget_are_refused(queue_gw):
    big = Call(queue_gw, "slow", np.random.default_rng(0).random((256, 1024), dtype=np.float32))
    big.start()
    time.sleep(GAP_S)  # taken and running by now: it holds no queue bytes
    part = np.ones((64, 1024), np.float32)  # 256 KiB each: five fit under 1.5 MB, the sixth does not
    queued = [Call(queue_gw, "slow", part) for _ in range(5)]
    for c in queued:
        c.start()
    depth = lambda: sh.metric(queue_gw, "onnxgate_queue_depth", model="slow", version="1")  # noqa: E731
    assert wait_until(lambda: depth() == 5, timeout=30), depth()
    over = Call(queue_gw, "slow", part)
    over.start()
    assert over.answered() == 429
    assert big.outcome is None, "the large request finished; nothing was queued"
    assert big.answered() == 200
    assert [c.answered() for c in queued] == [200] * 5
    assert sh.metric(queue_gw, "onnxgate_rejected_requests_total", model="slow", reason="queue_bytes") == 1


def test_announced_sizes_hold_no_budget_only_bytes_that_arrived_do(gateway):
    """Clients that announce huge bodies (gzip, to a model the transport alone bounds) and send a
    byte hold one byte of the decode budget, not what they announced: others are still served."""
    head = _head("/v2/models/string/infer", 256 * 1024 * 1024, "Content-Encoding: gzip\r\n")
    stalled = [socket.create_connection(("127.0.0.1", gateway.http_port), timeout=30) for _ in range(3)]
    try:
        for sock in stalled:
            sock.sendall(head + b"\x1f")
        held = lambda: sh.metric(gateway, "onnxgate_decode_bytes")  # noqa: E731
        assert wait_until(lambda: held() == 3, timeout=30), held()  # one byte each, not 768 MiB
        x = np.zeros((1, 16), np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.tolist()}]})
        status, reply = _raw_http(gateway, _head("/v2/models/mlp/infer", len(body)), body.encode())
        assert status == 200, reply
    finally:
        for sock in stalled:
            sock.close()


def test_a_grpc_message_is_not_parsed_before_its_model_is_known(gateway):
    """30 MiB of empty ``outputs`` entries: parsed, a million objects (~800 MB); unparsed, the
    model name up front says NOT_FOUND (unknown) or INVALID_ARGUMENT (past mlp's bound)."""
    filler = b"\x32\x00" * (15 * 1024 * 1024)  # field 6 (outputs), empty, 15M times
    channel = grpc.insecure_channel(gateway.grpc_url)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    before = sh.rss_mb(gateway)
    for name, code in ((b"no_such_model", grpc.StatusCode.NOT_FOUND), (b"mlp", grpc.StatusCode.INVALID_ARGUMENT)):
        message = b"\x0a" + bytes([len(name)]) + name + filler
        try:
            call(message, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() == code, exc
        else:
            raise AssertionError("accepted")
    assert sh.rss_mb(gateway) < before + 200, (before, sh.rss_mb(gateway))


def test_a_route_is_refused_only_for_the_share_of_a_target_that_is_not_ready(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "heavy_share", scale=2.0)
    modelzoo.build_scaled(repo, "light_share", scale=3.0)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "routes:\n  - name: r\n    split: [{target: heavy_share, weight: 70}, {target: light_share, weight: 30}]\n"
    )
    args = ["--config", str(config), "--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, args) as gw:
        assert sh.unload_model(gw, "heavy_share")[0] == 200
        x = np.ones((1, 4), np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]})
        statuses = [_raw_http(gw, _head("/v2/models/r/infer", len(body)), body.encode())[0] for _ in range(40)]
    assert set(statuses) == {200, 503}, statuses  # P(no 200 in 40 at 30 %) < 1e-6
