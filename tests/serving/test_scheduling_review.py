"""Review of the deadline- and priority-aware scheduler (issue 16): defects found in the batcher,
the request queue and the deadline planner, each shown by a test that fails on the code that
introduced it (fixed since).

In process, as tests/serving/test_scheduling.py: a ModelManager serving a real ONNX model, with
its instances' runs recorded and, where a scenario needs it, held inside a run until released.
Where a scenario needs the execution-time fit to say something, the fit is given executions
through its own ``observe`` (what the batcher feeds it after every run). Waits are on events or
on observable state (queue depth, a parked filler); where time must pass (a deadline), the test
waits until the clock says it has, so no outcome depends on how long a sleep lasts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import modelzoo
from onnxgate.core.metrics import Metrics
from onnxgate.core.registry.local import Repository
from onnxgate.core.serving.batcher import Batcher
from onnxgate.core.serving.manager import ModelManager
from onnxgate.core.serving.model import LoadOptions
from onnxgate.errors import Overloaded

SECOND_NS = 1_000_000_000
MS_NS = 1_000_000


class Runs:
    """Records every run of the version's instances (tags: each row's first input value, and
    when it started) and holds the runs whose numbers (0 = the first) are in ``hold`` until
    :meth:`release`; a held run sets ``started[n]`` once inside."""

    def __init__(self, batcher: Batcher, hold: tuple[int, ...] = (), slow_ns: int = 0, slow_runs: int = 0) -> None:
        self.batcher = batcher
        self.tags: list[list[int]] = []
        self.started_ns: list[int] = []
        self.started = {n: threading.Event() for n in hold}
        self._release = {n: threading.Event() for n in hold}
        self._lock = threading.Lock()
        model = batcher.model
        run = model.run

        def recorded(feeds, outputs, instance=0):
            with self._lock:
                n = len(self.tags)
                self.tags.append([int(v) for v in next(iter(feeds.values()))[:, 0]])
                self.started_ns.append(time.perf_counter_ns())
            if n in self.started:
                self.started[n].set()
                self._release[n].wait(30)
            if n < slow_runs:  # an execution that is slow (a stall): the fit learns it
                end = time.perf_counter_ns() + slow_ns
                while time.perf_counter_ns() < end:
                    time.sleep(0.01)
            return run(feeds, outputs, instance)

        model.run = recorded
        self.dim = model.inputs["x"].dims[0]

    def x(self, tag: int, rows: int = 1) -> np.ndarray:
        return np.zeros((rows, self.dim), np.float32) + tag

    def submit(self, tag: int, rows: int = 1, **kw: Any) -> asyncio.Future:
        return asyncio.ensure_future(self.batcher.submit({"x": self.x(tag, rows)}, rows, ["y"], **kw))

    async def wait_started(self, n: int) -> None:
        assert await asyncio.to_thread(self.started[n].wait, 30)

    def release(self, n: int) -> None:
        self._release[n].set()

    def release_all(self) -> None:
        for event in self._release.values():
            event.set()


def _run(tmp_path: Path, config: str, scenario: Callable[[Batcher], Coroutine[Any, Any, None]]) -> None:
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "m", scale=2.0)
    modelzoo.write_config(repo / "m", config)

    async def main() -> None:
        manager = ModelManager(Repository(repo), LoadOptions(), Metrics(CollectorRegistry()))
        await manager.load_all()
        batcher = manager.get("m").scheduler
        assert batcher is not None
        try:
            await scenario(batcher)
        finally:
            await manager.close(5)

    asyncio.run(main())


def _teach(batcher: Batcher, rows: int, ns: int, times: int = 3) -> None:
    """Give the version's execution-time fit ``times`` executions of ``rows`` rows taking ``ns``."""
    for _ in range(times):
        batcher.planner.exec_model.observe(rows, ns)
    assert batcher.planner.exec_model.trained


class _SteadyArrivals:
    """An arrival rate that stays put (the planner's ArrivalRate, frozen for the scenario)."""

    def __init__(self, per_ns: float) -> None:
        self.per_ns = per_ns

    def arrived(self, rows: int, now: int) -> None:
        pass


async def _until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


# -- admission ------------------------------------------------------------------------------


def test_a_stale_fit_does_not_refuse_every_request_for_good(tmp_path: Path):
    """The model's default deadline (100 ms) applies to every request. Its first three
    executions are slow (a stall: 300 ms each), the fit learns ~300 ms a request; then the model
    is fast again. Every later request is refused on arrival ('it would finish in about ...
    ms'): the instance is idle and the queue empty, and because a refused request is never
    run, the fit never sees a fast execution, so the refusals never end."""
    config = ('max_batch_size: 8\ninstance_group [{ count: 1, kind: KIND_CPU }]\ndynamic_batching { }\n'
              'parameters { key: "default_deadline_ms" value: { string_value: "100" } }\n')

    async def scenario(batcher: Batcher) -> None:
        runs = Runs(batcher, slow_ns=300 * MS_NS, slow_runs=3)
        for tag in range(3):  # untrained: admitted, computed (answered late)
            await runs.submit(tag)
        assert batcher.planner.exec_model.trained
        assert batcher.planner.predict_ns(1) > 100 * MS_NS  # the fit remembers the stall
        answered = 0
        for tag in range(10, 40):  # the model is fast again; the instance is idle throughout
            try:
                await runs.submit(tag)
                answered += 1
            except Overloaded as exc:
                assert exc.reason == "deadline"
        assert answered > 0, "every request refused with an idle instance and an empty queue"

    _run(tmp_path, config, scenario)


def test_a_request_refused_for_its_deadline_sheds_nobody_to_make_room(tmp_path: Path):
    """The queue (one place) is full with a level 2 request. A level 1 request whose deadline
    has already passed (a gRPC deadline spent during decoding) arrives: it is refused (reason
    'deadline'), but only after the level 2 request was evicted for it (reason 'priority'),
    so a request that could have run is refused for nothing."""
    config = ("max_batch_size: 1\ninstance_group [{ count: 1, kind: KIND_CPU }]\n"
              "dynamic_batching { priority_levels: 2 default_priority_level: 2 "
              "default_queue_policy { max_queue_size: 1 } }\n")

    async def scenario(batcher: Batcher) -> None:
        runs = Runs(batcher, hold=(0,))
        first = runs.submit(-1)
        await runs.wait_started(0)
        try:
            low = runs.submit(1, priority=2)
            await _until(lambda: batcher.queued == 1)
            with pytest.raises(Overloaded) as refused:
                await runs.submit(2, priority=1, deadline_ns=time.perf_counter_ns() - 1)
            assert refused.value.reason == "deadline"
            await asyncio.sleep(0)
            assert not low.done(), "the level 2 request was shed for it"
        finally:
            runs.release_all()
            outcomes = await asyncio.gather(first, low, return_exceptions=True)
        assert not isinstance(outcomes[1], BaseException), outcomes[1]
        assert runs.tags[1:] == [[1]]

    _run(tmp_path, config, scenario)


# -- late drops ----------------------------------------------------------------------------


def test_a_request_dropped_late_is_refused_without_waiting_for_the_batch_it_was_taken_with(tmp_path: Path):
    """A late request is refused at once, never computed (issue 16, item 4; the README: 'refused
    at once'). Here the instance frees up after the request's deadline passed (the loop was
    blocked, so its last-start timer could not fire): the instance takes it marked late together
    with the next request, and runs that one. The late request's refusal is handed back only
    with that batch's results, so it waits the whole execution (held here) for nothing."""
    config = "max_batch_size: 1\ninstance_group [{ count: 1, kind: KIND_CPU }]\ndynamic_batching { }\n"

    async def scenario(batcher: Batcher) -> None:
        runs = Runs(batcher, hold=(0, 1))
        first = runs.submit(-1)
        await runs.wait_started(0)
        late_deadline = time.perf_counter_ns() + 200 * MS_NS
        late = runs.submit(1, deadline_ns=late_deadline)
        after = runs.submit(2)
        await _until(lambda: batcher.queued == 2)
        # Block the loop past the deadline (no timer can fire), free the instance, and keep
        # blocking until it has taken both and runs the second one.
        while time.perf_counter_ns() <= late_deadline:
            time.sleep(0.005)
        runs.release(0)
        assert runs.started[1].wait(30)
        try:
            with pytest.raises(Overloaded) as refused:
                await asyncio.wait_for(asyncio.shield(late), 5)  # the other one's run is still held
            assert refused.value.reason == "deadline"
        finally:
            runs.release_all()
            await asyncio.gather(first, late, after, return_exceptions=True)
        assert runs.tags[1:] == [[2]]  # never computed

    _run(tmp_path, config, scenario)


# -- adaptive delay ------------------------------------------------------------------------


def test_a_forming_batch_does_not_wait_past_the_deadline_of_a_request_that_joins_it(tmp_path: Path):
    """The adaptive delay: a batch formed by one request without a deadline waits for more rows
    (the fit, mostly a fixed cost, and the arrival rate say so: ~0.24 s here). A request with a
    0.45 s deadline arrives, is admitted (two rows take ~0.25 s) and joins the forming batch,
    checked 'as if started now'.
    The batch still waits its full delay, after which the joiner can no longer make it and is
    refused as late (before 54334fb: answered late). The README: a forming batch waits 'only as
    long as every member's deadline still allows the larger batch's predicted execution'."""
    config = "max_batch_size: 64\ninstance_group [{ count: 1, kind: KIND_CPU }]\ndynamic_batching { }\n"

    async def scenario(batcher: Batcher) -> None:
        runs = Runs(batcher)
        for _ in range(60):  # a batch costs mostly a fixed 250 ms: waiting pays
            batcher.planner.exec_model.observe(1, 250 * MS_NS)
            batcher.planner.exec_model.observe(64, 300 * MS_NS)
        batcher.planner.arrivals = _SteadyArrivals(2e-7)  # 200 rows/s: batches of one cannot keep up
        now = time.perf_counter_ns()
        assert batcher.planner.fill_wait_ns([], 1, now) > 200 * MS_NS
        opener = runs.submit(1)
        await _until(lambda: batcher._parked.filling == 1)  # its batch is forming, and waits
        deadline = time.perf_counter_ns() + 450 * MS_NS
        assert batcher.planner.predict_ns(2) < 300 * MS_NS
        joiner = runs.submit(2, deadline_ns=deadline)
        try:
            await asyncio.wait_for(asyncio.shield(joiner), 8)
        finally:
            await batcher.drain(5)
            await asyncio.gather(opener, joiner, return_exceptions=True)
        run = next(i for i, tags in enumerate(runs.tags) if 2 in tags)
        assert runs.started_ns[run] <= deadline

    _run(tmp_path, config, scenario)


# -- order ---------------------------------------------------------------------------------


def test_a_far_deadline_still_sorts_before_no_deadline(tmp_path: Path):
    """Requests without a deadline come after those with one (README 'Order'). A gRPC client's
    deadline can be up to 99999999 hours away (the grpc-timeout header's largest value,
    ~3.6e20 ns); the gRPC frontend passes context.time_remaining() through unclamped."""
    config = "max_batch_size: 1\ninstance_group [{ count: 1, kind: KIND_CPU }]\ndynamic_batching { }\n"

    async def scenario(batcher: Batcher) -> None:
        runs = Runs(batcher, hold=(0,))
        first = runs.submit(-1)
        await runs.wait_started(0)
        calls = [runs.submit(1), runs.submit(2, deadline_ns=time.perf_counter_ns() + 99_999_999 * 3600 * SECOND_NS)]
        await _until(lambda: batcher.queued == 2)
        runs.release_all()
        await asyncio.gather(first, *calls)
        assert [t for tags in runs.tags[1:] for t in tags] == [2, 1]

    _run(tmp_path, config, scenario)


# -- queue bounds --------------------------------------------------------------------------


def test_a_level_bound_counts_what_a_forming_batch_holds(tmp_path: Path):
    """priority_queue_policy bounds level 2 at one waiting request. The first one is held by the
    instance in a forming batch (max_queue_delay: it waits there, still queue as in Triton and as
    the version's own bound counts it); a second level 2 request must be refused (queue_full).
    The level bound counts only what is in the sorted queue, so the second one is admitted and
    joins, and so would max_batch_size of them."""
    config = ("max_batch_size: 8\ninstance_group [{ count: 1, kind: KIND_CPU }]\n"
              "dynamic_batching { max_queue_delay_microseconds: 10000000 priority_levels: 2 default_priority_level: 2 "
              "priority_queue_policy { key: 2 value: { max_queue_size: 1 } } }\n")

    async def scenario(batcher: Batcher) -> None:
        runs = Runs(batcher)
        waiting = runs.submit(1)
        await _until(lambda: batcher._parked.filling == 1)  # held in the forming batch, waiting
        second = runs.submit(2)
        try:
            with pytest.raises(Overloaded) as refused:
                await asyncio.wait_for(asyncio.shield(second), 5)
            assert refused.value.reason == "queue_full"
        finally:
            await batcher.drain(5)
            await asyncio.gather(waiting, second, return_exceptions=True)

    _run(tmp_path, config, scenario)
