"""Live drift of one model: its recent inputs in a window, compared with a reference.

:class:`LiveDrift` keeps the last ``window`` rows of each of the model's inputs in a ring buffer
(``observe``: a vectorised copy, called from the sample logger's writer thread with the inputs of
sampled, successful requests). ``compute`` compares the window with the reference feature by
feature (``drift_stats``: PSI, KS or chi-square) and sets the gauges of :class:`DriftMetrics`

    onnxgate_drift_psi{model,feature}      PSI of the window against the reference
    onnxgate_drift_ks{model,feature}       KS statistic (numeric features)
    onnxgate_drift_alert{model}            1 while any feature crosses its threshold
    onnxgate_drift_window_rows{model}      rows in the window

``report`` renders the HTML drift report of the window as it is now (``drift_html``, the
report ``onnxgate drift`` writes).

A ``webhook`` receives one JSON POST when a feature crosses its threshold (``state: "alert"``)
and one when it comes back (``state: "resolved"``); a POST that fails is tried again at the
next compute, so each crossing is announced once.

Both are blocking: :class:`~onnxgate.core.monitoring.drift.DriftMonitor` (``drift``), which
owns one LiveDrift per configured model, runs them off the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from onnxgate.core.monitoring import drift_html
from onnxgate.core.monitoring.drift_stats import (
    DriftDataError,
    FeatureDrift,
    FeatureTable,
    Thresholds,
    align,
    as_rows,
    compare_feature,
    feature_names,
    load_features,
)
from onnxgate.core.monitoring.http_sink import post
from onnxgate.core.monitoring.records import rfc3339
from onnxgate.core.monitoring.sinks import encode_json
from onnxgate.core.urls import redact_url
from onnxgate.errors import Unavailable

log = logging.getLogger("onnxgate.drift")

_REFERENCE_ROWS = 20_000  # the reference is subsampled to this many rows (seeded), for speed
# Live windows are large: p-values would flag differences too small to matter, so PSI alone by default.
LIVE_THRESHOLDS = Thresholds(psi=0.2, ks_pvalue=None, chi2_pvalue=None)


class DriftMetrics:
    """The drift gauges, once per registry, shared by every model's LiveDrift."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str, labels: list[str]) -> Gauge:  # a dead worker's window is gone with it
            return Gauge(name, text, labels, multiprocess_mode="liveall", registry=registry)

        self.psi = gauge("onnxgate_drift_psi", "PSI of recent inputs against the reference.", ["model", "feature"])
        self.ks = gauge("onnxgate_drift_ks", "KS statistic of recent inputs against the reference.",
                        ["model", "feature"])
        self.alert = gauge("onnxgate_drift_alert", "1 while a feature of the model crosses its drift threshold.",
                           ["model"])
        self.rows = gauge("onnxgate_drift_window_rows", "Rows in the live drift window.", ["model"])
        self.webhook_failures = Counter(
            "onnxgate_drift_webhook_failures", "Drift alerts the webhook did not take (retried).", ["model"],
            registry=registry,
        )


class _Ring:
    """The last ``window`` rows of one tensor."""

    __slots__ = ("count", "data", "pos")

    def __init__(self, window: int, width: int, dtype: type) -> None:
        self.data = np.empty((window, width), dtype=dtype)
        self.pos = 0
        self.count = 0

    def push(self, rows: np.ndarray) -> None:
        w, n = len(self.data), len(rows)
        if n >= w:
            self.data[:] = rows[-w:]
            self.pos, self.count = 0, w
            return
        end = self.pos + n
        if end <= w:
            self.data[self.pos : end] = rows
        else:
            k = w - self.pos
            self.data[self.pos :] = rows[:k]
            self.data[: n - k] = rows[k:]
        self.pos, self.count = end % w, min(w, self.count + n)

    def snapshot(self) -> np.ndarray:
        return self.data[: self.count].copy()


class LiveDrift:
    """Live drift of one model's inputs against a reference (a path or a loaded FeatureTable)."""

    def __init__(
        self,
        model: str,
        reference: str | Path | FeatureTable,
        *,
        metrics: DriftMetrics,
        window: int = 5000,
        min_rows: int = 500,
        thresholds: Thresholds = LIVE_THRESHOLDS,
        bins: int = 10,
        webhook: str = "",
        clock: Callable[[], float] = time.time,
        reference_label: str = "",
    ) -> None:
        table = reference if isinstance(reference, FeatureTable) else load_features(reference, model)
        self.model = model
        # what the report calls the reference: a file's name, never the server's path to it
        self.reference_label = reference_label or (
            Path(reference).name if isinstance(reference, str | Path) else "the reference"
        )
        self.metrics = metrics
        self.window, self.min_rows, self.bins = window, min_rows, bins
        self.thresholds = thresholds
        self.webhook = webhook
        self._clock = clock
        rng = np.random.default_rng(0)
        self._table = FeatureTable(
            {
                n: v if len(v) <= _REFERENCE_ROWS else rng.choice(v, _REFERENCE_ROWS, replace=False)
                for n, v in table.features.items()
            },
            dict(table.kinds),
            table.rows,
            table.model,
        )
        self._lock = threading.Lock()
        self._rings: dict[str, _Ring] | None = None  # bound at the first observe
        self._columns: dict[str, tuple[str, int]] = {}  # feature -> (tensor, column)
        self._reference: dict[str, np.ndarray] = {}
        self._notified: dict[str, str] = {}  # feature -> "alert" once announced
        self.unbound_reason = ""

    def observe(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Add the rows of one request's inputs to the window. Cheap; thread-safe."""
        with self._lock:
            if self._rings is None:
                self._bind(inputs)
            for name, ring in (self._rings or {}).items():
                arr = inputs.get(name)
                if arr is None:
                    continue
                rows = as_rows(arr)
                if rows.shape[1] == ring.data.shape[1]:
                    ring.push(rows)

    def _bind(self, inputs: Mapping[str, np.ndarray]) -> None:
        current = FeatureTable()
        for name, arr in inputs.items():
            for feature in feature_names(name, np.shape(arr)):
                current.kinds[feature] = "input"
                current.features[feature] = np.empty(0)
        try:
            reference, note = align(self._table, current)
        except DriftDataError as exc:
            self.unbound_reason = str(exc)
            log.error("drift: model %s: the reference does not fit its inputs: %s", self.model, exc)
            self._rings = {}
            return
        if note:
            log.info("drift: model %s: reference columns %s", self.model, note)
        self._reference = reference
        widths = {name: as_rows(arr).shape[1] for name, arr in inputs.items()}
        for name, arr in inputs.items():
            for i, feature in enumerate(feature_names(name, np.shape(arr))):
                if feature in reference:
                    self._columns[feature] = (name, i)
        tensors = {t for t, _ in self._columns.values()}
        self._rings = {
            t: _Ring(self.window, widths[t], object if np.asarray(inputs[t]).dtype.kind in "OSU" else np.float64)
            for t in tensors
        }

    def rows(self) -> int:
        """Rows in the window now."""
        with self._lock:
            return max((r.count for r in (self._rings or {}).values()), default=0)

    def compute(self) -> dict[str, FeatureDrift]:
        """Compare the window with the reference, set the gauges, announce crossings. Blocking: run off the loop."""
        with self._lock:
            snapshots = {t: r.snapshot() for t, r in (self._rings or {}).items()}
        n = max((len(s) for s in snapshots.values()), default=0)
        self.metrics.rows.labels(self.model).set(n)
        if n < self.min_rows:
            return {}
        results: dict[str, FeatureDrift] = {}
        for feature, (tensor, column) in self._columns.items():
            try:
                result = compare_feature(
                    feature, self._reference[feature], snapshots[tensor][:, column], bins=self.bins
                )
            except DriftDataError:
                continue
            results[feature] = result
            self.metrics.psi.labels(self.model, feature).set(result.psi)
            if result.ks_statistic is not None:
                self.metrics.ks.labels(self.model, feature).set(result.ks_statistic)
        crossed = {f for f, r in results.items() if r.reasons(self.thresholds)}
        self.metrics.alert.labels(self.model).set(1 if crossed else 0)
        self._announce(results, crossed, n)
        return results

    def report(self, max_plots: int = drift_html.MAX_PLOTS) -> str:
        """The HTML drift report of the window now against the reference. Blocking (it computes
        every feature and draws at most ``max_plots`` histogram pairs): run it off the loop.
        Raises ``Unavailable`` while the window holds fewer than ``min_rows`` rows or the
        reference does not fit the model's inputs."""
        if self.unbound_reason:
            raise Unavailable(f"drift of model '{self.model}': the reference does not fit its inputs: "
                              f"{self.unbound_reason}")
        with self._lock:
            snapshots = {t: r.snapshot() for t, r in (self._rings or {}).items()}
            columns = dict(self._columns)
        n = max((len(s) for s in snapshots.values()), default=0)
        if n < self.min_rows:
            raise Unavailable(f"drift of model '{self.model}': the window holds {n} rows; "
                              f"the report needs min_rows ({self.min_rows})")
        current = FeatureTable({f: snapshots[t][:, c] for f, (t, c) in columns.items()},
                               dict.fromkeys(columns, "input"), n, self.model)
        try:
            return drift_html.window_report(
                self._table, current, self.thresholds, bins=self.bins, reference_label=self.reference_label,
                current_label="the live window of this gateway process", max_plots=max_plots,
            )
        except DriftDataError as exc:
            raise Unavailable(f"drift of model '{self.model}': {exc}") from None

    def _announce(self, results: dict[str, FeatureDrift], crossed: set[str], rows: int) -> None:
        for feature, result in results.items():
            state = "alert" if feature in crossed else "resolved"
            if self._notified.get(feature, "resolved") == state:
                continue
            if not self.webhook:
                self._notified[feature] = state
                continue
            body = {
                "type": "io.onnxgate.drift",
                "state": state,
                "time": rfc3339(self._clock()),
                "model": self.model,
                "feature": feature,
                "reasons": result.reasons(self.thresholds),
                "psi": result.psi,
                "ks_statistic": result.ks_statistic,
                "ks_pvalue": result.ks_pvalue,
                "chi2_pvalue": result.chi2_pvalue,
                "thresholds": {
                    "psi": self.thresholds.psi,
                    "ks_pvalue": self.thresholds.ks_pvalue,
                    "chi2_pvalue": self.thresholds.chi2_pvalue,
                },
                "window_rows": rows,
            }
            try:
                status = post(self.webhook, encode_json(body), "application/json", 5.0)
            except OSError as exc:
                status, reason = 0, str(exc)
            else:
                reason = f"HTTP {status}"
            if 200 <= status < 300:
                self._notified[feature] = state
            else:
                self.metrics.webhook_failures.labels(self.model).inc()
                log.warning(
                    "drift: webhook %s did not take the %s for %s/%s: %s",
                    redact_url(self.webhook),
                    state,
                    self.model,
                    feature,
                    reason,
                )
