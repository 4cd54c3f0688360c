"""Batch formation: what a version's instance threads do (see ``batcher``).

Each instance thread takes its next batch from the queue by itself the moment its previous run
ends (:meth:`BatchForming._serve`): under the queue's lock it takes compatible requests in queue
order up to ``max_batch_size`` rows (``_take``), waits for more up to the queue delay or the
deadline scheduler's adaptive delay (``_fill``), and refuses what can no longer meet its
deadline (``_take`` and ``_refuse_hopeless``); then, out of the lock, it joins the inputs, runs
the session, cuts each request's rows out of the outputs (views) and hands the whole batch back
to the loop with one callback (``_answer``, on the batcher). Futures are never touched here.

:class:`BatchForming` holds these methods for :class:`~onnxgate.core.serving.batcher.Batcher`,
whose state (queue, lock, parked threads, planner) they share.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from prometheus_client import Gauge

from onnxgate.core.serving.batch_policy import BatchPolicy
from onnxgate.core.serving.busy import BusyMeter
from onnxgate.core.serving.deadlines import DeadlinePlanner
from onnxgate.core.serving.instances import ParkedThreads, hand_back, one_run
from onnxgate.core.serving.model import ModelVersion
from onnxgate.core.serving.request_queue import NO_DEADLINE, Pending, RequestQueue
from onnxgate.core.serving.stats import ExecutionTiming
from onnxgate.errors import InferenceFailed

log = logging.getLogger(__name__)

FILL_SLACK_NS = 5_000_000  # a forming batch stops waiting this long before a member's last start (wake-up latency)

#: What an instance thread hands back for one batch: each request's own output rows, the
#: batch's timing and its start (perf_counter_ns), or the exception it failed with.
Outcome = tuple[list[list[np.ndarray]], ExecutionTiming, int] | BaseException


class BatchForming:
    """The instance threads' side of a :class:`Batcher` (which defines the state below)."""

    model: ModelVersion
    policy: BatchPolicy
    planner: DeadlinePlanner
    instances: int
    _lock: threading.Lock
    _queue: RequestQueue
    _parked: ParkedThreads
    _limit: int
    _edf: bool
    _closed: bool
    _flush: bool
    _filling: list[list[Pending] | None]
    _taken: dict[int, list[Pending]]
    _batch_ids: itertools.count
    _m_depth: Gauge
    _m_rows: Gauge
    busy: BusyMeter
    _answer: Callable[..., None]
    _refuse_late: Callable[[list[Pending]], None]

    def _take(self, batch: list[Pending], rows: int) -> int:
        """Under the lock: move compatible queued requests, in queue order, into ``batch``;
        returns its rows. With the deadline scheduler, a request that cannot meet its deadline
        in the batch this take can form (as many rows as are queued, up to ``max_batch_size``)
        goes in marked ``late`` (refused, never computed): as in Nexus' early drop, the batch
        stays full rather than shrinking to save a request that waited too long, which would
        cost every request behind it. The batch stops before a request that would make it
        finish past the deadline of a member it already holds (one filling a batch)."""
        limit, edf = self._limit, self._edf
        predict = self.planner.exec_model.predict_ns
        live = [b for b in batch if not b.late]
        key = live[0].key if live else None
        members = len(live)
        min_deadline = self._min_deadline(live)
        now = time.perf_counter_ns() if edf else 0
        due = now + self.planner.answer_ns(min(limit, rows + self._queue.rows)) if edf else 0  # such a batch's answer
        taken: list[Pending] = []
        skipped = 0
        for item in self._queue:
            if edf and item.deadline_ns and item.deadline_ns < (now if item.probe else due):
                item.late = True
                taken.append(item)
                continue
            if key is None:
                key = item.key
            if item.key != key:
                skipped += 1
                if skipped > 64:
                    break
                continue
            if members and rows + item.rows > limit:
                break
            if edf:
                if item.deadline_ns and not item.probe:
                    min_deadline = min(min_deadline, item.deadline_ns)
                if members and min_deadline != NO_DEADLINE and now + predict(rows + item.rows) > min_deadline:
                    break  # with it, the batch would finish past a member's deadline
            taken.append(item)
            members += 1
            rows += item.rows
            if rows >= limit:
                break
        self._queue.remove_taken(taken)
        self._count_queue()
        batch.extend(taken)
        return rows

    def _count_queue(self) -> None:
        """Under the lock (or once closed): the queue gauges follow the queue."""
        self._m_depth.set(len(self._queue))
        self._m_rows.set(self._queue.rows)

    def _batch_done(self, rows: int) -> bool:
        p = self.policy
        return self._flush or rows >= p.max_batch_size or rows in p.preferred_batch_sizes

    def _next_batch(
        self, slot: int, wake: threading.Lock
    ) -> tuple[int, list[Pending], InferenceFailed | None] | None:
        """Block until there is work; take the next batch, filling it up to the queue delay.
        None once the version closes; with an error when taking it failed (a bug: what was
        taken is then answered with it, and the instance goes on)."""
        delay_ns = self.policy.max_queue_delay_ns if self.policy.enabled else 0
        with self._lock:
            while not self._queue and not self._closed:
                self._parked.wait(wake)
            if self._closed:
                return None
            batch: list[Pending] = []
            batch_id = next(self._batch_ids)
            self._taken[batch_id] = batch  # before the queue empties: drain sees it all along
            try:
                self._fill(slot, wake, batch, delay_ns)
            except Exception as exc:
                self._filling[slot] = None
                log.exception("model %s version %s: instance %d failed to form a batch",
                              self.model.name, self.model.version, slot)
                return batch_id, batch, InferenceFailed(f"model '{self.model.name}': {exc}")
            if self._edf and self._queue:
                self._refuse_hopeless(slot, batch)
            if self._queue:
                self._parked.wake_one()  # what this batch left behind is another instance's
            return batch_id, batch, None

    def _fill(self, slot: int, wake: threading.Lock, batch: list[Pending], delay_ns: int) -> None:
        """Under the lock: take compatible queued requests into ``batch``, waiting for more up
        to the queue delay (from its oldest request) unless it is already done; with no delay
        set, the deadline scheduler's adaptive delay (from now)."""
        rows = self._take(batch, 0)
        live = [b for b in batch if not b.late]
        if not live or self._batch_done(rows):
            return
        if delay_ns:
            until = min(b.enqueued_ns for b in live) + delay_ns
        elif self._edf and self.policy.enabled:
            now = time.perf_counter_ns()
            until = now + self.planner.fill_wait_ns(live, rows, now)
        else:
            return
        self._filling[slot] = batch
        try:
            while not self._closed and not self._batch_done(rows):
                if self._edf:  # never past what the members' deadlines leave for the batch
                    until = min(until, self._min_deadline(batch) - self.planner.answer_ns(rows) - FILL_SLACK_NS)
                if (left := until - time.perf_counter_ns()) <= 0:
                    if self._queue:  # what arrived as the delay ran out still joins
                        rows = self._take(batch, rows)
                    break
                if not self._queue:
                    self._parked.wait(wake, left / 1e9, filling=True)
                    continue
                before = len(batch)
                rows = self._take(batch, rows)
                if len(batch) == before:
                    break  # what is queued does not fit this batch
        finally:
            self._filling[slot] = None
        if self._edf:  # a member whose deadline the wait has made unmeetable is not run
            now = time.perf_counter_ns()
            due = now + self.planner.answer_ns(rows)
            for b in batch:
                if b.deadline_ns and not b.late and (now if b.probe else due) > b.deadline_ns:
                    b.late = True

    def _refuse_hopeless(self, slot: int, batch: list[Pending]) -> None:
        """Under the lock, once ``batch`` is formed: the next batch cannot start before an
        instance is free, so the queued requests it would take (the next ``max_batch_size``
        rows) that would still end past their deadlines are refused now, one batch earlier than
        their last start would find out. Nothing when an instance is idle (it starts now)."""
        planner, now = self.planner, time.perf_counter_ns()
        if not planner.exec_model.trained or self._parked.idle:
            return
        predict, limit = planner.exec_model.predict_ns, self._limit
        start = now + predict(sum(b.rows for b in batch if not b.late))
        for i, until in enumerate(planner.busy_until):
            if i != slot:
                start = min(start, max(until, now))
        if start <= now:
            return
        due = start + planner.answer_ns(min(limit, self._queue.rows))
        hopeless: list[Pending] = []
        seen = 0
        for item in self._queue:
            if seen >= limit:
                break
            seen += item.rows
            if item.deadline_ns and not item.probe and item.deadline_ns < due:
                item.late = item.hopeless = True
                hopeless.append(item)
        if hopeless:
            self._queue.remove_taken(hopeless)
            self._count_queue()
            batch.extend(hopeless)  # refused with the batch's late ones, before it runs

    @staticmethod
    def _min_deadline(batch: list[Pending]) -> int:
        """The earliest deadline a batch must meet: its members' (not late, not probes)."""
        return min(
            (b.deadline_ns for b in batch if b.deadline_ns and not b.late and not b.probe), default=NO_DEADLINE
        )

    def _serve(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        """One instance thread: take a batch, run it, hand it back; again, until closed."""
        wake = threading.Lock()
        while (taken := self._next_batch(slot, wake)) is not None:
            batch_id, batch, outcome = taken
            live = [b for b in batch if not b.dropped and not b.late]
            if late := [b for b in batch if b.late and not b.dropped]:
                hand_back(loop, self._refuse_late, late)  # now, not after the batch has run
            if live and outcome is None:
                with one_run():  # counted from the take: a session is about to run
                    try:
                        outcome = self._execute(live, slot)
                    except InferenceFailed as exc:
                        outcome = exc
                    except Exception as exc:  # never leave a caller waiting
                        outcome = InferenceFailed(f"model '{self.model.name}': {exc}")
            hand_back(loop, self._answer, batch_id, live, outcome)

    def _execute(self, batch: list[Pending], slot: int) -> Outcome:
        """In the instance thread: one execution, and each request's own rows of it."""
        t0 = time.perf_counter_ns()
        self.busy.start(slot, t0)
        if self._edf:
            self.planner.busy_until[slot] = t0 + self.planner.predict_ns(sum(b.rows for b in batch))
        try:
            return self._run(batch, slot, t0)
        finally:
            self.planner.busy_until[slot] = 0
            self.busy.stop(slot, time.perf_counter_ns())

    def _run(self, batch: list[Pending], slot: int, t0: int) -> Outcome:
        outputs = batch[0].outputs
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {n: np.concatenate([b.feeds[n] for b in batch]) for n in batch[0].feeds}
        t1 = time.perf_counter_ns()
        results = self.model.run(feeds, outputs, slot)
        t2 = time.perf_counter_ns()
        if len(batch) == 1:
            own = [results]
        else:
            rows = sum(b.rows for b in batch)
            for name, r in zip(outputs, results, strict=True):
                if r.ndim == 0 or r.shape[0] != rows:
                    raise InferenceFailed(
                        f"model '{self.model.name}': output '{name}' has shape {list(r.shape)}, "
                        f"not {rows} rows; it cannot be batched"
                    )
            own, offset = [], 0
            for b in batch:
                own.append([r[offset : offset + b.rows] for r in results])
                offset += b.rows
        return own, ExecutionTiming(0, t1 - t0, t2 - t1, time.perf_counter_ns() - t2), t0

