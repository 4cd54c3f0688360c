"""Per-version request queue and dynamic batch formation, running ONNX Runtime off the loop.

Every request of a version goes through its :class:`Batcher`. One thread per model instance
(ONNX Runtime session) takes work from a bounded queue by itself, so that its next batch is
formed the moment its previous one ends, without waiting for the event loop: it concatenates
the inputs, runs the session, cuts each request's rows out of the outputs (views, no copy) and
hands the whole batch back to the loop with one callback, which answers every request in it.
The event loop only queues (under a lock shared with the threads) and answers; the threads'
side is in ``forming``:

* **Batching on** (``max_batch_size > 0`` and dynamic batching enabled): a free instance takes
  whatever is queued, in queue order (``request_queue``: priority level, deadline, arrival), up
  to ``max_batch_size`` rows, joining only requests whose
  non-batch dims, datatypes and requested outputs agree. With ``max_queue_delay_microseconds``
  > 0 it then waits, up to that delay counted from the oldest request, for the batch to fill to
  a preferred size or to ``max_batch_size``. With the default delay of 0 no batch waits to fill:
  at low load a request runs alone at once (latency), at high load requests pile up while the
  instances are busy and run together (throughput). An idle (parked) instance is woken up to
  ``KICK_ITERATIONS`` loop iterations (at most ``KICK_WAIT_NS``) after the arrival that finds it
  idle, so that a burst forms one batch, and after one iteration when the loop is idle. An
  instance filling a batch is woken by each arrival at once.
* **Batching off**: each request is one execution.
* **Deadlines** (``deadlines``, unless ``scheduler: fifo``): a request that cannot meet its
  deadline is refused on arrival, when taken, one batch ahead, or at its last start, with
  :class:`Overloaded` (reason ``deadline``), and never computed.

Requests are counted in rows. Over ``max_queue_size`` waiting requests (queued, or held by a
worker whose batch is still forming: as in Triton, that is still queue), or ``max_queue_bytes``
of queued tensors, ``submit`` raises :class:`Overloaded` at once. A request still queued when
its timeout expires is rejected with :class:`Overloaded` too (both are load shedding: HTTP 429 /
RESOURCE_EXHAUSTED); the timeout covers queueing only, never a running batch. A caller that goes
away (its task is cancelled) and a request that expired leave the queue at once, freeing their
place; one cancelled after its batch was formed is left out of the execution when it has not
started yet.

**Nothing accepted is lost.** A request is queued, held by a worker that is filling a batch, or
running; :meth:`drain` flushes batches being filled (they run at once instead of waiting out
their delay) and waits until all three are empty; :meth:`close` answers whatever is still
queued, held or running with :class:`Unavailable`, and ``submit`` refuses once closing began.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxgate.core.inference import MAX_DEADLINE_MS
from onnxgate.core.metrics import Metrics
from onnxgate.core.serving.batch_policy import BatchPolicy
from onnxgate.core.serving.busy import BusyMeter
from onnxgate.core.serving.deadlines import DeadlinePlanner
from onnxgate.core.serving.forming import BatchForming, Outcome
from onnxgate.core.serving.instances import (
    ParkedThreads,
    set_exception,
    set_result,
    start_instance_thread,
)
from onnxgate.core.serving.model import ModelVersion
from onnxgate.core.serving.request_queue import Pending, RequestQueue
from onnxgate.core.serving.stats import ExecutionTiming, VersionStats
from onnxgate.core.tracing import Tracing
from onnxgate.errors import InferenceFailed, Overloaded, Unavailable

log = logging.getLogger(__name__)

#: A parked instance is woken this many event-loop iterations after the arrival that finds it
#: idle, or once the oldest queued request has waited KICK_WAIT_NS, or as soon as one iteration
#: took under IDLE_ITERATION_NS (the loop has nothing else to do: no more arrivals are coming
#: now), whichever comes first. Under load, what arrives in one burst (gRPC calls reach the loop
#: about one per iteration) then forms one batch, not one execution per request with a thread
#: wake-up each; a lone request waits one idle iteration, a few microseconds.
KICK_ITERATIONS = 16
KICK_WAIT_NS = 200_000
IDLE_ITERATION_NS = 5_000
TIMER_SLACK_NS = 100_000  # a queue timer that fires this close to its event handles it
MAX_DEADLINE_NS = MAX_DEADLINE_MS * 1_000_000  # deadlines further off are cut to this


class Batcher(BatchForming):
    """The queue and instance threads of one model version.

    The queue, the batches taken from it and the flags below are shared between the event loop
    and the instance threads, under ``_lock``; futures are only ever touched on the loop."""

    def __init__(
        self,
        model: ModelVersion,
        stats: VersionStats,
        policy: BatchPolicy,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics or Metrics()
        self.tracing = tracing
        labels = (model.name, str(model.version))
        self._m_batch = self.metrics.batch_rows.labels(*labels)
        self._m_queue_wait = [None] + [  # by level (1..); level 0 does not exist
            self.metrics.queue_wait.labels(*labels, "shadow" if lv == policy.shadow_level else str(lv))
            for lv in range(1, policy.shadow_level + 1)
        ]
        self._m_fixed = self.metrics.exec_fixed.labels(*labels)
        self._m_per_row = self.metrics.exec_per_row.labels(*labels)
        self._m_compute = self.metrics.compute_latency.labels(*labels)
        self._m_depth = self.metrics.queue_depth.labels(*labels)
        self._m_rows = self.metrics.queued_rows.labels(*labels)
        self._m_busy_ratio = self.metrics.busy_ratio.labels(*labels)
        self._m_busy = self.metrics.instance_busy.labels(*labels)
        self._m_misses = self.metrics.deadline_misses.labels(*labels)
        self.stats = stats
        self.policy = policy
        self.instances = max(1, len(model.sessions))
        self._limit = policy.max_batch_size if policy.enabled else 1
        self._edf = policy.deadline_aware
        self.planner = DeadlinePlanner(model.name, model.version, self.instances, self._limit, policy.priority_levels)
        self._lock = threading.Lock()
        # Instance threads waiting for arrivals (idle, or filling a batch), each parked on a lock
        # of its own that the loop releases to wake it; guarded by _lock.
        self._parked = ParkedThreads(self._lock)
        self._kick_pending = False
        # Live queued requests in the order batches take them; an entry leaves the moment it is
        # taken, expires or is cancelled, so the size bound counts only requests that can still run.
        self._queue = RequestQueue(policy.priority_levels, policy.deadline_aware)
        # Batches taken from the queue and not yet answered on the loop (being filled, running,
        # or handed back): what drain waits for and close answers.
        self._taken: dict[int, list[Pending]] = {}
        self._batch_ids = itertools.count()
        # instance i is filling this batch: what it holds still waits, and counts against max_queue_size
        self._filling: list[list[Pending] | None] = [None] * self.instances
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush = False  # draining: batches being filled run at once
        self._closed = False
        loop = asyncio.get_running_loop()
        self.busy = BusyMeter(self.instances)
        self.busy.show(self._m_busy_ratio, loop)  # the gauge, now and once a second
        self._threads = [
            start_instance_thread(f"ort-{model.name}-{model.version}-{i}", self._serve, i, loop)
            for i in range(self.instances)
        ]

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queue.nbytes

    async def submit(
        self,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        outputs: Sequence[str],
        timeout_us: int | None = None,
        shadow: bool = False,
        nbytes: int = 0,
        deadline_ns: int = 0,
        priority: int | None = None,
        trace: Any = None,
    ) -> tuple[list[np.ndarray], ExecutionTiming]:
        """Queue one validated request and wait for its own rows of ``outputs``.

        ``nbytes`` is what its feeds hold, for the queue's byte bound; ``deadline_ns`` when its
        answer is due (perf_counter_ns; 0 = none, then the model's default applies);
        ``priority`` its ``priority`` parameter (None: absent). Shadow requests sort below every
        level and are the first shed: refused once the queue is half full, and evicted (newest
        first) to make room for a primary request when it is full; a full queue makes room for a
        request the same way from the lowest level below its own. ``trace`` is the sampled
        request's span (tracing on): the span of the batch that serves it links to it."""
        if self._closed:
            raise self._gone()
        p = self.policy
        loop = asyncio.get_running_loop()
        now = time.perf_counter_ns()
        level = p.shadow_level if shadow else p.level(priority)
        if not deadline_ns and p.default_deadline_ns:
            deadline_ns = now + p.default_deadline_ns
        if deadline_ns:  # a gRPC timeout may be years: it must still sort before "none"
            deadline_ns = min(deadline_ns, now + MAX_DEADLINE_NS)
        item = Pending(
            feeds, rows, tuple(outputs), self._key(feeds, outputs), loop.create_future(), now,
            nbytes, shadow, level, deadline_ns,
        )
        item.trace = trace
        if timeout_ns := p.timeout_ns(level, timeout_us):
            item.timeout_at_ns = now + timeout_ns
        queue = self._queue
        with self._lock:
            index = queue.place(item)
            if self._edf and (refused := self.planner.refusal(item, queue, index, now)) is not None:
                raise refused  # before making room: nobody is shed for a request refused anyway
            self._admit(item)  # sheds only requests of lower levels, behind index: it stays valid
            if self._edf:
                self.planner.arrived(rows, now, level)
            queue.insert(index, item)
            self._count_queue()
            if self._parked.filling:
                self._parked.wake_one()  # a forming batch waits for arrivals: it gets this one now
            elif self._parked and not self._kick_pending:
                self._kick_pending = True
                loop.call_soon(self._kick_later, loop, KICK_ITERATIONS, time.perf_counter_ns())
        self._idle.clear()
        if item.timeout_at_ns or (deadline_ns and self._edf):
            self._arm(item, loop, now)
        try:
            return await item.future
        except asyncio.CancelledError:
            # A caller gone before its request was taken frees its place now; one whose batch
            # is formed is left out of it unless it already runs.
            if not self._unqueue(item):
                item.dropped = True
            item.future.cancel()
            raise

    def _admit(self, item: Pending) -> None:
        """Under the lock: refuse ``item`` (Overloaded) unless the queue has room for it, making
        room by shedding queued requests of a lower level (shadows first) when it is full."""
        p, shadow, nbytes, queue = self.policy, item.shadow, item.nbytes, self._queue
        if shadow and (
            self._waiting(p.max_queue_size // 2) >= p.max_queue_size // 2
            or (p.max_queue_bytes and queue.nbytes + nbytes > p.max_queue_bytes // 2)
        ):
            raise Overloaded(f"model '{self.model.name}': shadow request shed under load", reason="shadow_shed")
        level_max = p.levels[item.level].max_queue_size
        if level_max and self._waiting(level_max, item.level) >= level_max:
            raise Overloaded(
                f"model '{self.model.name}' version {self.model.version}: the queue of priority level "
                f"{item.level} is full ({level_max} requests waiting)"
            )
        while self._waiting(p.max_queue_size) >= p.max_queue_size:
            if not self._evict_below(item.level):
                raise Overloaded(
                    f"model '{self.model.name}' version {self.model.version}: queue is full "
                    f"({p.max_queue_size} requests waiting)"
                )
        while p.max_queue_bytes and queue and queue.nbytes + nbytes > p.max_queue_bytes:
            if not self._evict_below(item.level):
                raise Overloaded(
                    f"model '{self.model.name}' version {self.model.version}: queued tensors would exceed "
                    f"{p.max_queue_bytes} bytes",
                    reason="queue_bytes",
                )

    def _waiting(self, limit: int, level: int = 0) -> int:
        """Under the lock: requests waiting to run (of ``level``; 0 = all), queued or held by
        an instance still filling its batch (as in Triton, a forming batch is still queue).
        Exact only up to ``limit``, which is all the bound needs: held requests are counted only
        when the cheap upper bound reaches it."""
        n = self._queue.per_level[level] if level else len(self._queue)
        if n >= limit:
            return n
        held = [batch for batch in self._filling if batch]
        if not held or n + sum(map(len, held)) < limit:
            return n
        return n + sum(
            1 for batch in held for b in batch
            if not (b.dropped or b.late or b.future.done()) and (not level or b.level == level)
        )

    def _unqueue_locked(self, item: Pending) -> bool:
        """Under the lock: take ``item`` off the queue, if it is still there."""
        if self._queue.remove(item):
            self._count_queue()
            return True
        return False

    def _unqueue(self, item: Pending) -> bool:
        """On the loop: take ``item`` off the queue (if still there) and stop its timer."""
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        with self._lock:
            removed = self._unqueue_locked(item)
        if removed:
            self._check_idle()
        return removed

    def _evict_below(self, level: int) -> bool:
        """Under the lock: fail the newest queued request of the lowest level, when that is
        below ``level`` (shadows are the lowest), to free its place; False when there is none."""
        victim = self._queue.last()
        if victim is None or victim.level <= level:
            return False
        self._unqueue_locked(victim)
        if victim.timer is not None:
            victim.timer.cancel()
            victim.timer = None
        if victim.shadow:
            exc = Overloaded(f"model '{self.model.name}': shadow request shed under load", reason="shadow_shed")
        else:
            exc = Overloaded(
                f"model '{self.model.name}' version {self.model.version}: request of priority level "
                f"{victim.level} shed for one of a higher level (the queue is full)",
                reason="priority",
            )
        set_exception(victim.future, exc)
        return True

    def _key(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple:
        if not self.policy.enabled:
            return ()
        return (tuple((n, a.shape[1:], a.dtype.str) for n, a in feeds.items()), tuple(outputs))

    def _arm(self, item: Pending, loop: asyncio.AbstractEventLoop, now: int) -> None:
        """Set ``item``'s timer for its next event: its queue timeout (unless it has passed under
        a DELAY policy) or, with the deadline scheduler, the last moment it can start."""
        due = [t for t in (0 if item.delayed else item.timeout_at_ns,
                           self.planner.start_by_ns(item) if self._edf else 0) if t]
        if due:
            item.timer = loop.call_later(max(0, min(due) - now) / 1e9, self._expire, item, loop)

    def _expire(self, item: Pending, loop: asyncio.AbstractEventLoop) -> None:
        """A queued request's timer: its queue timeout (refused, or set back under DELAY), or
        its last start (refused: its deadline can no longer be met). Once taken, it is no
        longer queued and this does nothing."""
        item.timer = None
        now = time.perf_counter_ns()
        if item.timeout_at_ns and not item.delayed and now >= item.timeout_at_ns - TIMER_SLACK_NS:
            if self.policy.levels[item.level].delay_on_timeout:
                with self._lock:
                    if not self._queue.remove(item):
                        return
                    item.delayed = 1
                    self._queue.push(item)
                self._arm(item, loop, now)
                return
            if self._unqueue(item):
                set_exception(
                    item.future,
                    Overloaded(
                        f"model '{self.model.name}' version {self.model.version}: request timed out "
                        f"after waiting {(now - item.enqueued_ns) / 1e6:.1f} ms in the queue",
                        reason="timeout",
                    ),
                )
            return
        if self._edf and item.deadline_ns:
            if now < self.planner.start_by_ns(item) - TIMER_SLACK_NS:  # the fit changed: not yet
                self._arm(item, loop, now)
            elif self._unqueue(item):
                set_exception(item.future, self.planner.late_refusal(item))
            return
        self._arm(item, loop, now)

    def _kick_later(self, loop: asyncio.AbstractEventLoop, iterations: int, previous_ns: int) -> None:
        """Wake a parked instance after ``iterations`` more loop iterations, sooner when the loop
        is idle (see KICK_ITERATIONS); ``previous_ns``: when the last iteration began."""
        now = time.perf_counter_ns()
        if iterations > 1 and now - previous_ns >= IDLE_ITERATION_NS and not self._flush and not self._closed:
            with self._lock:
                oldest = self._queue.first()
            if oldest is not None and now - oldest.enqueued_ns < KICK_WAIT_NS:
                try:
                    loop.call_soon(self._kick_later, loop, iterations - 1, now)
                    return
                except RuntimeError:  # the loop is closing: wake now rather than never
                    pass
        self._kick()

    def _kick(self) -> None:
        with self._lock:
            self._kick_pending = False
            self._parked.wake_one()


    def _check_idle(self) -> None:
        with self._lock:
            idle = not self._queue and not self._taken
        if idle:
            self._idle.set()

    def _refuse_late(self, late: list[Pending]) -> None:
        """On the loop: refuse the requests an instance took too late to meet their deadlines
        (their batch stays taken until it is answered: drain still waits for it)."""
        for b in late:
            if b.timer is not None:
                b.timer.cancel()
                b.timer = None
            set_exception(b.future, self.planner.late_refusal(b, b.hopeless))

    def _answer(self, batch_id: int, batch: list[Pending], outcome: Outcome | None) -> None:
        """On the loop, once per batch: answer every request in it, record the execution."""
        with self._lock:
            self._taken.pop(batch_id, None)
        try:
            if isinstance(outcome, BaseException):
                self._fail(batch, outcome)
            elif outcome is not None:
                own, timing, started = outcome
                rows = sum(b.rows for b in batch)
                self.stats.record_execution(rows, timing)
                self._m_batch.observe(rows)
                self._m_compute.observe(timing.infer_ns / 1e9)
                busy_ns = timing.input_ns + timing.infer_ns + timing.output_ns
                self._m_busy.inc(busy_ns / 1e9)
                self._learn(rows, busy_ns, started + busy_ns)
                waits, now = self._m_queue_wait, time.perf_counter_ns()
                traced = []
                for b, results in zip(batch, own, strict=True):
                    if b.trace is not None:
                        traced.append(b.trace)
                    queue_ns = started - b.enqueued_ns
                    waits[b.level].observe(queue_ns / 1e9)
                    if b.deadline_ns and now > b.deadline_ns and not b.shadow:  # a shadow's answer is nobody's
                        self._m_misses.inc()  # answered late (fifo; or a prediction proved optimistic)
                    set_result(b.future, (results, _with_queue(timing, queue_ns)))
                if traced and self.tracing is not None:
                    self.tracing.record_batch(traced, self.model.name, self.model.version, rows, len(batch), started,
                                              started + busy_ns)
        except BaseException:  # a bug: whoever is not answered yet is answered with it
            self._fail(batch, InferenceFailed(f"model '{self.model.name}': its answer could not be formed"))
            raise
        finally:
            for b in batch:
                if b.timer is not None:
                    b.timer.cancel()
                    b.timer = None
            self._check_idle()

    def _learn(self, rows: int, busy_ns: int, ended_ns: int) -> None:
        """Refresh the execution-time model (and its gauges) from one execution, and the
        loop's lag in answering a batch once it has run (from ``ended_ns``)."""
        self.planner.answered(time.perf_counter_ns() - ended_ns)
        model = self.planner.exec_model
        model.observe(rows, busy_ns)
        if model.fit is not None:
            self._m_fixed.set(model.fit[0] / 1e9)
            self._m_per_row.set(model.fit[1] / 1e9)

    def _gone(self) -> Unavailable:
        return Unavailable(f"model '{self.model.name}' version {self.model.version} was unloaded")

    @staticmethod
    def _fail(items, exc: BaseException) -> None:
        for b in items:
            set_exception(b.future, exc)

    # -- lifecycle ---------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> bool:
        """Run what is queued or being batched now (no more waiting for batches to fill) and wait
        until nothing is queued, held or running; False when the timeout came first."""
        with self._lock:
            self._flush = True
            self._parked.wake_all()
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Refuse new work, stop the instance threads, answer everything still queued, held or
        running with :class:`Unavailable`, release the sessions."""
        with self._lock:
            self._closed = True
            self.busy.hide()
            self._parked.wake_all()
            left = self._queue.clear()
            self._count_queue()
            held = [b for batch in self._taken.values() for b in batch]
        for item in left + held:
            if item.timer is not None:
                item.timer.cancel()
                item.timer = None
        self._fail(left + held, self._gone())
        # Each thread ends after the run it may be in (ONNX Runtime cannot be interrupted); its
        # hand-back then finds every caller answered.
        self.model.close()


def _with_queue(timing: ExecutionTiming, queue_ns: int) -> ExecutionTiming:
    return ExecutionTiming(queue_ns, timing.input_ns, timing.infer_ns, timing.output_ns)
