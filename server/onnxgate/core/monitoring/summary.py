"""Every model at a glance, with its traffic over about the last minute: ``GET /v2/models/summary``.

The answer is built from what the gateway already counts, so the request path pays nothing for
it: each call takes a snapshot of the cumulative counts (the statistics extension's per-version
counts, and the buckets of three Prometheus histograms) and compares it with the oldest snapshot
it still keeps, which is about :data:`WINDOW_S` old. Snapshots are taken only when the summary is
asked for, at most one a :data:`MIN_SPACING_S`, and dropped once older than the window: at most
about 60 of them, each a few integers per version. So the first answer after a quiet spell
covers no time (``window_s`` 0, rates and quantiles null): ask again, as the console does every
2 s.

- Rates (requests, failures, rows a second) and the batch-size counts come from the statistics,
  which under ``--workers N`` add up every worker (another worker's requests arrive within about
  two seconds, as in ``GET /v2/models/stats``).
- Latency quantiles are estimated from histogram buckets, as Prometheus' ``histogram_quantile``
  does (linear within a bucket), so they are as coarse as the buckets: request latency per model
  and per version (``onnxgate_request_duration_seconds``, shadow copies left out), and per version
  the queue wait (``onnxgate_queue_wait_seconds``, shadow copies left out) and the execution time
  (``onnxgate_compute_duration_seconds``). These, the queue depth and the window itself are the
  answering worker's own under ``--workers N``.
- With a sample log on, ``sample_log`` has its counts (records written, dropped by reason, queued)
  and the live drift gauges (PSI and KS per feature, the alert per model), this worker's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from onnxgate.core.metrics import Metrics
from onnxgate.core.serving.manager import ModelEntry
from onnxgate.core.serving.stats import VersionStats

WINDOW_S = 60.0  # the rates and quantiles cover about this much time
MIN_SPACING_S = 1.0  # at most one snapshot a second, however often the summary is asked for
_SHADOW = "shadow"  # the protocol and priority label of mirrored copies: not the callers' traffic

Key = tuple[str, int]
Buckets = dict[Any, list[float]]  # key -> cumulative counts, one per bound of the histogram


@dataclass(slots=True)
class _Snapshot:
    t: float  # time.monotonic()
    counts: dict[Key, tuple[int, int, int]]  # successes, failures, rows
    latency_ns: dict[Key, int]  # successes' total nanoseconds
    batches: dict[Key, dict[int, int]]  # executions by batch size (rows)
    request: Buckets  # by (model, version)
    queue: Buckets  # by (model, version)
    execute: Buckets  # by (model, version)


def _histogram(histogram: Any, key_labels: tuple[str, ...], skip: str = "") -> tuple[list[float], Buckets]:
    """A histogram's bounds and its cumulative bucket counts per key (the label values of
    ``key_labels``), summed over its other labels; series whose label ``skip`` is "shadow" left out."""
    bounds: list[float] = []
    out: Buckets = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            if not sample.name.endswith("_bucket"):
                continue
            labels = sample.labels
            if skip and labels.get(skip) == _SHADOW:
                continue
            bound = float(labels["le"])
            if bound not in bounds:
                bounds.append(bound)
            key = labels[key_labels[0]] if len(key_labels) == 1 else tuple(labels[k] for k in key_labels)
            row = out.setdefault(key, [])
            i = bounds.index(bound)
            while len(row) <= i:
                row.append(0.0)
            row[i] += sample.value
    return bounds, out


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """The ``q`` quantile from cumulative bucket ``counts`` (upper ``bounds``, the last +Inf), as
    ``histogram_quantile`` estimates it; None when the buckets are empty."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    for i, cumulative in enumerate(counts):
        if cumulative >= rank:
            upper = bounds[i]
            if math.isinf(upper):  # past the last finite bound: that bound is all that can be said
                return bounds[i - 1] if i > 0 else None
            lower, below = (bounds[i - 1], counts[i - 1]) if i > 0 else (0.0, 0.0)
            inside = cumulative - below
            return upper if inside <= 0 else lower + (upper - lower) * (rank - below) / inside
    return None


def _delta(now: list[float], then: list[float] | None) -> list[float]:
    """Bucket counts over the window; a series that restarted (a reloaded version) counts from 0."""
    if then is None or len(then) != len(now) or any(b > a for a, b in zip(now, then, strict=True)):
        return list(now)
    return [a - b for a, b in zip(now, then, strict=True)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


class SummaryWindow:
    """The snapshots of one gateway process and the answer built from them (on the event loop)."""

    def __init__(self, metrics: Metrics, window_s: float = WINDOW_S, min_spacing_s: float = MIN_SPACING_S) -> None:
        self.metrics = metrics
        self.window_s = window_s
        self.min_spacing_s = min_spacing_s
        self._snapshots: deque[_Snapshot] = deque()
        self._bounds: dict[str, list[float]] = {}

    def _snapshot(self, stats: Iterable[VersionStats]) -> _Snapshot:
        counts, latency, batches = {}, {}, {}
        for s in stats:
            key = (s.name, s.version)
            counts[key] = (s.success.count, s.fail.count, s.inference_count)
            latency[key] = s.success.ns
            batches[key] = {size: b.compute_infer.count for size, b in s.batches.items()}
        m = self.metrics
        self._bounds["request"], request = _histogram(m.request_latency, ("model", "version"), "protocol")
        self._bounds["queue"], queue = _histogram(m.queue_wait, ("model", "version"), "priority")
        self._bounds["execute"], execute = _histogram(m.compute_latency, ("model", "version"))
        return _Snapshot(time.monotonic(), counts, latency, batches, request, queue, execute)

    def answer(
        self, models: Mapping[str, ModelEntry], stats: Iterable[VersionStats], ready: bool, draining: bool,
        sampling: bool = False, drift: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The summary (``openapi_console``'s ``ModelsSummary``); ``stats`` as the statistics
        extension answers them (every worker's under ``--workers N``); ``sampling``: a sample log
        is on (its counts and the drift gauges are added); ``drift``: each drift model's
        thresholds and window (``DriftMonitor.thresholds``), added to its drift row."""
        now = self._snapshot(stats)
        ring = self._snapshots
        while len(ring) >= 2 and ring[1].t <= now.t - self.window_s:
            ring.popleft()  # keep the newest snapshot at least a window old: the base
        if ring and ring[0].t < now.t - 2 * self.window_s:
            ring.clear()  # nobody asked for a long while: that base is too old to mean "the last minute"
        base = ring[0] if ring else None
        if not ring or now.t - ring[-1].t >= self.min_spacing_s:
            ring.append(now)
        window = now.t - base.t if base is not None else 0.0
        out = []
        for name in sorted(models):
            entry = models[name]
            out.append(self._model(name, entry, now, base, window))
        return {"time": time.time(), "window_s": round(window, 3), "ready": ready and not draining,
                "draining": draining, "models": out, "sample_log": self._sample_log(drift or {}) if sampling else None}

    def _sample_log(self, thresholds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The sample log's counts and the live drift gauges, as this worker's metrics have them,
        with each drift model's ``thresholds`` (from its config; a configured model is listed
        before its first window too)."""
        values: dict[str, list[tuple[dict[str, str], float]]] = {}
        for metric in self.metrics.registry.collect():
            if metric.name.startswith(("onnxgate_sample_log", "onnxgate_drift")):
                for sample in metric.samples:
                    values.setdefault(sample.name, []).append((sample.labels, sample.value))

        def one(name: str) -> int:
            return int(sum(v for _, v in values.get(name, ())))

        features: dict[tuple[str, str], dict[str, Any]] = {}
        for stat in ("psi", "ks"):
            for labels, value in values.get(f"onnxgate_drift_{stat}", ()):
                key = (labels.get("model", ""), labels.get("feature", ""))
                row = features.setdefault(key, {"model": key[0], "feature": key[1], "psi": None, "ks": None})
                row[stat] = None if math.isnan(value) else round(value, 6)
        alerts = {labels.get("model", ""): value >= 1 for labels, value in values.get("onnxgate_drift_alert", ())}
        rows = {labels.get("model", ""): int(value) for labels, value in values.get("onnxgate_drift_window_rows", ())}
        unset = dict.fromkeys(("psi_threshold", "ks_pvalue", "chi2_pvalue", "min_rows", "window"))
        drift = [{"model": m, "alert": alerts.get(m, False), "window_rows": rows.get(m, 0),
                  "features": [f for (fm, _), f in sorted(features.items()) if fm == m],
                  **unset, **thresholds.get(m, {})}
                 for m in sorted(set(alerts) | set(rows) | {m for m, _ in features} | set(thresholds))]
        lost = values.get("onnxgate_sample_log_dropped_total", ())
        dropped = {labels.get("reason", ""): int(v) for labels, v in lost}
        return {"records_written": one("onnxgate_sample_log_records_total"), "records_dropped": dropped,
                "queue_depth": one("onnxgate_sample_log_queue_depth"), "drift": drift}

    def _model(self, name: str, entry: ModelEntry, now: _Snapshot, base: _Snapshot | None,
               window: float) -> dict[str, Any]:
        versions = [self._version(name, v, now, base, window) for _, v in sorted(entry.versions.items())]
        p50 = p99 = None
        if window > 0:  # every version's requests in the window, added up bucket by bucket
            counts: list[float] = []
            for label, series in now.request.items():
                if label[0] == name:
                    delta = _delta(series, base.request.get(label) if base is not None else None)
                    counts = [a + b for a, b in zip(counts, delta, strict=True)] if counts else delta
            p50, p99 = (quantile(q, self._bounds["request"], counts) for q in (0.5, 0.99))
        rate = None
        if window > 0:
            rate = round(sum(v["request_rate"] or 0.0 for v in versions), 3)
        return {"name": name, "reason": entry.reason, "ready_versions": [v.version for v in entry.ready_versions()],
                "available_versions": list(entry.available), "request_rate": rate, "latency_p50_ms": _ms(p50),
                "latency_p99_ms": _ms(p99), "versions": versions}

    def _version(self, name: str, ver: Any, now: _Snapshot, base: _Snapshot | None,
                 window: float) -> dict[str, Any]:
        key = (name, ver.version)
        model, scheduler = ver.model, ver.scheduler
        doc: dict[str, Any] = {
            "version": ver.version,
            "state": ver.state,
            "reason": ver.reason,
            "provider": (model.providers[0] if model is not None and model.providers else ""),
            "instances": scheduler.instances if scheduler is not None else 0,
            "queue_depth": scheduler.queued if scheduler is not None else 0,
            "inference_count": now.counts.get(key, (0, 0, 0))[2],
            "request_rate": None, "failure_rate": None, "row_rate": None, "latency_mean_ms": None,
            "latency_p50_ms": None, "latency_p99_ms": None, "queue_p50_ms": None, "queue_p99_ms": None,
            "execute_p50_ms": None, "execute_p99_ms": None,
        }
        totals = now.batches.get(key, {})
        in_window: dict[int, int] = {}
        if window > 0 and base is not None:
            cur, old = now.counts.get(key, (0, 0, 0)), base.counts.get(key, (0, 0, 0))
            if any(c < o for c, o in zip(cur, old, strict=True)):  # reloaded: its counts started again
                old = (0, 0, 0)
            done, failed, rows = (c - o for c, o in zip(cur, old, strict=True))
            doc["request_rate"] = round((done + failed) / window, 3)
            doc["failure_rate"] = round(failed / window, 3)
            doc["row_rate"] = round(rows / window, 3)
            if done > 0:
                ns = now.latency_ns.get(key, 0) - (base.latency_ns.get(key, 0) if old != (0, 0, 0) else 0)
                doc["latency_mean_ms"] = round(ns / done / 1e6, 4)
            before = base.batches.get(key, {}) if old != (0, 0, 0) else {}
            in_window = {size: count - before.get(size, 0) for size, count in totals.items()}
            label = (name, str(ver.version))
            for part, field in (("request", "latency"), ("queue", "queue"), ("execute", "execute")):
                series: Buckets = getattr(now, part)
                if label in series:
                    counts = _delta(series[label], getattr(base, part).get(label))
                    doc[f"{field}_p50_ms"] = _ms(quantile(0.5, self._bounds[part], counts))
                    doc[f"{field}_p99_ms"] = _ms(quantile(0.99, self._bounds[part], counts))
        doc["batch_sizes"] = [{"size": size, "executions": totals[size], "window": max(0, in_window.get(size, 0))}
                              for size in sorted(totals)]
        return doc
