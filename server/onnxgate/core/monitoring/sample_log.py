"""Sampled prediction logging: which requests to record, and a writer that works off the request path.

The service asks :meth:`SampleLogger.should_sample` (cheap) and, when it says yes, hands the raw
objects to :meth:`SampleLogger.offer` wrapped in a :class:`Sample`: a non-blocking put on a
bounded queue. A writer thread turns samples into records (``records.py``: tensors to nested
lists), passes the inputs of successful ones to observers (live drift) and the records to the
sink (``sinks.py``). Whatever cannot be queued or written is dropped and counted in
``onnxgate_sample_log_dropped_total{reason}``; nothing here raises into serving.

``queue_max_mb`` bounds the memory of the samples queued or being written, counted at offer
(:meth:`Sample.nbytes`: buffers, each string of a BYTES tensor, headers, the objects). A view
into a larger buffer (a batch's output, an HTTP body) is first copied, only its own rows
(:meth:`Sample.compact`), so a queued sample never keeps a whole batch or body alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from onnxgate.core.monitoring.config import SampleLogConfig, SinkConfig
from onnxgate.core.monitoring.file_sinks import JsonlSink, ParquetSink
from onnxgate.core.monitoring.http_sink import HttpSink
from onnxgate.core.monitoring.records import Sample, make_record
from onnxgate.core.monitoring.sinks import Sink, SinkStats

log = logging.getLogger("onnxgate.sample_log")

FINISH_S = 0.5  # the least time close() leaves the writer to finish the open file (a write, a rename)
DROP_REASONS = ("queue_full", "disk_full", "io_error", "collector_down", "collector_rejected", "shutdown", "error")
Observer = Callable[[str, Mapping[str, np.ndarray]], None]  # (model, {input name: array}) of an ok sample


_WAKE = object()  # put on the queue to wake the writer at close
_TICK_S = 0.1  # the writer looks at the clock (rotation by age, HTTP flush) at least this often
_BATCH = 256  # samples the writer takes off the queue at once


def unit_hash(value: str | bytes, salt: bytes = b"") -> float:
    """A stable number in [0, 1) for ``value``: the same header value always lands in the same place."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    return int.from_bytes(hashlib.blake2b(salt + b"\0" + raw, digest_size=8).digest(), "big") / 2.0**64


class SampleLogMetrics:
    """The sample log's metrics on the gateway's registry; also what the sink reports to."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "onnxgate_sample_log_records", "Sampled records written to the sample-log sink.", registry=registry
        )
        self.dropped_records = Counter(
            "onnxgate_sample_log_dropped",
            "Sampled records lost, by reason (queue_full, disk_full, io_error, collector_down, ...).",
            ["reason"],
            registry=registry,
        )
        for reason in DROP_REASONS:
            self.dropped_records.labels(reason)
        self.queue_depth = Gauge(
            "onnxgate_sample_log_queue_depth", "Samples waiting for the sample-log writer.",
            multiprocess_mode="livesum", registry=registry,
        )

    def written(self, n: int) -> None:
        self.records.inc(n)

    def dropped(self, reason: str, n: int) -> None:
        self.dropped_records.labels(reason).inc(n)


class SampleLogger:
    """Decides which requests are recorded and writes their records off the event loop.

    ``start()`` starts the writer thread; ``await close(timeout)`` writes what is queued, finishes
    the sink (files renamed, batches sent) and returns within ``timeout``; what is still queued
    then is dropped (``shutdown``). ``observers`` run on the writer thread with the inputs of each
    successful sample.
    """

    def __init__(
        self,
        config: SampleLogConfig,
        registry: CollectorRegistry,
        *,
        rng: random.Random | None = None,
        observers: Sequence[Observer] = (),
        sink: Sink | None = None,
    ) -> None:
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        self._default = config.default_rate
        self._rates = dict(config.rates)
        self._hash_header = config.hash_header
        self._salt = config.hash_salt.encode()
        self._observers = tuple(observers)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._max_bytes = int(config.queue_max_mb * 1024 * 1024)
        self._bytes = 0
        self._lock = threading.Lock()  # guards _bytes
        self._closed = False
        self._stopping = threading.Event()
        self._deadline = math.inf
        self._thread: threading.Thread | None = None
        self.metrics = SampleLogMetrics(registry)
        self.metrics.queue_depth.set_function(self._queue.qsize)
        self.sink = sink if sink is not None else make_sink(config.sink, self.metrics)
        self._warned: dict[str, float] = {}

    # -- the request path -------------------------------------------------------------------
    def should_sample(self, model: str, headers: Mapping[str, str] | None = None, route: str | None = None) -> bool:
        """Whether to record this request: by the route's or model's rate, by header hash if configured."""
        rate = self._rates.get(route) if route is not None else None
        if rate is None:
            rate = self._rates.get(model, self._default)
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        if self._hash_header is not None and headers:
            value = headers.get(self._hash_header)
            if value is not None:
                return unit_hash(value, self._salt) < rate
        return self._rng.random() < rate

    def offer(self, sample: Sample | Mapping[str, Any]) -> bool:
        """Queue a sample (or a finished record) for the writer; False if it was dropped. Never blocks or raises."""
        try:
            if self._closed:
                self._drop("shutdown")
                return False
            size = 0
            if isinstance(sample, Sample):
                sample.compact()
                size = sample.nbytes()
            with self._lock:
                if self._bytes + size > self._max_bytes and size:
                    self._drop("queue_full")
                    return False
                self._bytes += size
            try:
                self._queue.put_nowait((sample, size))
            except queue.Full:
                with self._lock:
                    self._bytes -= size
                self._drop("queue_full")
                return False
            return True
        except Exception:
            self._warn("offer", "sample log: offer failed", exc_info=True)
            self._drop("error")
            return False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="onnxgate-sample-log", daemon=True)
            self._thread.start()

    async def close(self, timeout: float = 30.0) -> None:
        """Flush what is queued and finish the sink, within ``timeout`` seconds. Past it, what is
        still queued is dropped (counted, reason ``shutdown``), but the open file is always
        finished and renamed: the writer gets at least ``FINISH_S`` for that, whatever is left."""
        start = time.monotonic()
        self._closed = True
        # Leave part of the time for finishing the sink (renames, last HTTP batch).
        self._deadline = start + max(0.0, timeout - min(1.0, timeout * 0.2))
        self.sink.deadline = start + timeout
        if self._thread is None:  # never started: nothing was written
            self._drain_all("shutdown")
            return
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # when full, the writer is busy and will see the flag
            self._queue.put_nowait((_WAKE, 0))
        await asyncio.to_thread(self._thread.join, max(FINISH_S, start + timeout - time.monotonic()))
        if self._thread.is_alive():
            log.warning("sample log: writer still busy after %.1fs; leaving it", timeout)

    # -- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        while True:
            batch: list[Any] = []
            try:
                batch.append(q.get(timeout=_TICK_S))
                while len(batch) < _BATCH:
                    batch.append(q.get_nowait())
            except queue.Empty:
                pass
            items = [item for item, _ in batch if item is not _WAKE]
            if items:
                self._guard(self._handle, items)
            # The budget is given back once the samples are written: those in the writer's hands are held too.
            freed = sum(size for _, size in batch)
            del batch, items  # not kept alive while the writer waits for the next ones
            if freed:
                with self._lock:
                    self._bytes -= freed
            self._guard(self.sink.tick)
            if self._stopping.is_set():
                if time.monotonic() >= self._deadline:
                    self._drain_all("shutdown")
                    break
                if q.empty():
                    break
        self._guard(self.sink.close)

    def _handle(self, items: list[Any]) -> None:
        records: list[dict] = []
        for item in items:
            if not isinstance(item, Sample):
                records.append(dict(item))
                continue
            try:
                records.append(self._record(item))
            except Exception:
                self._warn("record", "sample log: cannot build a record", exc_info=True)
                self._drop("error")
                continue
            if self._observers and item.error is None:
                inputs = {t.name: t.data for t in item.request.inputs}
                for observe in self._observers:
                    try:
                        observe(item.model, inputs)
                    except Exception:
                        self._warn("observer", "sample log: observer %r failed", observe, exc_info=True)
        if records:
            try:
                self.sink.write(records)
            except Exception:
                self._warn("sink", "sample log: sink failed", exc_info=True)
                self._drop("error", len(records))

    def _record(self, s: Sample) -> dict[str, Any]:
        allow = self.config.headers
        given = s.headers if s.headers is not None else getattr(s.request, "headers", None) or {}
        headers = {k.lower(): v for k, v in given.items() if k.lower() in allow} if allow else {}
        return make_record(
            s.request,
            s.response,
            s.error,
            route=s.route,
            model=s.model,
            version=s.version,
            protocol=s.protocol,
            latency_s=s.latency_s,
            headers=headers,
            shadow=s.shadow,
            comparison=s.comparison,
            include=self.config.include,
            when=s.time,
            max_elements=self.config.max_tensor_elements,
        )

    def _drain_all(self, reason: str) -> None:
        n = 0
        while True:
            try:
                item, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            n += item is not _WAKE
        if n:
            self._drop(reason, n)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._warn("guard", "sample log: %s failed", getattr(fn, "__name__", fn), exc_info=True)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.metrics.dropped(reason, n)

    def _warn(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) >= 60.0:
            self._warned[key] = now
            log.warning(msg, *args, exc_info=exc_info)


def make_sink(config: SinkConfig, stats: SinkStats) -> Sink:
    """The sink the config names."""
    if config.type == "jsonl":
        return JsonlSink(config, stats)
    if config.type == "parquet":
        return ParquetSink(config, stats)
    if config.type == "http":
        return HttpSink(config, stats)
    return Sink(stats)
