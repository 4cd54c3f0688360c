"""The order a version's queue serves requests in: earliest deadline first, Triton's priority
levels and DELAY timeouts, shadow copies last, lower levels shed for higher ones, and late
requests refused, never computed. In process, with an instance held in its first run so that
everything else queues behind it; each request is tagged by its input value."""

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

ONE_AT_A_TIME = "max_batch_size: 1\ninstance_group [{ count: 1, kind: KIND_CPU }]\ndynamic_batching { %s }\n"
SECOND_NS = 1_000_000_000


class Held:
    """The version's one instance, held inside its first run until :meth:`release`; every run
    records the tags (first input value of each row) it computed."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.running, self._release = threading.Event(), threading.Event()
        self.second_running, self.release_second = threading.Event(), threading.Event()
        self.release_second.set()  # only held when a test asks (clears it)
        self.runs: list[list[int]] = []
        model = batcher.model
        run = model.run

        def recorded(feeds, outputs, instance=0):
            self.runs.append([int(v) for v in next(iter(feeds.values()))[:, 0]])
            if len(self.runs) == 1:
                self.running.set()
                self._release.wait(30)
            elif len(self.runs) == 2:
                self.second_running.set()
                self.release_second.wait(30)
            return run(feeds, outputs, instance)

        model.run = recorded
        self.x = np.zeros((1, model.inputs["x"].dims[0]), np.float32)

    def submit(self, tag: int, **kw: Any) -> asyncio.Future:
        return asyncio.ensure_future(self.batcher.submit({"x": self.x + tag}, 1, ["y"], **kw))

    async def hold(self) -> asyncio.Future:
        first = self.submit(-1)
        assert await asyncio.to_thread(self.running.wait, 30)
        return first

    def release(self) -> None:
        self._release.set()

    def order(self) -> list[int]:
        return [tag for run in self.runs[1:] for tag in run]


def _run(tmp_path: Path, dynamic_batching: str, scenario: Callable[[Held], Coroutine[Any, Any, None]],
         config: str = ONE_AT_A_TIME, scheduler: str = "deadline") -> None:
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "m", scale=2.0)
    modelzoo.write_config(repo / "m", config % dynamic_batching)

    async def main() -> None:
        manager = ModelManager(Repository(repo), LoadOptions(scheduler=scheduler), Metrics(CollectorRegistry()))
        await manager.load_all()
        batcher = manager.get("m").scheduler
        assert batcher is not None
        try:
            await scenario(Held(batcher))
        finally:
            await manager.close(5)

    asyncio.run(main())


@pytest.mark.parametrize("scheduler", ["deadline", "fifo"])
def test_earliest_deadline_first_and_no_deadline_last(tmp_path: Path, scheduler: str):
    async def scenario(h: Held) -> None:
        first = await h.hold()
        now = time.perf_counter_ns()
        calls = [
            h.submit(1),  # no deadline
            h.submit(2, deadline_ns=now + 30 * SECOND_NS),
            h.submit(3),
            h.submit(4, deadline_ns=now + 10 * SECOND_NS),
            h.submit(5, deadline_ns=now + 20 * SECOND_NS),
        ]
        await asyncio.sleep(0)  # every submit has queued its request
        h.release()
        await asyncio.gather(first, *calls)
        # The scheduler off (fifo): arrival order, as Triton.
        assert h.order() == ([4, 5, 2, 1, 3] if scheduler == "deadline" else [1, 2, 3, 4, 5])

    _run(tmp_path, "", scenario, scheduler=scheduler)


def test_priority_levels_come_before_deadlines(tmp_path: Path):
    levels = "priority_levels: 3 default_priority_level: 2"

    async def scenario(h: Held) -> None:
        first = await h.hold()
        soon = time.perf_counter_ns() + 10 * SECOND_NS
        calls = [
            h.submit(1, priority=3, deadline_ns=soon),
            h.submit(2, priority=2),
            h.submit(3),  # the default level, 2
            h.submit(4, priority=1),
            h.submit(5, priority=0),  # 0 and past the last level: the default, as in Triton
            h.submit(6, priority=9),
            h.submit(7, priority=2, deadline_ns=soon + SECOND_NS),
        ]
        await asyncio.sleep(0)  # every submit has queued its request
        h.release()
        await asyncio.gather(first, *calls)
        assert h.order() == [4, 7, 2, 3, 5, 6, 1]

    _run(tmp_path, levels, scenario)


def test_a_shadow_copy_waits_behind_every_primary(tmp_path: Path):
    async def scenario(h: Held) -> None:
        first = await h.hold()
        soon = time.perf_counter_ns() + 10 * SECOND_NS
        calls = [h.submit(1, shadow=True, deadline_ns=soon), h.submit(2, shadow=True), h.submit(3), h.submit(4)]
        await asyncio.sleep(0)  # every submit has queued its request
        h.release()
        await asyncio.gather(first, *calls)
        assert h.order() == [3, 4, 1, 2]

    _run(tmp_path, "priority_levels: 2 default_priority_level: 2", scenario)


def test_a_full_queue_sheds_the_newest_of_a_lower_level_for_a_higher_one(tmp_path: Path):
    async def scenario(h: Held) -> None:
        first = await h.hold()
        low = [h.submit(i, priority=2) for i in (1, 2)]
        await asyncio.sleep(0.01)
        high = h.submit(3, priority=1)
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as shed:
            await low[1]
        assert shed.value.reason == "priority"
        with pytest.raises(Overloaded) as full:  # nothing below level 2 to shed: refused
            await h.submit(4, priority=2)
        assert full.value.reason == "queue_full"
        h.release()
        await asyncio.gather(first, low[0], high)
        assert h.order() == [3, 1]

    _run(tmp_path, "priority_levels: 2 default_priority_level: 2 default_queue_policy { max_queue_size: 2 }",
         scenario)


def test_a_delay_timeout_sets_a_request_behind_its_level(tmp_path: Path):
    policy = ("priority_levels: 1 default_priority_level: 1 priority_queue_policy { key: 1 value: "
              "{ timeout_action: DELAY default_timeout_microseconds: 20000 allow_timeout_override: false } }")

    async def scenario(h: Held) -> None:
        first = await h.hold()
        delayed = h.submit(1)
        await asyncio.sleep(0.2)  # its 20 ms timeout passed while queued: DELAY, not refused
        assert not delayed.done()
        fresh = h.submit(2)
        await asyncio.sleep(0)  # queued before the instance is let go
        h.release()
        await asyncio.gather(first, delayed, fresh)
        assert h.order() == [2, 1]

    _run(tmp_path, policy, scenario)


def test_a_request_late_when_an_instance_frees_is_refused_not_computed(tmp_path: Path):
    """The loop is blocked past the request's deadline (its timer cannot fire): the instance,
    freed, takes it, finds it late and hands it back refused, without running it."""

    async def scenario(h: Held) -> None:
        first = await h.hold()
        late = h.submit(1, deadline_ns=time.perf_counter_ns() + 100_000_000)
        on_time = h.submit(2, deadline_ns=time.perf_counter_ns() + 30 * SECOND_NS)
        await asyncio.sleep(0)  # both queued
        time.sleep(0.15)  # the loop is blocked past the first one's deadline: no timer fires
        h.release()
        time.sleep(0.3)  # still blocked; meanwhile the instance takes both
        await first
        with pytest.raises(Overloaded) as refused:
            await late
        assert refused.value.reason == "deadline"
        await on_time
        assert h.order() == [2]

    _run(tmp_path, "", scenario)


def test_a_queued_request_is_refused_at_its_last_start(tmp_path: Path):
    async def scenario(h: Held) -> None:
        first = await h.hold()
        waiting = h.submit(1, deadline_ns=time.perf_counter_ns() + 50_000_000)
        with pytest.raises(Overloaded) as refused:
            await asyncio.wait_for(waiting, 10)  # refused while the instance is still held
        assert refused.value.reason == "deadline"
        assert "deadline" in refused.value.message
        h.release()
        await first
        assert h.order() == []

    _run(tmp_path, "", scenario)


def test_a_request_the_next_batch_cannot_serve_in_time_is_refused_before_this_one_runs(tmp_path: Path):
    """Both requests were admitted before the version had a fit; then it learns that one row
    takes 4 s. The instance takes the first (due at 6 s, on time); the second (due at 7 s) can
    only start once that one has run, at 4 s, and would end at 8 s: it is refused right then,
    before the first one's run, not at its last start or after the run. (The held run's own
    execution may be learned before the take or after: either way the numbers hold.)"""

    async def scenario(h: Held) -> None:
        first = await h.hold()
        now = time.perf_counter_ns()
        on_time = h.submit(1, deadline_ns=now + 6 * SECOND_NS)
        hopeless = h.submit(2, deadline_ns=now + 7 * SECOND_NS)
        await asyncio.sleep(0)  # both queued, admitted: the version has no fit yet
        for _ in range(20):
            h.batcher.planner.exec_model.observe(1, 4 * SECOND_NS)
        h.release_second.clear()
        h.release()
        assert await asyncio.to_thread(h.second_running.wait, 30)  # the first one's run began
        await asyncio.sleep(0)  # the refusal, handed back before that run, has reached the caller
        assert hopeless.done()
        with pytest.raises(Overloaded) as refused:
            await hopeless
        assert refused.value.reason == "deadline"
        h.release_second.set()
        await asyncio.gather(first, on_time)
        assert h.order() == [1]

    _run(tmp_path, "", scenario)
