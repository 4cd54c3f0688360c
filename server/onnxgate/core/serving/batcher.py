"""Per-version request queue and dynamic batch formation, running ONNX Runtime off the loop.

Every request of a version goes through its :class:`Batcher`. One thread per model instance
(ONNX Runtime session) takes work from a bounded queue by itself, so that its next batch is
formed the moment its previous one ends, without waiting for the event loop: it concatenates
the inputs, runs the session, cuts each request's rows out of the outputs (views, no copy) and
hands the whole batch back to the loop with one callback, which answers every request in it.
The event loop only queues (under a lock shared with the threads) and answers:

* **Batching on** (``max_batch_size > 0`` and dynamic batching enabled): a free instance takes
  whatever is queued, oldest first, up to ``max_batch_size`` rows, joining only requests whose
  non-batch dims, datatypes and requested outputs agree. With ``max_queue_delay_microseconds``
  > 0 it then waits, up to that delay counted from the oldest request, for the batch to fill to
  a preferred size or to ``max_batch_size``. With the default delay of 0 no batch waits to fill:
  at low load a request runs alone at once (latency), at high load requests pile up while the
  instances are busy and run together (throughput). An idle (parked) instance is woken up to
  ``KICK_ITERATIONS`` loop iterations (at most ``KICK_WAIT_NS``) after the arrival that finds it
  idle, so that a burst forms one batch, and after one iteration when the loop is idle. An
  instance filling a batch is woken by each arrival at once.
* **Batching off**: each request is one execution.

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
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxgate.core.metrics import Metrics
from onnxgate.core.serving.batch_policy import BatchPolicy
from onnxgate.core.serving.instances import (
    ParkedThreads,
    hand_back,
    one_run,
    set_exception,
    set_result,
    start_instance_thread,
)
from onnxgate.core.serving.model import ModelVersion
from onnxgate.core.serving.stats import ExecutionTiming, VersionStats
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


@dataclass(eq=False, slots=True)
class _Pending:
    feeds: Mapping[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...]
    key: tuple
    future: asyncio.Future
    enqueued_ns: int
    nbytes: int = 0
    timer: asyncio.TimerHandle | None = field(default=None)
    shadow: bool = False
    dropped: bool = False  # its caller went away after its batch was formed: not computed


#: What an instance thread hands back for one batch: each request's own output rows, the
#: batch's timing and its start (perf_counter_ns), or the exception it failed with.
_Outcome = tuple[list[list[np.ndarray]], ExecutionTiming, int] | BaseException


class Batcher:
    """The queue and instance threads of one model version.

    The queue, the batches taken from it and the flags below are shared between the event loop
    and the instance threads, under ``_lock``; futures are only ever touched on the loop."""

    def __init__(
        self, model: ModelVersion, stats: VersionStats, policy: BatchPolicy, metrics: Metrics | None = None
    ) -> None:
        self.model = model
        self.metrics = metrics or Metrics()
        labels = (model.name, str(model.version))
        self._m_batch = self.metrics.batch_rows.labels(*labels)
        self._m_queue_wait = self.metrics.queue_wait.labels(*labels)
        self._m_compute = self.metrics.compute_latency.labels(*labels)
        self._m_depth = self.metrics.queue_depth.labels(*labels)
        self._m_busy = self.metrics.instance_busy.labels(*labels)
        self.stats = stats
        self.policy = policy
        self.instances = max(1, len(model.sessions))
        self._lock = threading.Lock()
        # Instance threads waiting for arrivals (idle, or filling a batch), each parked on a lock
        # of its own that the loop releases to wake it: cheaper than a Condition's bookkeeping.
        # Instance threads waiting for arrivals (idle, or filling a batch); guarded by _lock.
        self._parked = ParkedThreads(self._lock)
        self._kick_pending = False
        # Live queued requests, oldest first; an entry leaves the moment it is taken, expires or
        # is cancelled, so the size bound counts only requests that can still run.
        self._queue: OrderedDict[_Pending, None] = OrderedDict()
        self._queued_bytes = 0
        # Batches taken from the queue and not yet answered on the loop (being filled, running,
        # or handed back): what drain waits for and close answers.
        self._taken: dict[int, list[_Pending]] = {}
        self._batch_ids = itertools.count()
        # instance i is filling this batch: what it holds still waits, and counts against max_queue_size
        self._filling: list[list[_Pending] | None] = [None] * self.instances
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush = False  # draining: batches being filled run at once
        self._closed = False
        loop = asyncio.get_running_loop()
        self._threads = [
            start_instance_thread(f"ort-{model.name}-{model.version}-{i}", self._serve, i, loop)
            for i in range(self.instances)
        ]

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    async def submit(
        self,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        outputs: Sequence[str],
        timeout_us: int | None = None,
        shadow: bool = False,
        nbytes: int = 0,
    ) -> tuple[list[np.ndarray], ExecutionTiming]:
        """Queue one validated request and wait for its own rows of ``outputs``.

        ``nbytes`` is what its feeds hold, for the queue's byte bound. Shadow requests are the
        first shed: refused once the queue is half full, and evicted (newest first) to make room
        for a primary request when it is full."""
        if self._closed:
            raise self._gone()
        loop = asyncio.get_running_loop()
        item = _Pending(
            feeds, rows, tuple(outputs), self._key(feeds, outputs), loop.create_future(), time.perf_counter_ns(),
            nbytes, shadow=shadow,
        )
        with self._lock:
            self._admit(item)
            self._queue[item] = None
            self._queued_bytes += nbytes
            self._m_depth.set(len(self._queue))
            if self._parked.filling:
                self._parked.wake_one()  # a forming batch waits for arrivals: it gets this one now
            elif self._parked and not self._kick_pending:
                self._kick_pending = True
                loop.call_soon(self._kick_later, loop, KICK_ITERATIONS, time.perf_counter_ns())
        self._idle.clear()
        p = self.policy
        timeout_ns = p.default_timeout_ns
        if timeout_us and (not timeout_ns or p.allow_timeout_override):
            timeout_ns = timeout_us * 1000 if not timeout_ns else min(timeout_ns, timeout_us * 1000)
        if timeout_ns > 0:
            item.timer = loop.call_later(timeout_ns / 1e9, self._expire, item)
        try:
            return await item.future
        except asyncio.CancelledError:
            # A caller gone before its request was taken frees its place now; one whose batch
            # is formed is left out of it unless it already runs.
            if not self._unqueue(item):
                item.dropped = True
            item.future.cancel()
            raise

    def _admit(self, item: _Pending) -> None:
        """Under the lock: refuse ``item`` (Overloaded) unless the queue has room for it, making
        room by shedding queued shadow requests when ``item`` is a primary one."""
        p, shadow, nbytes = self.policy, item.shadow, item.nbytes
        if shadow and (
            self._waiting(p.max_queue_size // 2) >= p.max_queue_size // 2
            or (p.max_queue_bytes and self._queued_bytes + nbytes > p.max_queue_bytes // 2)
        ):
            raise Overloaded(f"model '{self.model.name}': shadow request shed under load", reason="shadow_shed")
        while self._waiting(p.max_queue_size) >= p.max_queue_size:
            if shadow or not self._evict_shadow():
                raise Overloaded(
                    f"model '{self.model.name}' version {self.model.version}: queue is full "
                    f"({p.max_queue_size} requests waiting)"
                )
        while p.max_queue_bytes and self._queue and self._queued_bytes + nbytes > p.max_queue_bytes:
            if shadow or not self._evict_shadow():
                raise Overloaded(
                    f"model '{self.model.name}' version {self.model.version}: queued tensors would exceed "
                    f"{p.max_queue_bytes} bytes",
                    reason="queue_bytes",
                )

    def _waiting(self, limit: int) -> int:
        """Under the lock: requests waiting to run, queued or held by an instance still filling
        its batch (as in Triton, a forming batch is still queue). Exact only up to ``limit``,
        which is all the bound needs: held requests are counted only when the cheap upper bound
        reaches it."""
        n = len(self._queue)
        if n >= limit:
            return n
        held = [batch for batch in self._filling if batch]
        if not held or n + sum(map(len, held)) < limit:
            return n
        return n + sum(1 for batch in held for b in batch if not b.dropped and not b.future.done())

    def _unqueue_locked(self, item: _Pending) -> bool:
        """Under the lock: take ``item`` off the queue, if it is still there."""
        if self._queue.pop(item, False) is None:
            self._queued_bytes -= item.nbytes
            self._m_depth.set(len(self._queue))
            return True
        return False

    def _unqueue(self, item: _Pending) -> bool:
        """On the loop: take ``item`` off the queue (if still there) and stop its timer."""
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        with self._lock:
            removed = self._unqueue_locked(item)
        if removed:
            self._check_idle()
        return removed

    def _evict_shadow(self) -> bool:
        """Under the lock: fail the newest queued shadow request to free its place; False when
        there is none."""
        for item in reversed(self._queue):
            if item.shadow:
                self._unqueue_locked(item)
                if item.timer is not None:
                    item.timer.cancel()
                    item.timer = None
                set_exception(
                    item.future,
                    Overloaded(f"model '{self.model.name}': shadow request shed under load", reason="shadow_shed"),
                )
                return True
        return False

    def _key(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple:
        if not self.policy.enabled:
            return ()
        return (tuple((n, a.shape[1:], a.dtype.str) for n, a in feeds.items()), tuple(outputs))

    def _expire(self, item: _Pending) -> None:
        """A queued request's timeout: it leaves the queue (once taken, it is no longer queued)."""
        item.timer = None
        if self._unqueue(item):
            set_exception(
                item.future,
                Overloaded(
                    f"model '{self.model.name}' version {self.model.version}: request timed out "
                    f"after waiting {(time.perf_counter_ns() - item.enqueued_ns) / 1e6:.1f} ms in the queue",
                    reason="timeout",
                ),
            )

    def _kick_later(self, loop: asyncio.AbstractEventLoop, iterations: int, previous_ns: int) -> None:
        """Wake a parked instance after ``iterations`` more loop iterations, sooner when the loop
        is idle (see KICK_ITERATIONS); ``previous_ns``: when the last iteration began."""
        now = time.perf_counter_ns()
        if iterations > 1 and now - previous_ns >= IDLE_ITERATION_NS and not self._flush and not self._closed:
            with self._lock:
                oldest = next(iter(self._queue), None)
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

    # -- instance threads --------------------------------------------------------------------
    def _take(self, batch: list[_Pending], rows: int) -> int:
        """Under the lock: move compatible queued requests into ``batch``; returns its rows."""
        limit = self.policy.max_batch_size if self.policy.enabled else 1
        key = batch[0].key if batch else None
        taken: list[_Pending] = []
        skipped = 0
        for item in self._queue:
            if key is None:
                key = item.key
            if item.key != key:
                skipped += 1
                if skipped > 64:
                    break
                continue
            if (batch or taken) and (not self.policy.enabled or rows + item.rows > limit):
                break
            taken.append(item)
            rows += item.rows
            if rows >= limit:
                break
        queue = self._queue
        for item in taken:
            del queue[item]
            self._queued_bytes -= item.nbytes
        self._m_depth.set(len(queue))
        batch.extend(taken)
        return rows

    def _batch_done(self, rows: int) -> bool:
        p = self.policy
        return self._flush or rows >= p.max_batch_size or rows in p.preferred_batch_sizes

    def _next_batch(
        self, slot: int, wake: threading.Lock
    ) -> tuple[int, list[_Pending], InferenceFailed | None] | None:
        """Block until there is work; take the next batch, filling it up to the queue delay.
        None once the version closes; with an error when taking it failed (a bug: what was
        taken is then answered with it, and the instance goes on)."""
        delay_ns = self.policy.max_queue_delay_ns if self.policy.enabled else 0
        with self._lock:
            while not self._queue and not self._closed:
                self._parked.wait(wake)
            if self._closed:
                return None
            batch: list[_Pending] = []
            batch_id = next(self._batch_ids)
            self._taken[batch_id] = batch  # before the queue empties: drain sees it all along
            try:
                self._fill(slot, wake, batch, delay_ns)
            except Exception as exc:
                self._filling[slot] = None
                log.exception("model %s version %s: instance %d failed to form a batch",
                              self.model.name, self.model.version, slot)
                return batch_id, batch, InferenceFailed(f"model '{self.model.name}': {exc}")
            if self._queue:
                self._parked.wake_one()  # what this batch left behind is another instance's
            return batch_id, batch, None

    def _fill(self, slot: int, wake: threading.Lock, batch: list[_Pending], delay_ns: int) -> None:
        """Under the lock: take compatible queued requests into ``batch``, waiting for more up
        to the queue delay (from its oldest request) unless it is already done."""
        rows = self._take(batch, 0)
        if delay_ns and not self._batch_done(rows):
            self._filling[slot] = batch
            deadline = batch[0].enqueued_ns + delay_ns
            while not self._closed and not self._batch_done(rows):
                if (left := deadline - time.perf_counter_ns()) <= 0:
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
            self._filling[slot] = None

    def _serve(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        """One instance thread: take a batch, run it, hand it back; again, until closed."""
        wake = threading.Lock()
        while (taken := self._next_batch(slot, wake)) is not None:
            batch_id, batch, outcome = taken
            live = [b for b in batch if not b.dropped]
            if live and outcome is None:
                with one_run():  # counted from the take: a session is about to run
                    try:
                        outcome = self._execute(live, slot)
                    except InferenceFailed as exc:
                        outcome = exc
                    except Exception as exc:  # never leave a caller waiting
                        outcome = InferenceFailed(f"model '{self.model.name}': {exc}")
            hand_back(loop, self._answer, batch_id, live, outcome)

    def _execute(self, batch: list[_Pending], slot: int) -> _Outcome:
        """In the instance thread: one execution, and each request's own rows of it."""
        t0 = time.perf_counter_ns()
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

    def _answer(self, batch_id: int, batch: list[_Pending], outcome: _Outcome | None) -> None:
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
                self._m_busy.inc((timing.input_ns + timing.infer_ns + timing.output_ns) / 1e9)
                observe = self._m_queue_wait.observe
                for b, results in zip(batch, own, strict=True):
                    queue_ns = started - b.enqueued_ns
                    observe(queue_ns / 1e9)
                    set_result(b.future, (results, _with_queue(timing, queue_ns)))
        except BaseException:  # a bug: whoever is not answered yet is answered with it
            self._fail(batch, InferenceFailed(f"model '{self.model.name}': its answer could not be formed"))
            raise
        finally:
            for b in batch:
                if b.timer is not None:
                    b.timer.cancel()
                    b.timer = None
            self._check_idle()

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
            self._parked.wake_all()
            left = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._m_depth.set(0)
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
