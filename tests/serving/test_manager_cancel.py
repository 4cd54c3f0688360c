"""A load that is cancelled while it runs (its client gone, a deadline) changes nothing: not the
versions that serve, not the override the manager remembers for later polls."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

import modelzoo
from onnxgate.core.metrics import Metrics
from onnxgate.core.registry.local import Repository
from onnxgate.core.serving.manager import ModelManager, pin_config
from onnxgate.core.serving.model import LoadOptions


def test_a_cancelled_pinning_load_leaves_no_override(tmp_path: Path):
    repo = tmp_path / "repo"
    for version in (1, 2):
        modelzoo.build_scaled(repo, "m", version=version, scale=float(version))
    modelzoo.write_config(repo / "m", "version_policy: { all { } }\n")

    async def scenario() -> None:
        manager = ModelManager(Repository(repo), LoadOptions(), Metrics(CollectorRegistry()))
        await manager.load_all()
        assert sorted(v.version for v in manager.models["m"].ready_versions()) == [1, 2]
        started, release = threading.Event(), threading.Event()
        plan = manager._plan_and_load

        def slow_plan(*args):  # the blocking load runs until the test lets it go
            started.set()
            release.wait(30)
            return plan(*args)

        manager._plan_and_load = slow_plan
        load = asyncio.ensure_future(manager.load("m", pin_config(1)))
        assert await asyncio.to_thread(started.wait, 30)
        load.cancel()
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        entry = manager.models["m"]
        assert entry.override is None, "a cancelled load must not be remembered for the next poll"
        assert sorted(v.version for v in entry.ready_versions()) == [1, 2]
        await manager.close(5)

    asyncio.run(scenario())
