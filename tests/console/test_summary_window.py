"""The summary's arithmetic without a gateway: quantiles from buckets, the window's snapshots."""

from __future__ import annotations

import math

import pytest

from onnxgate.core.metrics import Metrics
from onnxgate.core.monitoring import summary
from onnxgate.core.serving.manager import ModelEntry, VersionEntry
from onnxgate.core.serving.stats import ExecutionTiming, VersionStats

BOUNDS = [0.001, 0.01, 0.1, math.inf]


def test_quantile_interpolates_within_a_bucket_as_histogram_quantile():
    assert summary.quantile(0.5, BOUNDS, [0, 10, 10, 10]) == pytest.approx(0.001 + 0.009 * 0.5)
    assert summary.quantile(0.99, BOUNDS, [0, 0, 100, 100]) == pytest.approx(0.01 + 0.09 * 0.99)
    assert summary.quantile(0.5, BOUNDS, [10, 10, 10, 10]) == pytest.approx(0.0005)  # the first bucket from 0
    assert summary.quantile(0.99, BOUNDS, [0, 0, 0, 5]) == 0.1  # past the last finite bound: that bound
    assert summary.quantile(0.5, BOUNDS, [0, 0, 0, 0]) is None and summary.quantile(0.5, BOUNDS, []) is None


def test_the_window_spans_calls_and_is_bounded(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(summary.time, "monotonic", lambda: clock[0])
    metrics = Metrics()
    stats = VersionStats("m", 1)
    models = {"m": ModelEntry("m", {1: VersionEntry(1, "READY", stats=stats)})}
    window = summary.SummaryWindow(metrics)
    first = window.answer(models, [stats], True, False)
    assert first["window_s"] == 0 and first["models"][0]["versions"][0]["request_rate"] is None
    timing = ExecutionTiming(0, 0, 0, 0)
    for _ in range(120):  # two minutes at 10 requests a second, asked every second
        clock[0] += 1.0
        for _request in range(10):
            stats.record_request(1, 2_000_000, timing)
            metrics.request_done("m", "1", "http", "success", 0.002)
        answer = window.answer(models, [stats], True, False)
    assert len(window._snapshots) <= summary.WINDOW_S / summary.MIN_SPACING_S + 2
    assert answer["window_s"] == pytest.approx(60.0)
    (v,) = answer["models"][0]["versions"]
    assert v["request_rate"] == pytest.approx(10.0) and v["latency_mean_ms"] == pytest.approx(2.0)
    assert 1.0 < answer["models"][0]["latency_p50_ms"] <= 2.5  # inside the (1 ms, 2.5 ms] bucket
    assert 1.0 < v["latency_p50_ms"] <= v["latency_p99_ms"] <= 2.5  # the version's own requests
    clock[0] += 1000  # nobody asked for a long while: no stale minute
    assert window.answer(models, [stats], True, False)["window_s"] == 0


def test_each_version_has_its_own_latency_quantiles_and_the_model_all_of_them(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(summary.time, "monotonic", lambda: clock[0])
    metrics = Metrics()
    fast, slow = VersionStats("m", 1), VersionStats("m", 2)
    models = {"m": ModelEntry("m", {1: VersionEntry(1, "READY", stats=fast), 2: VersionEntry(2, "READY", stats=slow)})}
    window = summary.SummaryWindow(metrics)
    window.answer(models, [fast, slow], True, False)
    clock[0] += 10.0
    for _ in range(30):  # three in four requests go to the fast version
        metrics.request_done("m", "1", "grpc", "success", 0.002)
    for _ in range(10):
        metrics.request_done("m", "2", "grpc", "success", 0.2)
    metrics.request_done("m", "2", "shadow", "success", 5.0)  # a mirrored copy: not the callers' latency
    (model,) = window.answer(models, [fast, slow], True, False)["models"]
    one, two = model["versions"]
    assert 1.0 < one["latency_p50_ms"] <= one["latency_p99_ms"] <= 2.5
    assert 100.0 < two["latency_p50_ms"] <= two["latency_p99_ms"] <= 250.0
    assert 1.0 < model["latency_p50_ms"] <= 2.5 and 100.0 < model["latency_p99_ms"] <= 250.0
