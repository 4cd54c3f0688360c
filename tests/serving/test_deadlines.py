"""Deadlines end to end: the gRPC deadline and ``X-Request-Deadline-Ms`` travel to the
scheduler, a request that cannot be answered in time is refused at once and never computed,
nothing is refused when there is capacity, and with the scheduler off (fifo) a late answer is
counted as a miss."""

from __future__ import annotations

import http.client
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate_client.pb import grpc_service_pb2 as pb

SLOW = """
max_batch_size: 256
instance_group [{ count: 1, kind: KIND_CPU }]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
dynamic_batching { priority_levels: 2 default_priority_level: 2 }
"""
DIM = 1024


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("deadlines")
    for name in ("slow", "slow_fifo", "slow_shadow"):
        modelzoo.build_slow(repo, name, layers=64)  # 256 rows keep the instance busy ~0.5 s
        modelzoo.write_config(repo / name, SLOW)
    modelzoo.build_slow(repo, "fast", layers=1)  # the mirrored route's primary: as slow_shadow, but fast
    modelzoo.build_mlp(repo, "mlp")
    modelzoo.write_config(repo / "mlp", 'max_batch_size: 64\nparameters { key: "default_deadline_ms" '
                          'value: { string_value: "10000" } }\n')
    return repo


ROUTES = """
routes:
  - name: mirrored
    split: [{target: fast, weight: 100}]
    shadow: {target: slow_shadow, fraction: 1.0, max_in_flight: 64}
"""


@pytest.fixture(scope="module")
def gw(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    config = tmp_path_factory.mktemp("deadlines_config") / "gateway.yaml"
    config.write_text(ROUTES)
    with GatewayProcess(repo, ["--config", str(config)]) as g:
        yield g


def _metrics(gw: GatewayProcess) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one series (0 when it is absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    assert want is not None
    return 0.0


def _executions(gw: GatewayProcess, model: str) -> int:
    client = httpclient.InferenceServerClient(gw.http_url)
    return int(client.get_inference_statistics(model)["model_stats"][0]["execution_count"])


def _http(gw: GatewayProcess, model: str, x: np.ndarray, headers: dict[str, str] | None = None,
          parameters: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=60)
    doc: dict = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if parameters:
        doc["parameters"] = parameters
    conn.request("POST", f"/v2/models/{model}/infer", orjson.dumps(doc), headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def _grpc(gw: GatewayProcess, model: str, x: np.ndarray, **kw) -> np.ndarray:
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw).as_numpy("y")


def _raw_request(model: str, x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    assert tensor is not None
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, DIM), dtype=np.float32)


class _Busy:
    """Two large requests in the background: one runs, the other waits in the queue behind it
    (seen in the queue depth gauge), so the instance stays busy for two large batches."""

    def __init__(self, gw: GatewayProcess, model: str) -> None:
        self.threads = [threading.Thread(target=_grpc, args=(gw, model, _rows(256))) for _ in range(2)]
        for t in self.threads:
            t.start()
        assert wait_until(lambda: _sample(_metrics(gw), "onnxgate_queue_depth", model=model) == 1, timeout=30)

    def running(self) -> bool:
        return self.threads[1].is_alive()

    def join(self) -> None:
        for t in self.threads:
            t.join(60)


def _train(gw: GatewayProcess, model: str) -> None:
    """A few executions of different sizes: the scheduler's execution-time fit has its evidence."""
    for n in (1, 16, 256, 4):
        _grpc(gw, model, _rows(n))


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once_and_never_computed(gw):
    _train(gw, "slow")
    text = _metrics(gw)
    assert _sample(text, "onnxgate_exec_time_per_row_seconds", model="slow") > 0
    refused_before = _sample(text, "onnxgate_rejected_requests_total", model="slow", reason="deadline")
    before = _executions(gw, "slow")
    busy = _Busy(gw, "slow")
    x = _rows(1)
    status, headers, body = _http(gw, "slow", x, {"X-Request-Deadline-Ms": "20"})
    assert status == 429, body
    assert headers["retry-after"].isdigit()
    assert "deadline" in orjson.loads(body)["error"]
    assert orjson.loads(body)["reason"] == "deadline"
    call = grpc.insecure_channel(gw.grpc_url).unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as raw:  # in a trailer too
        call(_raw_request("slow", x), timeout=0.02)
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("onnxgate-reason", "deadline") in tuple(raw.value.trailing_metadata())
    with pytest.raises(InferenceServerException) as err:  # the gRPC deadline is the request's
        _grpc(gw, "slow", x, client_timeout=0.02)
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "deadline" in err.value.message()
    assert busy.running()  # both were refused on arrival, not once the queue had cleared
    # A deadline the queue allows is honoured: the request waits its turn and is answered.
    np.testing.assert_array_equal(_grpc(gw, "slow", x, client_timeout=60).shape, (1, DIM))
    status, _, _ = _http(gw, "slow", x, {"X-Request-Deadline-Ms": "60000"})
    assert status == 200
    busy.join()
    assert _executions(gw, "slow") == before + 4  # the two large ones and the two on time
    text = _metrics(gw)
    assert _sample(text, "onnxgate_rejected_requests_total", model="slow", reason="deadline") == refused_before + 3
    assert _sample(text, "onnxgate_deadline_misses_total", model="slow") == 0


def test_nothing_is_refused_when_capacity_allows(gw):
    """Concurrent callers on both transports, each with a deadline the gateway can easily meet
    (and the model's default deadline for those without one): every request is answered."""
    x = _rows(1)[:, :16]

    def call(i: int) -> int:
        if i % 3 == 0:
            return int(_grpc(gw, "mlp", x, client_timeout=30).shape == (1, 10)) * 200
        headers = {"X-Request-Deadline-Ms": "30000"} if i % 3 == 1 else {}
        return _http(gw, "mlp", x, headers)[0]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(240)))
    assert outcomes == [200] * 240
    text = _metrics(gw)
    assert not re.search(r'onnxgate_rejected_requests_total\{model="mlp"', text)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e12", ""])
def test_a_bad_deadline_header_is_400(gw, value):
    status, _, body = _http(gw, "mlp", _rows(1)[:, :16], {"X-Request-Deadline-Ms": value})
    if value == "":  # an empty header is no header
        assert status == 200
        return
    assert status == 400, body
    assert "X-Request-Deadline-Ms" in orjson.loads(body)["error"]


def test_priority_parameter_end_to_end(gw):
    x = _rows(2)
    assert _http(gw, "slow", x, parameters={"priority": 1})[0] == 200
    assert _grpc(gw, "slow", x, priority=1).shape == (2, DIM)
    status, _, body = _http(gw, "slow", x, parameters={"priority": "high"})
    assert status == 400
    assert "priority" in orjson.loads(body)["error"]
    status, _, body = _http(gw, "slow", x, parameters={"priority": -1})
    assert status == 400


def test_with_the_scheduler_off_a_late_answer_is_answered_and_counted_as_a_miss(repo: Path):
    with GatewayProcess(repo, ["--scheduler", "fifo"]) as fifo:
        _train(fifo, "slow_fifo")
        busy = _Busy(fifo, "slow_fifo")
        status, _, _ = _http(fifo, "slow_fifo", _rows(1), {"X-Request-Deadline-Ms": "20"})
        assert status == 200  # fifo: queued behind the large ones, answered late
        busy.join()
        text = _metrics(fifo)
        assert _sample(text, "onnxgate_deadline_misses_total", model="slow_fifo") == 1
        assert _sample(text, "onnxgate_rejected_requests_total", model="slow_fifo", reason="deadline") == 0


def test_the_scheduler_setting_is_checked(tmp_path: Path):
    from onnxgate import config as gateway_config

    path = tmp_path / "gateway.yaml"
    path.write_text("server: {scheduler: fifo}\n")
    assert gateway_config.load(path).server.scheduler == "fifo"
    path.write_text("server: {scheduler: edf}\n")
    with pytest.raises(gateway_config.ConfigError) as info:
        gateway_config.load(path)
    assert "deadline, fifo" in info.value.message


def test_a_shadow_copy_inherits_the_primary_deadline(gw):
    """The primary (a fast model) answers within the caller's deadline; its shadow copies, sent
    to a model busy for far longer than that deadline, are refused at once (dropped, never run)
    rather than computed for nobody."""
    _train(gw, "slow_shadow")
    before = _executions(gw, "slow_shadow")
    busy = _Busy(gw, "slow_shadow")
    x = _rows(1)
    for _ in range(5):
        # 250 ms: a fast model answers well within it even on a loaded machine; the shadow would
        # need one of the two large batches (~0.5 s each) to end first
        assert _http(gw, "mirrored", x, {"X-Request-Deadline-Ms": "250"})[0] == 200
    busy.join()
    assert _executions(gw, "slow_shadow") == before + 2  # only the two large requests ran
    text = _metrics(gw)
    assert _sample(text, "onnxgate_shadow_requests_total", route="mirrored", outcome="dropped") == 5
    assert _sample(text, "onnxgate_rejected_requests_total", model="slow_shadow", reason="deadline") == 5
