"""The autoscaling gauges: requests in flight, queued rows, instance busy ratio; on a real gateway
whose one instance is kept busy, and the busy meter's arithmetic on its own."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.core.serving.busy import WINDOW_NS, BusyMeter
from queue_helpers import Call
from routing_helpers import metric, metrics

S = 1_000_000_000
BUSY = """
max_batch_size: 256
instance_group [{ count: 1, kind: KIND_CPU }]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
dynamic_batching { default_queue_policy { max_queue_size: 8 } }
"""


def test_busy_meter_counts_ended_and_running_executions():
    m = BusyMeter(2)
    assert m.ratio(0) == 0.0  # one sample: no span of time yet
    m.start(0, 0)
    assert m.ratio(S) == pytest.approx(0.5)  # one of two instances busy the whole second, still running
    m.stop(0, S + S // 2)
    m.start(1, S + S // 2)
    # [0, 2 s]: instance 0 busy 1.5 s, instance 1 busy 0.5 s so far, of 2 x 2 s
    assert m.ratio(2 * S) == pytest.approx(2.0 / 4.0)
    m.stop(1, 2 * S)
    assert m.total_ns(5 * S) == 2 * S


def test_busy_meter_forgets_what_left_the_window():
    m = BusyMeter(1)
    m.ratio(0)
    m.start(0, 0)
    m.stop(0, S)  # busy the first second only
    for t in range(1, 30):
        ratio = m.ratio(t * S)
    assert ratio == 0.0  # long idle since: only the last ~10 s count
    m.start(0, 30 * S)
    assert 0 < m.ratio(30 * S + WINDOW_NS // 10) <= 0.2


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("gauges")
    # A 256-row request runs for seconds: the gauges are read while it does.
    modelzoo.build_slow(repo, "busy", layers=768)
    modelzoo.write_config(repo / "busy", BUSY)
    with GatewayProcess(repo) as g:
        yield g


def _executions(gw: GatewayProcess) -> int:
    client = httpclient.InferenceServerClient(gw.http_url)
    return int(client.get_inference_statistics("busy")["model_stats"][0]["execution_count"])


def test_gauges_follow_a_busy_instance_and_its_queue(gw):
    labels = {"model": "busy", "version": "1"}
    big = Call(gw, "busy", np.random.default_rng(0).random((256, 1024), dtype=np.float32))
    big.start()
    # running: one request in flight, the instance busy (counted while it runs, not only after)
    assert wait_until(
        lambda: metric(m := metrics(gw), "onnxgate_requests_in_flight", protocol="http") == 1
        and metric(m, "onnxgate_instance_busy_ratio", **labels) > 0,
        timeout=20,
    ), metrics(gw)
    small = [Call(gw, "busy", np.ones((3, 1024), np.float32)) for _ in range(2)]
    for call in small:
        call.start()
    # queued behind it: 2 requests of 3 rows
    assert wait_until(
        lambda: metric(m := metrics(gw), "onnxgate_queued_rows", **labels) == 6
        and metric(m, "onnxgate_queue_depth", **labels) == 2
        and metric(m, "onnxgate_requests_in_flight", protocol="http") == 3,
        timeout=20,
    ), metrics(gw)
    assert _executions(gw) == 0, "the long execution was over before the gauges were read"
    assert big.answered() == 200 and all(c.answered() == 200 for c in small)
    assert wait_until(
        lambda: metric(m := metrics(gw), "onnxgate_queued_rows", **labels) == 0
        and metric(m, "onnxgate_requests_in_flight", protocol="http") == 0,
        timeout=20,
    )
    assert 0 < metric(metrics(gw), "onnxgate_instance_busy_ratio", **labels) <= 1
