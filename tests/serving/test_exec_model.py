"""The deadline scheduler's predictions: the online execution-time fit, the admission estimate
and the adaptive delay, on synthetic executions (deterministic, no model runs)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from onnxgate.core.serving.deadlines import DeadlinePlanner
from onnxgate.core.serving.exec_model import MIN_EXECUTIONS, ArrivalRate, ExecTimeModel
from onnxgate.core.serving.request_queue import Pending, RequestQueue

MS = 1_000_000


def _trained(fixed_ns: float, per_row_ns: float, sizes=(1, 8, 64, 32, 4, 64, 16, 2), noise: float = 0.0,
             rounds: int = 20) -> ExecTimeModel:
    rng = np.random.default_rng(0)
    model = ExecTimeModel()
    for _ in range(rounds):
        for rows in sizes:
            ns = (fixed_ns + per_row_ns * rows) * (1 + noise * rng.standard_normal())
            model.observe(rows, int(ns))
    return model


def test_the_fit_recovers_fixed_and_per_row_costs():
    model = _trained(2 * MS, 0.5 * MS)
    assert model.fit is not None
    fixed, per_row, margin = model.fit
    assert fixed == pytest.approx(2 * MS, rel=1e-3)
    assert per_row == pytest.approx(0.5 * MS, rel=1e-3)
    assert margin < 0.01 * MS  # exact executions: next to no margin left once the first guesses fade
    assert model.predict_ns(64) == pytest.approx(34 * MS, rel=1e-3)


def test_noisy_executions_widen_the_margin_not_the_fit():
    model = _trained(2 * MS, 0.5 * MS, noise=0.1)
    fixed, per_row, margin = model.fit
    assert per_row == pytest.approx(0.5 * MS, rel=0.1)
    assert margin > 0.5 * MS  # about two mean absolute deviations
    assert model.predict_ns(64) > fixed + per_row * 64


def test_one_batch_size_only_gives_a_proportional_fit():
    model = _trained(2 * MS, 0.5 * MS, sizes=(8,))
    fixed, per_row, _ = model.fit
    assert fixed == 0 and per_row == pytest.approx(6 * MS / 8)


def test_untrained_predicts_nothing():
    model = ExecTimeModel()
    for _ in range(MIN_EXECUTIONS - 1):
        model.observe(4, 5 * MS)
    assert not model.trained and model.predict_ns(64) == 0
    model.observe(4, 5 * MS)
    assert model.trained and model.predict_ns(4) > 0


def test_the_fit_follows_a_change_in_speed():
    model = _trained(1 * MS, 1 * MS)
    for _ in range(60):
        for rows in (1, 16, 64):
            model.observe(rows, int(3 * MS * rows))  # three times slower now, no fixed cost
    assert model.fit[1] == pytest.approx(3 * MS, rel=0.1)


def _planner(model: ExecTimeModel, instances: int = 1, limit: int = 64) -> DeadlinePlanner:
    planner = DeadlinePlanner("m", 1, instances, limit)
    planner.exec_model = model
    return planner


def _pending(rows: int = 1, deadline_ns: int = 0) -> Pending:
    return Pending({}, rows, (), (), asyncio.Future(loop=asyncio.new_event_loop()), 0, deadline_ns=deadline_ns)


def test_admission_counts_the_work_ahead_in_full_batches():
    planner = _planner(_trained(2 * MS, 0.5 * MS))  # a full batch of 64: 34 ms
    queue = RequestQueue(1, edf=True)
    now = 10**12
    for _ in range(128):  # two full batches ahead: earlier deadlines
        queue.push(_pending(deadline_ns=now + 40 * MS))
    queue.push(_pending())  # no deadline: behind
    item = _pending(deadline_ns=now + 60 * MS)  # 68 ms of work + its own batch: cannot make it
    refused = planner.refusal(item, queue, queue.place(item), now)
    assert refused is not None and refused.reason == "deadline"
    assert refused.retry_after_s == pytest.approx(0.068, rel=1e-3)
    roomy = _pending(deadline_ns=now + 80 * MS)
    assert planner.refusal(roomy, queue, queue.place(roomy), now) is None
    two = _planner(_trained(2 * MS, 0.5 * MS), instances=2)  # two instances halve the wait
    item = _pending(deadline_ns=now + 60 * MS)
    assert two.refusal(item, queue, queue.place(item), now) is None


def test_an_earlier_deadline_is_admitted_ahead_of_queued_later_ones():
    planner = _planner(_trained(2 * MS, 0.5 * MS))
    queue = RequestQueue(1, edf=True)
    now = 10**12
    for _ in range(128):
        queue.push(_pending(deadline_ns=now + 1000 * MS))
    urgent = _pending(deadline_ns=now + 10 * MS)
    index = queue.place(urgent)
    assert index == 0 and planner.refusal(urgent, queue, index, now) is None


def test_a_request_past_its_deadline_is_refused_even_untrained():
    planner = _planner(ExecTimeModel())
    queue = RequestQueue(1, edf=True)
    item = _pending(deadline_ns=5)
    assert planner.refusal(item, queue, queue.place(item), 10).reason == "deadline"
    fresh = _pending(deadline_ns=10**15)
    assert planner.refusal(fresh, queue, queue.place(fresh), 10) is None


def test_adaptive_delay_waits_only_when_the_batch_cannot_keep_up():
    planner = _planner(_trained(5 * MS, 0.1 * MS))  # overhead-bound: big batches are cheap
    live = [_pending()]
    planner.arrivals.per_ns = 1 / (100 * MS)  # 10 rows/s: a batch of one keeps up
    assert planner.fill_wait_ns(live, 1, 0) == 0
    planner.arrivals.per_ns = 1 / (0.5 * MS)  # 2000 rows/s: one row per 5.1 ms cannot keep up, but
    assert planner.fill_wait_ns(live, 1, 0) == 0  # that is 36 % of what full batches serve: no wait
    planner.arrivals.per_ns = 1 / (0.2 * MS)  # 5000 rows/s, 89 %: the batch waits to fill
    wait = planner.fill_wait_ns(live, 1, 0)
    assert 0 < wait <= planner.exec_model.predict_ns(64)
    # ... and never past what a member's deadline leaves for the larger batch.
    tight = [_pending(deadline_ns=8 * MS)]
    assert planner.fill_wait_ns(tight, 1, 0) < 8 * MS - planner.exec_model.predict_ns(1)
    assert planner.fill_wait_ns([_pending(deadline_ns=1 * MS)], 1, 0) == 0


def test_arrival_rate_is_smoothed_rows_per_nanosecond():
    rate = ArrivalRate(window_ns=10 * MS)
    t = 1
    for _ in range(2000):
        rate.arrived(1, t)
        t += MS // 4  # 4000 rows/s
    assert rate.per_ns == pytest.approx(4 / MS, rel=0.05)


def test_with_instances_free_a_request_starts_on_the_first_free_one():
    planner = _planner(_trained(2 * MS, 0.5 * MS), instances=2)
    queue = RequestQueue(1, edf=True)
    now = 10**12
    planner.busy_until = [now + 100 * MS, 0]  # one instance busy for 100 ms more, one free
    item = _pending(deadline_ns=now + 10 * MS)
    assert planner.wait_ns(queue.rows_ahead(queue.place(item)), now) == 0
    assert planner.refusal(item, queue, queue.place(item), now) is None
    planner.busy_until = [now + 100 * MS, now + 50 * MS]
    assert planner.wait_ns(queue.rows_ahead(queue.place(item)), now) == 50 * MS


def test_the_loops_answer_lag_counts_in_every_prediction():
    planner = _planner(_trained(2 * MS, 0.5 * MS))
    queue = RequestQueue(1, edf=True)
    now = 10**12
    for _ in range(64):  # one full batch ahead: 34 ms, then its own, 2.5 ms
        queue.push(_pending(deadline_ns=now + 1 * MS))
    item = _pending(deadline_ns=now + 40 * MS)
    assert planner.refusal(item, queue, queue.place(item), now) is None
    for _ in range(200):
        planner.answered(10 * MS)  # the loop answers batches 10 ms after they ran
    assert planner.answer_lag_ns == pytest.approx(10 * MS, rel=0.01)
    refused = planner.refusal(item, queue, queue.place(item), now)
    assert refused is not None and refused.reason == "deadline"
    assert planner.start_by_ns(item) == item.deadline_ns - planner.predict_ns(1) - planner.answer_lag_ns


def test_higher_levels_arriving_while_a_request_waits_count_ahead_of_it():
    planner = DeadlinePlanner("m", 1, 1, 64, levels=2)
    planner.exec_model = _trained(2 * MS, 0.5 * MS)
    now = 10**12
    planner.busy_until = [now + 30 * MS]  # the running batch: 30 ms more
    t = 1
    for _ in range(4000):  # level 1 arrives at 4000 rows/s
        planner.arrived(1, t, 1)
        t += MS // 4
    queue = RequestQueue(2, edf=True)
    low, high = _pending(deadline_ns=now + 80 * MS), _pending(deadline_ns=now + 80 * MS)
    low.level = 2
    # Level 1 starts in 30 ms, in a full batch (what arrives meanwhile joins it): done at 64 ms.
    # Level 2 also waits for the ~120 level-1 rows arriving in those 30 ms, a full batch more:
    # done at ~98 ms, past its deadline.
    assert planner.refusal(high, queue, queue.place(high), now) is None
    refused = planner.refusal(low, queue, queue.place(low), now)
    assert refused is not None and refused.reason == "deadline"
