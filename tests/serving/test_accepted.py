"""Nothing accepted is lost: every request a version took is answered when the version retires
(unload, reload, shutdown), and the queue bound counts only requests that can still run."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
import swap_helpers as sh
from gateway import GatewayProcess
from queue_helpers import GAP_S, SLOW, Call

EXPLICIT = ["--model-control-mode", "explicit", "--load-model", "*"]
# Two instances and a long batching delay: one worker holds the request while it waits for
# the batch to fill, the other is idle.
FILLING = """
max_batch_size: 8
instance_group [{ count: 2, kind: KIND_CPU }]
dynamic_batching { max_queue_delay_microseconds: 3000000 }
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "filling", scale=2.0)
    modelzoo.write_config(repo / "filling", FILLING)
    return repo


def _held_request(gw: GatewayProcess) -> Call:
    call = Call(gw, "filling", np.ones((1, 4), np.float32))
    call.start()
    time.sleep(GAP_S)
    assert call.outcome is None, f"answered before the batching delay ran out: {call.outcome}"
    return call


def test_unload_answers_a_request_held_by_a_filling_batch(repo):
    with GatewayProcess(repo, EXPLICIT) as gw:
        call = _held_request(gw)
        assert sh.unload_model(gw, "filling")[0] == 200
        assert call.answered() in (200, 503)
        if call.outcome == 200:
            np.testing.assert_array_equal(call.y, np.full((1, 4), 2.0, np.float32))


def test_reload_with_changed_files_answers_a_request_held_by_a_filling_batch(repo):
    with GatewayProcess(repo, EXPLICIT) as gw:
        call = _held_request(gw)
        modelzoo.build_scaled(repo, "filling", scale=3.0)  # the same version, new files
        status, body = sh.load_model(gw, "filling")
        assert status == 200, body
        assert call.answered() in (200, 503)
        if call.outcome == 200:
            assert call.y is not None and call.y[0, 0] in (2.0, 3.0)


def test_sigterm_answers_a_request_held_by_a_filling_batch(repo):
    gw = GatewayProcess(repo).start()
    try:
        call = _held_request(gw)
        gw.signal(signal.SIGTERM)
        assert call.answered() in (200, 503)
        assert gw.proc.wait(60) == 0
    finally:
        gw.stop()


# -- queue accounting ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_gw(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("slow")
    # A 256-row request runs for about 3 s: the tests below do their work while it runs (a 1 s run
    # was sometimes over before a loaded machine had sent, closed and counted the requests behind it).
    modelzoo.build_slow(repo, "slow", layers=384)
    modelzoo.write_config(repo / "slow", SLOW)
    with GatewayProcess(repo) as gw:
        yield gw


def _executions(gw: GatewayProcess) -> int:
    client = httpclient.InferenceServerClient(gw.http_url)
    return int(client.get_inference_statistics("slow")["model_stats"][0]["execution_count"])


def _occupy(gw: GatewayProcess) -> Call:
    before = _executions(gw)
    call = Call(gw, "slow", np.random.default_rng(0).random((256, 1024), dtype=np.float32))
    call.start()
    time.sleep(GAP_S)
    assert _executions(gw) == before, "the large request finished too soon"
    return call


def test_queue_timeout_never_fails_a_running_request(slow_gw):
    before = _executions(slow_gw)
    # Taken at once (the queue is empty), then runs for far longer than its queue timeout.
    call = Call(slow_gw, "slow", np.random.default_rng(1).random((256, 1024), dtype=np.float32), timeout=100_000)
    call.start()
    assert call.answered() == 200
    assert _executions(slow_gw) == before + 1
    stats = httpclient.InferenceServerClient(slow_gw.http_url).get_inference_statistics("slow")["model_stats"][0]
    infer_ns = stats["batch_stats"][-1]["compute_infer"]["ns"] / stats["batch_stats"][-1]["compute_infer"]["count"]
    assert infer_ns > 100_000_000, "the execution was shorter than the timeout; the test proves nothing"


def test_expired_and_cancelled_requests_free_their_queue_places_at_once(slow_gw):
    x = np.ones((1, 1024), np.float32)
    big = _occupy(slow_gw)
    before = _executions(slow_gw)
    # Two requests fill the queue (max_queue_size 2): one expires, one is cancelled by its caller.
    expired = Call(slow_gw, "slow", x, timeout=50_000)
    expired.start()
    client = grpcclient.InferenceServerClient(slow_gw.grpc_url)
    inp = grpcclient.InferInput("x", [1, 1024], "FP32")
    inp.set_data_from_numpy(x)
    # Its deadline passes while queued: the deadline scheduler refuses it as the deadline comes
    # (RESOURCE_EXHAUSTED, "deadline"), unless the client's own DEADLINE_EXCEEDED fires first.
    with pytest.raises(InferenceServerException, match=r"Deadline|deadline"):
        client.infer("slow", [inp], client_timeout=0.1)
    assert expired.answered() == 429
    _assert_both_places_free(slow_gw, big, before, x)


def _assert_both_places_free(gw: GatewayProcess, big: Call, before: int, x: np.ndarray) -> None:
    """While the large request still runs (nothing executed since ``before``), two more requests
    are accepted: both queue places were freed."""
    assert _executions(gw) == before, "the large request finished; the queue was emptied anyway"
    late = [Call(gw, "slow", x) for _ in range(2)]
    for c in late:
        c.start()
    assert big.answered() == 200
    assert [c.answered() for c in late] == [200, 200]


def test_an_http_client_gone_frees_its_queue_place(slow_gw):
    """An HTTP client that closes its connection while its request waits takes the request out
    of the queue (the connection is watched once the answer takes longer than a moment)."""
    x = np.ones((1, 1024), np.float32)
    big = _occupy(slow_gw)
    before = _executions(slow_gw)
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1024], "data": x.ravel().tolist()}]}
    )
    gone = []
    for _ in range(2):  # both queue places (max_queue_size 2)
        sock = socket.create_connection(("127.0.0.1", slow_gw.http_port))
        sock.sendall(
            b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        gone.append(sock)
    time.sleep(0.1)  # both queued behind the large request
    for sock in gone:
        sock.close()
    time.sleep(0.1)
    _assert_both_places_free(slow_gw, big, before, x)
