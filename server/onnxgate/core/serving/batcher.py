"""Per-version request queue and dynamic batch formation, running ONNX Runtime off the loop.

Every request of a version goes through its :class:`Batcher`. One worker per model instance
(ONNX Runtime session) takes work from a bounded queue:

* **Batching on** (``max_batch_size > 0`` and dynamic batching enabled): a free worker takes
  whatever is queued, oldest first, up to ``max_batch_size`` rows, joining only requests whose
  non-batch dims, datatypes and requested outputs agree. With ``max_queue_delay_microseconds``
  > 0 it then waits, up to that delay counted from the oldest request, for the batch to fill to
  a preferred size or to ``max_batch_size``. With the default delay of 0 nothing waits: at low
  load a request runs alone at once (latency), at high load requests pile up while the
  instances are busy and run together (throughput).
* **Batching off**: each request is one execution.

Requests are counted in rows. Over ``max_queue_size`` waiting requests (queued, or held by a
worker whose batch is still forming: as in Triton, that is still queue), or ``max_queue_bytes``
of queued tensors, ``submit`` raises :class:`Overloaded` at once. A request still queued when
its timeout expires is rejected with :class:`Overloaded` too (both are load shedding: HTTP 429 /
RESOURCE_EXHAUSTED); the timeout covers queueing only, never a running batch. A caller that goes
away (its task is cancelled) and a request that expired leave the queue at once, freeing their
place.

**Nothing accepted is lost.** A request is queued, held by a worker that is filling a batch, or
running; :meth:`drain` flushes batches being filled (they run at once instead of waiting out
their delay) and waits until all three are empty; :meth:`close` answers whatever is still
queued, held or running with :class:`Unavailable`, and ``submit`` refuses once closing began.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxgate.core.metrics import Metrics
from onnxgate.core.serving.instances import InstanceThread, set_exception, set_result
from onnxgate.core.serving.model import ModelVersion
from onnxgate.core.serving.stats import ExecutionTiming, VersionStats
from onnxgate.errors import InferenceFailed, Overloaded, Unavailable
from onnxgate_client.pb import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a version's queue is bounded and its batches formed."""

    enabled: bool = False
    max_batch_size: int = 1
    max_queue_delay_ns: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    max_queue_bytes: int = 0  # 0 = no byte bound
    default_timeout_ns: int = 0  # 0 = no timeout
    allow_timeout_override: bool = True


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


class Batcher:
    """The queue and workers of one model version."""

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
        self.stats = stats
        self.policy = policy
        self.instances = max(1, len(model.sessions))
        self._threads = [InstanceThread(f"ort-{model.name}-{model.version}-{i}") for i in range(self.instances)]
        # Live queued requests, oldest first; an entry leaves the moment it is taken, expires or
        # is cancelled, so the size bound counts only requests that can still run.
        self._queue: OrderedDict[_Pending, None] = OrderedDict()
        self._queued_bytes = 0
        self._held: list[list[_Pending]] = [[] for _ in range(self.instances)]  # taken by worker i
        # worker i is filling its batch: what it holds still waits, and counts against max_queue_size
        self._filling = [False] * self.instances
        self._waiters: list[asyncio.Future] = []  # idle or filling workers waiting for arrivals
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush = False  # draining: batches being filled run at once
        self._closed = False
        self._workers = [asyncio.get_running_loop().create_task(self._worker(i)) for i in range(self.instances)]

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
            raise Unavailable(f"model '{self.model.name}' version {self.model.version} was unloaded")
        p = self.policy
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
        loop = asyncio.get_running_loop()
        now = time.perf_counter_ns()
        key = self._key(feeds, outputs)
        item = _Pending(feeds, rows, tuple(outputs), key, loop.create_future(), now, nbytes, shadow=shadow)
        timeout_ns = p.default_timeout_ns
        if timeout_us and (not timeout_ns or p.allow_timeout_override):
            timeout_ns = timeout_us * 1000 if not timeout_ns else min(timeout_ns, timeout_us * 1000)
        if timeout_ns > 0:
            item.timer = loop.call_later(timeout_ns / 1e9, self._expire, item)
        self._queue[item] = None
        self._queued_bytes += nbytes
        self._m_depth.set(len(self._queue))
        self._idle.clear()
        self._wake()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._unqueue(item)  # a caller gone before its request was taken frees its place now
            item.future.cancel()  # a worker holding it skips it
            raise

    def _waiting(self, limit: int) -> int:
        """Requests waiting to run: queued, or held by a worker still filling its batch (as in
        Triton, a forming batch is still queue). Exact only up to ``limit``, which is all the
        bound needs: live held requests are counted only when the cheap upper bound reaches it."""
        n = len(self._queue)
        if n >= limit or not any(self._filling):
            return n
        held = [self._held[slot] for slot, filling in enumerate(self._filling) if filling]
        if n + sum(map(len, held)) < limit:
            return n
        return n + sum(1 for batch in held for b in batch if not b.future.done())

    def _unqueue(self, item: _Pending, gauge: bool = True) -> bool:
        """Take ``item`` off the queue (if still there) and stop its timer; the depth gauge
        follows unless the caller sets it once for many."""
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        if self._queue.pop(item, False) is None:
            self._queued_bytes -= item.nbytes
            if gauge:
                self._m_depth.set(len(self._queue))
            return True
        return False

    def _evict_shadow(self) -> bool:
        """Fail the newest queued shadow request to free its place; False when there is none."""
        for item in reversed(self._queue):
            if item.shadow:
                self._unqueue(item)
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
        """A queued request's timeout: it leaves the queue (timers stop when it is taken)."""
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

    # -- workers -----------------------------------------------------------------------------
    def _take(self, batch: list[_Pending], rows: int) -> int:
        """Move compatible queued requests into ``batch``; returns the batch's rows."""
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
        for item in taken:
            self._unqueue(item, gauge=False)
        self._m_depth.set(len(self._queue))
        batch.extend(taken)
        return rows

    def _batch_done(self, rows: int) -> bool:
        p = self.policy
        return self._flush or rows >= p.max_batch_size or rows in p.preferred_batch_sizes

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _arrival(self, timeout_s: float | None = None) -> None:
        """Wait for the next submit (or the timeout); no task is created."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout_s, _resolve, waiter) if timeout_s is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _check_idle(self) -> None:
        if not self._queue and not any(self._held):
            self._idle.set()

    async def _worker(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        delay_ns = self.policy.max_queue_delay_ns if self.policy.enabled else 0
        batch = self._held[slot]  # what this worker holds is visible to drain and close
        try:
            while True:
                if not self._queue:
                    self._check_idle()
                    await self._arrival()
                    continue
                rows = self._take(batch, 0)
                if delay_ns and not self._batch_done(rows):
                    self._filling[slot] = True
                    deadline = batch[0].enqueued_ns + delay_ns
                    while not self._batch_done(rows) and (left := deadline - time.perf_counter_ns()) > 0:
                        if not self._queue:
                            await self._arrival(left / 1e9)
                            if not self._queue:
                                break  # the delay is over (or a flush)
                        before = len(batch)
                        rows = self._take(batch, rows)
                        if len(batch) == before and self._queue:
                            break  # what is queued does not fit this batch
                    self._filling[slot] = False
                live = [b for b in batch if not b.future.done()]
                if live:
                    await self._execute(loop, live, slot)
                batch.clear()
        finally:
            # Cancelled (close): whatever this worker still holds is answered, never dropped.
            self._filling[slot] = False
            self._fail(batch, self._gone())
            batch.clear()

    def _gone(self) -> Unavailable:
        return Unavailable(f"model '{self.model.name}' version {self.model.version} was unloaded")

    @staticmethod
    def _fail(items, exc: BaseException) -> None:
        for b in items:
            set_exception(b.future, exc)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], slot: int) -> None:
        started = time.perf_counter_ns()
        rows = sum(b.rows for b in batch)
        try:
            results, timing = await self._threads[slot].run(loop, self._run, batch, slot)
        except InferenceFailed as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:  # never leave a caller waiting
            self._fail(batch, InferenceFailed(f"model '{self.model.name}': {exc}"))
            return
        self.stats.record_execution(rows, timing)
        self._m_batch.observe(rows)
        self._m_compute.observe(timing.infer_ns / 1e9)
        for b in batch:
            self._m_queue_wait.observe((started - b.enqueued_ns) / 1e9)
        if len(batch) == 1:
            b = batch[0]
            set_result(b.future, (results, _with_queue(timing, started - b.enqueued_ns)))
            return
        offset = 0
        for b in batch:
            if not b.future.done():
                own = [r[offset : offset + b.rows] for r in results]
                b.future.set_result((own, _with_queue(timing, started - b.enqueued_ns)))
            offset += b.rows

    def _run(self, batch: list[_Pending], slot: int) -> tuple[list[np.ndarray], ExecutionTiming]:
        t0 = time.perf_counter_ns()
        outputs = batch[0].outputs
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {n: np.concatenate([b.feeds[n] for b in batch]) for n in batch[0].feeds}
        t1 = time.perf_counter_ns()
        results = self.model.run(feeds, outputs, slot)
        t2 = time.perf_counter_ns()
        if len(batch) > 1:
            rows = sum(b.rows for b in batch)
            for name, r in zip(outputs, results, strict=True):
                if r.ndim == 0 or r.shape[0] != rows:
                    raise InferenceFailed(
                        f"model '{self.model.name}': output '{name}' has shape {list(r.shape)}, "
                        f"not {rows} rows; it cannot be batched"
                    )
        return results, ExecutionTiming(0, t1 - t0, t2 - t1, time.perf_counter_ns() - t2)

    # -- lifecycle ---------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> bool:
        """Run what is queued or being batched now (no more waiting for batches to fill) and wait
        until nothing is queued, held or running; False when the timeout came first."""
        self._flush = True
        self._wake()
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Refuse new work, stop the workers, answer everything still queued, held or running
        with :class:`Unavailable`, release the sessions."""
        self._closed = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        left = list(self._queue)
        for item in left:
            self._unqueue(item)
        self._fail(left, self._gone())
        for t in self._threads:  # each ends after the run it may be in (ONNX Runtime cannot be interrupted)
            t.close()
        self.model.close()


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _with_queue(timing: ExecutionTiming, queue_ns: int) -> ExecutionTiming:
    return ExecutionTiming(queue_ns, timing.input_ns, timing.infer_ns, timing.output_ns)


def policy_from_config(
    config: mc.ModelConfig, default_max_queue_size: int = 1024, max_queue_bytes: int = 0
) -> BatchPolicy:
    """The batch policy a completed ModelConfig asks for.

    Dynamic batching is on for every model with ``max_batch_size > 0`` unless the config's
    parameters say ``dynamic_batching: "off"``. Without a queue policy the queue holds
    ``default_max_queue_size`` requests and a request's own ``timeout`` is honoured; with a
    ``default_timeout_microseconds``, a request may only shorten it, and only when
    ``allow_timeout_override`` is set.
    """
    db = config.dynamic_batching
    qp = db.default_queue_policy
    switch = config.parameters["dynamic_batching"].string_value if "dynamic_batching" in config.parameters else ""
    enabled = config.max_batch_size > 0 and switch.lower() not in ("off", "false", "0", "no")
    return BatchPolicy(
        enabled=enabled,
        max_batch_size=max(1, config.max_batch_size),
        max_queue_delay_ns=db.max_queue_delay_microseconds * 1000,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_size=qp.max_queue_size or default_max_queue_size,
        max_queue_bytes=max_queue_bytes,
        default_timeout_ns=qp.default_timeout_microseconds * 1000,
        allow_timeout_override=qp.allow_timeout_override,
    )
