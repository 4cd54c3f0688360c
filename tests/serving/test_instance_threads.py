"""Each instance thread takes its next batch itself: ONNX Runtime never waits for the event loop
between two executions, and a whole batch is answered with one hand-back to the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

import modelzoo
from onnxgate.core.metrics import Metrics
from onnxgate.core.registry.local import Repository
from onnxgate.core.serving.manager import ModelManager
from onnxgate.core.serving.model import LoadOptions


def test_batches_run_back_to_back_while_the_loop_is_blocked(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "m", scale=2.0)
    modelzoo.write_config(repo / "m", "max_batch_size: 2\ndynamic_batching { }\n")

    async def scenario() -> None:
        manager = ModelManager(Repository(repo), LoadOptions(), Metrics(CollectorRegistry()))
        await manager.load_all()
        ver = manager.get("m")
        model, batcher = ver.model, ver.scheduler
        assert model is not None and batcher is not None and batcher.instances == 1
        first_running, release = threading.Event(), threading.Event()
        executions: list[int] = []
        run = model.run

        def counted(feeds, outputs, instance=0):
            executions.append(len(next(iter(feeds.values()))))
            if len(executions) == 1:
                first_running.set()
                release.wait(30)  # the first batch runs until all others are queued
            return run(feeds, outputs, instance)

        model.run = counted
        x = np.arange(8, dtype=np.float32).reshape(1, -1)[:, : model.inputs["x"].dims[0]]
        calls = [asyncio.ensure_future(batcher.submit({"x": x + i}, 1, ["y"])) for i in range(7)]
        await asyncio.sleep(0)  # all seven queued in one loop iteration: the thread wakes once
        assert await asyncio.to_thread(first_running.wait, 30)
        release.set()
        # The loop now blocks: it can neither form batches nor hand them to the thread. The five
        # rows left still run, one batch after the other.
        deadline = time.monotonic() + 10
        while sum(executions) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executions == [2, 2, 2, 1], executions
        answers = await asyncio.gather(*calls)
        for i, (outputs, _timing) in enumerate(answers):
            np.testing.assert_allclose(outputs[0], 2.0 * (x + i))
        await manager.close(5)

    asyncio.run(scenario())


def test_a_request_is_always_queued_or_taken(tmp_path: Path):
    """Drain's idle test (nothing queued, nothing taken and unanswered) never passes while an
    instance is moving requests out of the queue: the batch is registered as taken before the
    queue empties. Checked at the moment the queue has just been emptied."""
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "m", scale=2.0)

    async def scenario() -> None:
        manager = ModelManager(Repository(repo), LoadOptions(), Metrics(CollectorRegistry()))
        await manager.load_all()
        batcher = manager.get("m").scheduler
        assert batcher is not None
        take = batcher._take
        seen: list[bool] = []

        def watched_take(batch, rows):
            rows = take(batch, rows)
            seen.append(bool(batcher._queue) or any(b is batch for b in batcher._taken.values()))
            return rows

        batcher._take = watched_take
        x = np.ones((1, 4), np.float32)
        answers = await asyncio.gather(*(batcher.submit({"x": x * i}, 1, ["y"]) for i in range(5)))
        for i, (outputs, _) in enumerate(answers):
            np.testing.assert_allclose(outputs[0], 2.0 * x * i)
        assert seen and all(seen), seen
        assert await batcher.drain(5) is True
        await manager.close(5)

    asyncio.run(scenario())
