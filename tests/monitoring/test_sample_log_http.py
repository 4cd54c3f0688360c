"""The HTTP sample-log sink against a real collector on port 0: CloudEvents batches, retries,
drops and shutdown."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from prometheus_client import CollectorRegistry

from onnxgate.core.monitoring.sample_log import DROP_REASONS, SampleLogger
from sample_log_helpers import Collector, cfg, run, sample, value, write_all

# -- HTTP sink --------------------------------------------------------------------------------------


def test_http_sink_posts_cloudevents_batches() -> None:
    with Collector() as collector:
        reg = CollectorRegistry()
        logger = SampleLogger(cfg({"type": "http", "url": collector.url, "batch_size": 10, "flush_s": 60}), reg)
        run(write_all(logger, [sample(i) for i in range(25)]))
    assert [len(json.loads(body)) for _, body in collector.posts] == [10, 10, 5]
    headers = collector.posts[0][0]
    assert headers["Content-Type"] == "application/cloudevents-batch+json; charset=utf-8"
    events = collector.events()
    assert len({e["id"] for e in events}) == 25
    e = events[3]
    assert e["specversion"] == "1.0" and e["type"] == "io.onnxgate.sample" and e["source"] == "/onnxgate"
    assert e["datacontenttype"] == "application/json" and e["subject"] == "m"
    assert e["time"] == e["data"]["time"] and e["data"]["schema_version"] == 1 and e["data"]["id"] == "r3"
    assert value(reg, "onnxgate_sample_log_records_total") == 25


def test_http_sink_flushes_a_partial_batch_after_flush_s() -> None:
    with Collector() as collector:
        logger = SampleLogger(
            cfg({"type": "http", "url": collector.url, "batch_size": 100, "flush_s": 0.2}), CollectorRegistry()
        )

        async def go() -> int:
            logger.start()
            for i in range(3):
                logger.offer(sample(i))
            for _ in range(100):
                await asyncio.sleep(0.02)
                if collector.events():
                    break
            n = len(collector.events())
            await logger.close(5)
            return n

        assert run(go()) == 3


def test_collector_down_retries_with_backoff_then_drops() -> None:
    with Collector(statuses=(503,) * 3) as collector:
        reg = CollectorRegistry()
        c = cfg({"type": "http", "url": collector.url, "batch_size": 5, "retries": 2, "backoff_s": 0.05})
        logger = SampleLogger(c, reg)

        async def go() -> None:
            logger.start()
            for i in range(5):
                logger.offer(sample(i))
            for _ in range(200):
                await asyncio.sleep(0.02)
                if value(reg, "onnxgate_sample_log_dropped_total", reason="collector_down"):
                    break
            await asyncio.sleep(0.3)  # past the circuit's wait: the collector answers 200 again
            for i in range(5, 10):
                logger.offer(sample(i))
            await logger.close(5)

        run(go())
    assert len(collector.posts) == 3 + 1  # one try and two retries, then the next batch gets through
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="collector_down") == 5
    assert [e["data"]["id"] for e in collector.events()[-5:]] == [f"r{i}" for i in range(5, 10)]
    assert value(reg, "onnxgate_sample_log_records_total") == 5


def test_unreachable_collector_and_refused_batches_are_counted() -> None:
    with Collector() as probe:
        dead_url = probe.url  # nothing listens there once the collector is gone
    reg = CollectorRegistry()
    c = cfg({"type": "http", "url": dead_url, "batch_size": 4, "retries": 1, "backoff_s": 0.01, "timeout_s": 1})
    run(write_all(SampleLogger(c, reg), [sample(i) for i in range(8)]))
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="collector_down") == 8
    with Collector(statuses=(400,)) as collector:
        reg = CollectorRegistry()
        run(
            write_all(
                SampleLogger(cfg({"type": "http", "url": collector.url, "batch_size": 4}), reg),
                [sample(i) for i in range(8)],
            )
        )
    assert len(collector.posts) == 2  # a 400 is not retried
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="collector_rejected") == 4
    assert value(reg, "onnxgate_sample_log_records_total") == 4


def test_close_returns_within_timeout_when_the_collector_hangs() -> None:
    hold = threading.Event()
    with Collector(hold=hold) as collector:
        reg = CollectorRegistry()
        c = cfg({"type": "http", "url": collector.url, "batch_size": 10, "timeout_s": 30})
        logger = SampleLogger(c, reg)
        started = time.monotonic()
        run(write_all(logger, [sample(i) for i in range(30)], timeout=1.0))
        elapsed = time.monotonic() - started
        hold.set()
    assert elapsed < 2.0

    # Every record is accounted for exactly once. What was still queued is dropped at shutdown;
    # the batch the writer had already posted to the hanging collector ends either way (written
    # once the collector lets go, or dropped).
    def accounted() -> tuple[float, dict[str, float]]:
        dropped = {r: value(reg, "onnxgate_sample_log_dropped_total", reason=r) or 0 for r in DROP_REASONS}
        return (value(reg, "onnxgate_sample_log_records_total") or 0), dropped

    deadline = time.monotonic() + 10  # the released post may still be finishing
    while sum(accounted()[1].values()) + accounted()[0] < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    written, dropped = accounted()
    assert written + sum(dropped.values()) == 30, (written, dropped)
    assert dropped["shutdown"] >= 20, dropped
