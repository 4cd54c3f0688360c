"""The deadline scheduler's decisions for one version: admission, late drops, adaptive delay.

A request's deadline bounds when its answer must be sent. From the version's learned execution
times (:class:`~onnxgate.core.serving.exec_model.ExecTimeModel`) the planner decides:

* **Admission** (on arrival): the request would start once the instances have finished what
  they run now and what is queued ahead of it (higher levels, earlier deadlines), in full
  batches spread over the instances; it is refused at once when it would then finish past its
  deadline. What arrives later and sorts ahead of it (an earlier deadline, a higher level) can
  still push it back: that is caught when it is taken, or by its timer.
* **Late drops** (when an instance takes a batch, in ``Batcher._take`` with :meth:`predict_ns`):
  a request that cannot finish in time even in a batch of its own is refused, never computed; a
  request is not added to a batch when the batch, with it, would finish past any member's
  deadline.
* **Hopeless requests** (once an instance has taken a batch, with no instance idle): the next
  batch cannot start before an instance is free; the queued requests it would take that would
  still miss their deadlines are refused then, a batch earlier than their last start.
* **The last start** (a timer): a request still queued when even starting now would finish past
  its deadline is refused then, not left to wait.

Every prediction of when an answer is sent adds the loop's recent lag in answering a batch
after it ran (:meth:`answered`): under load the answer waits its turn on the loop.
* **Adaptive delay** (with no ``max_queue_delay_microseconds``): a forming batch waits for more
  rows only when the arrivals reach BUSY_LOAD of what full batches on every instance serve, the
  larger batch would serve BATCH_GAIN as many rows per second (a model whose cost is per row
  gains nothing by waiting), and it is too small to keep up with them (``instances * rows``
  rows per batch time, against the arrival rate), and only as long as every member's deadline
  still allows the larger batch's execution. Below that load nothing waits: arrivals queue while
  an instance runs, and the next batch takes them all.

Untrained (a version's first executions), nothing is refused on a prediction: only requests
already past their deadline are. Nor is a request that would start at once (an instance free,
nothing queued ahead): it runs as a *probe*, dropped only once its deadline has passed, and its
execution corrects the fit, which would otherwise, after a stall, refuse everything for good
(a refused request teaches it nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onnxgate.core.serving.exec_model import ArrivalRate, ExecTimeModel
from onnxgate.core.serving.request_queue import Pending, RequestQueue
from onnxgate.errors import Overloaded

MIN_WAIT_NS = 50_000  # a forming batch waits at least this long, or not at all
BUSY_LOAD = 0.8  # the adaptive delay applies only from this share of full-batch capacity
BATCH_GAIN = 1.2  # ... and only when the larger batch serves at least this much more per second
LAG_SMOOTHING = 16  # the answer lag follows about this many batches


class DeadlinePlanner:
    """Predictions for one version with ``instances`` instances and batches of ``limit`` rows."""

    def __init__(self, name: str, version: int, instances: int, limit: int, levels: int = 1) -> None:
        self.name, self.version = name, version
        self.instances = instances
        self.limit = limit
        self.exec_model = ExecTimeModel()
        self.arrivals = ArrivalRate()
        # By priority level (index 0 unused, the last one shadows): higher levels arriving while
        # a request waits go ahead of it.
        self.level_arrivals = [ArrivalRate() for _ in range(levels + 2)] if levels > 1 else []

        # When each instance's running batch should end (perf_counter_ns; 0 = not running).
        self.busy_until = [0] * instances
        # How long the event loop takes to answer a batch once it has run, smoothed: under load
        # the loop is busy and the answer waits its turn. Predictions of when an answer is sent
        # add it.
        self.answer_lag_ns = 0

    def arrived(self, rows: int, now: int, level: int) -> None:
        """``rows`` arrived at ``now``, at priority ``level``."""
        self.arrivals.arrived(rows, now)
        if self.level_arrivals:
            self.level_arrivals[level].arrived(rows, now)

    def answered(self, lag_ns: int) -> None:
        """One batch's answer came ``lag_ns`` after its execution ended (on the loop)."""
        self.answer_lag_ns += (max(0, lag_ns) - self.answer_lag_ns) // LAG_SMOOTHING

    def predict_ns(self, rows: int) -> int:
        return self.exec_model.predict_ns(rows)

    def answer_ns(self, rows: int) -> int:
        """Predicted time from starting a batch of ``rows`` rows to its answer: its execution
        and the loop's lag in answering it."""
        return self.exec_model.predict_ns(rows) + self.answer_lag_ns

    def wait_ns(self, ahead_rows: int, now: int) -> int:
        """Predicted time until a request with ``ahead_rows`` queued ahead of it starts."""
        full = ahead_rows // self.limit
        free = [max(0, u - now) for u in self.busy_until]  # when each instance is free
        if full < self.instances:  # its batch goes to the (full + 1)-th instance to be free
            return sorted(free)[full] if self.instances > 1 else free[0]
        return (sum(free) + full * self.exec_model.predict_ns(self.limit)) // self.instances

    def refusal(self, item: Pending, queue: RequestQueue, index: int, now: int) -> Overloaded | None:
        """Why ``item``, about to be queued at ``index``, cannot meet its deadline (None: it can)."""
        if not item.deadline_ns:
            return None
        left = item.deadline_ns - now
        if left <= 0:
            return self._late(item, "its deadline had passed on arrival", 0)
        if not self.exec_model.trained:
            return None
        ahead = queue.rows_ahead(index)
        wait = self.wait_ns(ahead, now)
        if item.level > 1 and self.level_arrivals:  # higher levels that arrive meanwhile go first
            higher = sum(rate.per_ns for rate in self.level_arrivals[1 : item.level])
            ahead += int(higher * wait)
            wait = self.wait_ns(ahead, now)
        # Its batch: what is ahead of it past the last full batch, itself, and what arrives
        # before it starts (under load, a full batch).
        joining = int(self.arrivals.per_ns * wait)
        finish = wait + self.answer_ns(min(self.limit, ahead % self.limit + item.rows + joining))
        # One more margin than the take uses: a request admitted near the edge would be refused
        # later (after waiting), where a refusal now costs the caller nothing.
        if finish + self.exec_model.margin_ns <= left:
            return None
        if not ahead and not wait:  # it would start at once: run it, and let it correct the fit
            item.probe = True
            return None
        return self._late(
            item,
            f"it would finish in about {finish / 1e6:.1f} ms ({wait / 1e6:.1f} ms of work is ahead of it), "
            f"past its deadline in {left / 1e6:.1f} ms",
            wait,
        )

    def start_by_ns(self, item: Pending) -> int:
        """The last moment ``item`` can start and still meet its deadline (0 = no deadline)."""
        if not item.deadline_ns:
            return 0
        if item.probe:
            return item.deadline_ns
        return item.deadline_ns - self.answer_ns(item.rows)

    def late_refusal(self, item: Pending, behind: bool = False) -> Overloaded:
        """The refusal of a request whose deadline could no longer be met while it waited: at
        the front of the queue, or (``behind``) behind a batch just taken."""
        where = "behind the batch just taken" if behind else "when it reached the front of the queue"
        return self._late(item, f"its deadline could no longer be met {where}", 0)

    def fill_wait_ns(self, live: Sequence[Pending], rows: int, now: int) -> int:
        """How long a forming batch of ``rows`` rows (members ``live``) should wait for more."""
        fit, per_ns = self.exec_model.fit, self.arrivals.per_ns
        if not self.exec_model.trained or fit is None or per_ns <= 0 or not rows or rows >= self.limit:
            return 0
        fixed, per_row, _ = fit
        k = self.instances
        if per_ns * self.exec_model.predict_ns(self.limit) < BUSY_LOAD * k * self.limit:
            return 0  # under BUSY_LOAD of what full batches serve: the queue is stable, nothing waits
        if k * rows >= per_ns * (fixed + per_row * rows):
            return 0  # this batch keeps up with what arrives while it runs: nothing waits
        if k <= per_ns * per_row:
            target = self.limit
        else:
            target = min(self.limit, math.ceil(per_ns * fixed / (k - per_ns * per_row)))
        predict = self.exec_model.predict_ns
        if target <= rows or target * predict(rows) < BATCH_GAIN * rows * predict(target):
            return 0  # a bigger batch would not serve enough more rows per second to be worth a wait
        wait = min((target - rows) / per_ns, predict(self.limit))
        for b in live:
            if b.deadline_ns and not b.probe:
                wait = min(wait, b.deadline_ns - predict(target) - now)
        return int(wait) if wait >= MIN_WAIT_NS else 0

    def _late(self, item: Pending, why: str, wait_ns: int) -> Overloaded:
        return Overloaded(
            f"model '{self.name}' version {self.version}: request refused, {why}",
            retry_after_s=max(0.001, wait_ns / 1e9),
            reason="deadline",
        )
