"""Dynamic batching, bounded queues, timeouts, cancellation and provider fallback, end to end."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until
from queue_helpers import Call

SLOW_LAYERS = 512  # a 256-row request keeps the one instance busy for about a second (idle 2-core VM)
SLOW_CONFIG = """
max_batch_size: 256
instance_group [{ count: 1, kind: KIND_CPU }]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
dynamic_batching { default_queue_policy { max_queue_size: %d } }
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("batching")
    modelzoo.build_slow(repo, "busy", layers=16)
    modelzoo.write_config(repo / "busy", SLOW_CONFIG % 1024)
    modelzoo.build_rowwise(repo)
    for name, queue in (("small_queue", 2), ("timeouts", 64), ("cancels", 64)):
        modelzoo.build_slow(repo, name, layers=SLOW_LAYERS)
        modelzoo.write_config(repo / name, SLOW_CONFIG % queue)
    modelzoo.build_mlp(repo, "on_gpu")
    modelzoo.write_config(repo / "on_gpu", "instance_group [{ count: 1, kind: KIND_GPU }]\n")
    modelzoo.build_scaled(repo, "forming")
    modelzoo.write_config(repo / "forming", FORMING)
    return repo


# A batch that forms for 3 s and a queue of one: the request in the forming batch is the one.
FORMING = """
max_batch_size: 8
instance_group [{ count: 1, kind: KIND_CPU }]
dynamic_batching { max_queue_delay_microseconds: 3000000 default_queue_policy { max_queue_size: 1 } }
"""


@pytest.fixture(scope="module")
def gw(repo: Path):
    with GatewayProcess(repo) as g:
        yield g


def _grpc_infer(url: str, model: str, x: np.ndarray, **kw) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw).as_numpy("y")


def _http_infer(url: str, model: str, x: np.ndarray, **kw) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw).as_numpy("y")


def _stats(gw: GatewayProcess, model: str) -> dict:
    client = httpclient.InferenceServerClient(gw.http_url)
    return client.get_inference_statistics(model)["model_stats"][0]


def _occupy(gw: GatewayProcess, model: str) -> threading.Thread:
    """Keep the model's only instance busy with one large request; returns the running thread."""
    big = np.random.default_rng(0).random((256, 1024), dtype=np.float32)
    before = _stats(gw, model)["execution_count"]
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("y", _grpc_infer(gw.grpc_url, model, big)))
    t.start()
    time.sleep(0.3)  # connected and running by now; it runs for about a second more
    assert _stats(gw, model)["execution_count"] == before, "the large request finished too soon"
    return t


def test_concurrent_single_rows_form_batches_and_each_caller_gets_its_own_rows(gw, repo):
    rng = np.random.default_rng(1)
    rows = rng.random((96, 1024), dtype=np.float32)
    expected = modelzoo.reference_run(repo / "busy/1/model.onnx", {"x": rows})["y"]

    def call(i: int) -> np.ndarray:
        fn = _grpc_infer if i % 2 else _http_infer
        return fn(gw.grpc_url if i % 2 else gw.http_url, "busy", rows[i : i + 1])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(len(rows))))
    for i, y in enumerate(answers):
        np.testing.assert_allclose(y, expected[i : i + 1], rtol=1e-5, atol=1e-6)

    stats = _stats(gw, "busy")
    assert stats["inference_count"] == len(rows)
    assert stats["inference_stats"]["success"]["count"] == len(rows)
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sum(size * n for size, n in sizes.items()) == len(rows)
    assert sum(sizes.values()) == stats["execution_count"]
    assert max(sizes) > 1, f"no batch larger than one row formed: {sizes}"


def test_requests_of_different_widths_never_share_a_tensor(gw):
    rng = np.random.default_rng(2)
    widths = [3, 5, 7] * 20
    inputs = [rng.random((1 + i % 3, w), dtype=np.float32) for i, w in enumerate(widths)]

    def call(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("rowwise", [inp])
        return result.as_numpy("y"), result.as_numpy("s")

    with ThreadPoolExecutor(12) as pool:
        for x, (y, s) in zip(inputs, pool.map(call, inputs), strict=True):
            np.testing.assert_array_equal(y, x * 2)
            np.testing.assert_allclose(s, x.sum(axis=1, keepdims=True), rtol=1e-6)


def test_full_queue_is_refused_at_once_and_the_gateway_recovers(gw):
    big = _occupy(gw, "small_queue")
    x = np.ones((1, 1024), np.float32)

    def call(i: int) -> int | str:
        if i % 2:
            try:
                _grpc_infer(gw.grpc_url, "small_queue", x)
                return 200
            except InferenceServerException as exc:
                return exc.status()
        conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": x.ravel()}]},
                            option=orjson.OPT_SERIALIZE_NUMPY)
        conn.request("POST", "/v2/models/small_queue/infer", body)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status == 429:
            assert resp.getheader("Retry-After", "").isdigit()
            assert "queue is full" in orjson.loads(payload)["error"]
        return resp.status

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(call, range(10)))
    big.join()
    assert outcomes.count(200) >= 1
    assert 429 in outcomes, outcomes
    assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes, outcomes
    assert set(outcomes) <= {200, 429, "StatusCode.RESOURCE_EXHAUSTED"}
    np.testing.assert_array_equal(_grpc_infer(gw.grpc_url, "small_queue", x).shape, (1, 1024))
    metrics = http.client.HTTPConnection("127.0.0.1", gw.metrics_port)
    metrics.request("GET", "/metrics")
    text = metrics.getresponse().read().decode()
    assert 'onnxgate_rejected_requests_total{model="small_queue",reason="queue_full"}' in text


def test_requests_in_a_forming_batch_count_against_max_queue_size(gw):
    """The first request to arrive is taken into a batch that forms for 3 s; while it forms the
    request still waits, so the queue of one is full and the other three are refused."""
    calls = [Call(gw, "forming", np.ones((1, 4), np.float32)) for _ in range(4)]
    for call in calls:
        call.start()
    assert sorted(call.answered() for call in calls) == [200, 429, 429, 429]


def test_a_request_whose_timeout_expires_in_the_queue_is_refused(gw):
    big = _occupy(gw, "timeouts")
    x = np.ones((1, 1024), np.float32)
    with pytest.raises(InferenceServerException) as grpc_err:
        _grpc_infer(gw.grpc_url, "timeouts", x, timeout=1000)
    with pytest.raises(InferenceServerException) as http_err:
        _http_infer(gw.http_url, "timeouts", x, timeout=1000)
    big.join()
    assert grpc_err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "timed out" in grpc_err.value.message()
    assert http_err.value.status() == "429"
    assert "timed out" in http_err.value.message()
    assert _grpc_infer(gw.grpc_url, "timeouts", x, timeout=60_000_000).shape == (1, 1024)


def test_a_cancelled_request_never_runs(gw):
    before = _stats(gw, "cancels")
    x = np.ones((1, 1024), np.float32)
    # gRPC: the client's deadline passes while the request waits behind the big one. The
    # deadline scheduler refuses it as the deadline comes (RESOURCE_EXHAUSTED, reason deadline),
    # unless the client's own deadline fires first; either way it never runs.
    big = _occupy(gw, "cancels")
    with pytest.raises(InferenceServerException) as err:
        _grpc_infer(gw.grpc_url, "cancels", x, client_timeout=0.05)
    assert err.value.status() in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")
    if err.value.status() == "StatusCode.RESOURCE_EXHAUSTED":
        assert "deadline" in err.value.message()
    big.join()
    # HTTP: the client closes its connection while the request waits behind big requests (one
    # running, two sent to queue up behind it); it is closed once the gateway shows the small one
    # queued with at least one big one still ahead of it (so the next execution cannot be its own)
    big = _occupy(gw, "cancels")
    rows = np.random.default_rng(0).random((256, 1024), dtype=np.float32)
    queued = [threading.Thread(target=lambda: _grpc_infer(gw.grpc_url, "cancels", rows)) for _ in range(2)]
    for t in queued:
        t.start()
    assert wait_until(lambda: _queued_rows(gw, "cancels") >= 256, timeout=20)  # the small one comes after
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": x.ravel()}]},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    conn.request("POST", "/v2/models/cancels/infer", body)
    assert wait_until(lambda: (q := _queued_rows(gw, "cancels")) % 256 == 1 and q > 256, timeout=20, interval=0.01)
    conn.close()
    big.join()
    for t in queued:
        t.join()
    assert wait_until(lambda: _queued_rows(gw, "cancels") == 0, timeout=20)
    after = _stats(gw, "cancels")
    # only the big requests ran
    assert (after["execution_count"], after["inference_count"]) == (
        before["execution_count"] + 4, before["inference_count"] + 4 * 256), (before, after)


def _queued_rows(gw: GatewayProcess, model: str) -> float:
    """The gateway's onnxgate_queued_rows gauge for ``model`` (0 when not exported)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("onnxgate_queued_rows{") and f'model="{model}"' in line)


def test_gpu_instance_without_a_gpu_falls_back_to_cpu_and_says_so(gw):
    client = httpclient.InferenceServerClient(gw.http_url)
    assert client.is_model_ready("on_gpu")
    config = client.get_model_config("on_gpu")
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    assert config["instance_group"][0]["kind"] == "KIND_GPU"
    assert wait_until(lambda: "CUDAExecutionProvider is not available" in gw.log)
    y = _http_infer(gw.http_url, "on_gpu", np.ones((2, 16), np.float32))
    assert y.shape == (2, 10)
