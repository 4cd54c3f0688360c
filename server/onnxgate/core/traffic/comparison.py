"""Live comparison of shadow answers with primary answers, per route and target pair.

For every shadowed request: per numeric output, the max and mean absolute difference; for
2-D float outputs, whether the argmax of each row agrees; the latency difference (shadow minus
primary). Exported as Prometheus metrics and kept over a sliding window for a JSON summary.

A request whose answers have no numeric output in common (renamed outputs, other shapes, a
primary output turned into class labels) counts as compared but adds nothing to the difference
windows: it must not look like perfect agreement. A mirrored request whose primary failed has
nothing to compare with and counts as ``primary_failed``.

Besides the window of the last comparisons, each pair keeps a history: one slot per
:data:`SLOT_S` seconds of wall time for the last :data:`HISTORY_SLOTS` slots (ten minutes), with
its counts, agreeing rows, worst max abs diff and mean latency difference, so a console opened
now draws the last minutes (a few additions per comparison; slots without traffic are absent).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxgate.core.metrics import Metrics

_COUNTS = ("compared", "failed", "dropped", "primary_failed")
SLOT_S = 10.0  # one history slot covers this many seconds
HISTORY_SLOTS = 60  # and this many are kept: ten minutes


@dataclass(slots=True)
class _Slot:
    """What one pair saw in one :data:`SLOT_S` of wall time (``t``: its start, epoch seconds)."""

    t: float
    compared: int = 0
    failed: int = 0  # failed, dropped or primary_failed
    rows: int = 0
    rows_agree: int = 0
    max_abs: float | None = None  # the worst max abs diff of the slot
    latency_sum: float = 0.0
    latency_n: int = 0

    def add(self, other: _Slot) -> None:
        self.compared += other.compared
        self.failed += other.failed
        self.rows += other.rows
        self.rows_agree += other.rows_agree
        if other.max_abs is not None:
            self.max_abs = other.max_abs if self.max_abs is None else max(self.max_abs, other.max_abs)
        self.latency_sum += other.latency_sum
        self.latency_n += other.latency_n

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "compared": self.compared, "failed": self.failed,
                "agreement": (self.rows_agree / self.rows) if self.rows else None,
                "max_abs_diff": self.max_abs,
                "latency_diff_mean_s": (self.latency_sum / self.latency_n) if self.latency_n else None}


@dataclass(slots=True)
class _Window:
    primary: str
    shadow: str
    compared: int = 0
    failed: int = 0
    dropped: int = 0
    primary_failed: int = 0
    rows: int = 0
    rows_agree: int = 0
    started: float = field(default_factory=time.time)
    max_abs: deque = field(default_factory=lambda: deque(maxlen=1000))
    mean_abs: deque = field(default_factory=lambda: deque(maxlen=1000))
    latency_diff: deque = field(default_factory=lambda: deque(maxlen=1000))
    agreement: deque = field(default_factory=lambda: deque(maxlen=1000))  # per request: agreeing row share
    history: deque[_Slot] = field(default_factory=lambda: deque(maxlen=HISTORY_SLOTS))

    def slot(self) -> _Slot:
        """The history slot of now (a new one when the last is over)."""
        start = time.time() // SLOT_S * SLOT_S
        history = self.history
        if not history or history[-1].t != start:
            history.append(_Slot(start))
        return history[-1]


def compare_outputs(primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per output present in both answers: differences, and argmax agreement for 2-D floats."""
    out: dict[str, dict[str, Any]] = {}
    for name, p in primary.items():
        s = shadow.get(name)
        if s is None:
            continue
        if p.shape != s.shape:
            out[name] = {"comparable": False, "reason": f"shapes differ: {list(p.shape)} vs {list(s.shape)}"}
            continue
        if (p.dtype == object) != (s.dtype == object):
            out[name] = {"comparable": False, "reason": f"datatypes differ: {p.dtype} vs {s.dtype}"}
            continue
        if p.dtype == object:
            out[name] = {"comparable": True, "equal_share": float(np.mean(p == s)) if p.size else 1.0}
            continue
        diff = np.abs(p.astype(np.float64) - s.astype(np.float64))
        entry: dict[str, Any] = {
            "comparable": True,
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        }
        if p.ndim == 2 and p.dtype.kind == "f" and s.dtype.kind == "f" and p.shape[1] > 0:
            agree = np.argmax(p, axis=1) == np.argmax(s, axis=1)
            entry["rows"] = int(agree.size)
            entry["rows_agree"] = int(agree.sum())
        out[name] = entry
    return out


class Comparator:
    """Comparison metrics and windows for every route."""

    def __init__(self, metrics: Metrics, window: int = 1000) -> None:
        self.metrics = metrics
        self.window = window
        self._windows: dict[tuple[str, str, str], _Window] = {}

    def _window(self, route: str, primary: str, shadow: str) -> _Window:
        w = self._windows.get((route, primary, shadow))
        if w is None:
            w = self._windows[(route, primary, shadow)] = _Window(primary, shadow)
            for name in ("max_abs", "mean_abs", "latency_diff", "agreement"):
                setattr(w, name, deque(maxlen=self.window))
        return w

    def record(
        self,
        route: str,
        primary: str,
        shadow: str,
        primary_outputs: dict[str, np.ndarray],
        shadow_outputs: dict[str, np.ndarray],
        latency_diff_s: float,
    ) -> dict[str, Any]:
        """Compare one pair of answers; returns the comparison (for the sample log)."""
        result = compare_outputs(primary_outputs, shadow_outputs)
        m = self.metrics
        labels = (route, primary, shadow)
        m.shadow_requests.labels(*labels, "compared").inc()
        m.shadow_latency_diff.labels(*labels).observe(latency_diff_s)
        w = self._window(route, primary, shadow)
        w.compared += 1
        w.latency_diff.append(latency_diff_s)
        slot = w.slot()
        slot.compared += 1
        slot.latency_sum += latency_diff_s
        slot.latency_n += 1
        worst_max, worst_mean, rows, agree = None, None, 0, 0
        for name, entry in result.items():
            if "max_abs_diff" in entry:
                m.shadow_abs_diff.labels(*labels, name, "max").observe(entry["max_abs_diff"])
                m.shadow_abs_diff.labels(*labels, name, "mean").observe(entry["mean_abs_diff"])
                worst_max = max(worst_max or 0.0, entry["max_abs_diff"])
                worst_mean = max(worst_mean or 0.0, entry["mean_abs_diff"])
            if "rows" in entry:
                m.shadow_argmax_rows.labels(*labels, name, "true").inc(entry["rows_agree"])
                m.shadow_argmax_rows.labels(*labels, name, "false").inc(entry["rows"] - entry["rows_agree"])
                rows += entry["rows"]
                agree += entry["rows_agree"]
        if worst_max is not None:  # something numeric was compared
            w.max_abs.append(worst_max)
            w.mean_abs.append(worst_mean)
            slot.max_abs = worst_max if slot.max_abs is None else max(slot.max_abs, worst_max)
        if rows:
            w.rows += rows
            w.rows_agree += agree
            w.agreement.append(agree / rows)
            slot.rows += rows
            slot.rows_agree += agree
        return {"outputs": result, "latency_diff_s": latency_diff_s}

    def record_failure(self, route: str, primary: str, shadow: str, outcome: str) -> None:
        """A shadow request that failed ("failed"), was not run ("dropped"), or answered when its
        primary did not ("primary_failed")."""
        self.metrics.shadow_requests.labels(route, primary, shadow, outcome).inc()
        w = self._window(route, primary, shadow)
        w.slot().failed += 1
        if outcome == "dropped":
            w.dropped += 1
        elif outcome == "primary_failed":
            w.primary_failed += 1
        else:
            w.failed += 1

    def summary(self, route: str) -> dict[str, Any]:
        """The JSON summary of a route: totals, and one window per (primary, shadow) pair."""
        pairs = [self._pair_summary(w) for (r, _, _), w in sorted(self._windows.items()) if r == route]
        totals = {k: sum(p["counts"][k] for p in pairs) for k in _COUNTS}
        rows = sum(p["argmax_agreement"]["rows"] for p in pairs)
        agree = sum(p["argmax_agreement"]["rows_agree"] for p in pairs)
        slots: dict[float, _Slot] = {}  # every pair's slots, added up
        for (r, _, _), w in self._windows.items():
            if r == route:
                for slot in w.history:
                    slots.setdefault(slot.t, _Slot(slot.t)).add(slot)
        horizon = time.time() - SLOT_S * HISTORY_SLOTS
        return {
            "route": route,
            "window": self.window,
            "counts": totals,
            "argmax_agreement": {"rows": rows, "rows_agree": agree, "rate": (agree / rows) if rows else None},
            "history": [slots[t].to_dict() for t in sorted(slots) if t > horizon],
            "slot_s": SLOT_S,
            "pairs": pairs,
        }

    def _pair_summary(self, w: _Window) -> dict[str, Any]:
        def quantiles(values: deque) -> dict[str, float] | None:
            if not values:
                return None
            q = np.quantile(np.fromiter(values, dtype=np.float64), [0.5, 0.9, 0.99, 1.0])
            return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}

        return {
            "primary": w.primary,
            "shadow": w.shadow,
            "since": w.started,
            "window": {"size": self.window, "filled": len(w.max_abs)},
            "counts": {k: getattr(w, k) for k in _COUNTS},
            "argmax_agreement": {
                "rows": w.rows,
                "rows_agree": w.rows_agree,
                "rate": (w.rows_agree / w.rows) if w.rows else None,
                "window_mean": float(np.mean(w.agreement)) if w.agreement else None,
            },
            "max_abs_diff": quantiles(w.max_abs),
            "mean_abs_diff": quantiles(w.mean_abs),
            "latency_diff_s": quantiles(w.latency_diff),
            "history": [slot.to_dict() for slot in w.history if slot.t > time.time() - SLOT_S * HISTORY_SLOTS],
        }
