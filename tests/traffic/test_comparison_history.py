"""The shadow comparison's history (``GET /v2/routes/{name}/comparison``'s ``history``): one slot
per ten seconds of wall time for ten minutes, every pair's slots added up for the route."""

from __future__ import annotations

import numpy as np
import pytest

from onnxgate.core.metrics import Metrics
from onnxgate.core.traffic import comparison


def _answer(rows: list[list[float]]) -> dict[str, np.ndarray]:
    return {"y": np.asarray(rows, np.float32)}


def test_slots_hold_counts_agreement_worst_diff_and_mean_latency_and_age_out(monkeypatch):
    clock = [10_000.0]
    monkeypatch.setattr(comparison.time, "time", lambda: clock[0])
    c = comparison.Comparator(Metrics())
    primary = _answer([[1.0, 0.0], [0.0, 1.0]])
    c.record("r", "a", "b", primary, _answer([[1.0, 0.0], [0.0, 1.0]]), 0.002)  # agree, no diff
    c.record("r", "a", "b", primary, _answer([[0.0, 1.5], [0.0, 1.0]]), 0.004)  # one row disagrees
    c.record_failure("r", "a", "b", "dropped")
    clock[0] += comparison.SLOT_S
    c.record("r", "a", "c", primary, _answer([[1.0, 0.25], [0.0, 1.0]]), -0.001)  # another pair, next slot
    doc = c.summary("r")
    first, second = doc["history"]
    assert first == {"t": 10_000.0, "compared": 2, "failed": 1, "agreement": 0.75, "max_abs_diff": 1.5,
                     "latency_diff_mean_s": pytest.approx(0.003)}
    assert second["t"] == 10_010.0 and second["compared"] == 1 and second["agreement"] == 1.0
    assert second["max_abs_diff"] == 0.25 and second["latency_diff_mean_s"] == pytest.approx(-0.001)
    assert doc["slot_s"] == comparison.SLOT_S
    assert [len(p["history"]) for p in doc["pairs"]] == [1, 1]

    # the same second from two pairs adds up
    c.record("r", "a", "b", primary, primary, 0.001)
    (last,) = c.summary("r")["history"][-1:]
    assert last["compared"] == 2 and last["latency_diff_mean_s"] == pytest.approx(0.0)

    # ten minutes on: the old slots are gone from the answer and from memory
    clock[0] += comparison.SLOT_S * comparison.HISTORY_SLOTS
    c.record("r", "a", "b", primary, primary, 0.001)
    assert [s["t"] for s in c.summary("r")["history"]] == [clock[0]]
    assert [len(p["history"]) for p in c.summary("r")["pairs"]] == [1, 0]  # pair a->c: quiet since
    for _ in range(3 * comparison.HISTORY_SLOTS):
        clock[0] += comparison.SLOT_S
        c.record("r", "a", "b", primary, primary, 0.001)
    assert len(c.summary("r")["pairs"][0]["history"]) == comparison.HISTORY_SLOTS
    assert c.summary("other")["history"] == []
