"""Model control under ``--workers N`` (core.serving.control_share), two workers' managers in one
process on one share directory: what a change on one worker does on the other, and what the call
answers when the other cannot follow."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import modelzoo
from onnxgate.core.metrics import Metrics
from onnxgate.core.registry.local import Repository
from onnxgate.core.serving import control_share
from onnxgate.core.serving.control_share import ModelControlShare, check_loaded
from onnxgate.core.serving.manager import ModelManager, pin_config
from onnxgate.core.serving.model import LoadOptions
from onnxgate.core.shared_table import SharedTable
from onnxgate.errors import Unavailable
from workers_helpers import following


def _repo(root: Path, versions: tuple[int, ...]) -> Path:
    for version in versions:
        modelzoo.build_scaled(root, "m", version=version, scale=float(version))
    modelzoo.write_config(root / "m", "version_policy: { all { } }\n")
    return root


async def _workers(share: Path, *repos: Path, prune: bool = False) -> list[ModelControlShare]:
    out = []
    for i, repo in enumerate(repos):
        manager = ModelManager(Repository(repo), LoadOptions(cpu_threads=1), Metrics(CollectorRegistry()))
        await manager.load_all()
        control = ModelControlShare(manager, SharedTable(share, i, len(repos)), prune)
        await control.start()
        out.append(control)
    return out


def _ready(control: ModelControlShare) -> list[int]:
    entry = control.manager.models.get("m")
    return sorted(v.version for v in entry.ready_versions()) if entry is not None else []


def _load(control: ModelControlShare):
    async def load() -> None:
        check_loaded("m", await control.manager.load("m"))

    return load


def _pin(control: ModelControlShare, version: int):
    async def load() -> None:
        check_loaded("m", await control.manager.load("m", pin_config(version)))

    return load


def test_a_pin_on_one_worker_is_served_by_the_other_and_by_one_that_starts_later(tmp_path: Path):
    async def scenario() -> None:
        repo = _repo(tmp_path / "repo", (1, 2))
        a, b = await _workers(tmp_path / "share", repo, repo)
        async with following(a, b):
            await a.change("m", _pin(a, 1), "the pin of model 'm'")
            assert _ready(a) == _ready(b) == [1]  # answered once b serves it
            await b.change("m", lambda: b.manager.unload("m"), "the unload of model 'm'")
            assert _ready(a) == _ready(b) == []
            (late,) = await _workers(tmp_path / "share", repo)  # the same index: a restarted worker 0
            assert _ready(late) == []

    asyncio.run(scenario())


def test_a_change_another_worker_cannot_follow_is_refused_naming_it_and_retried_by_the_next_call(
        tmp_path: Path, caplog):
    async def scenario() -> None:
        # worker 1's repository lacks version 2: it cannot serve a pin of it
        a, b = await _workers(tmp_path / "share", _repo(tmp_path / "a", (1, 2)), _repo(tmp_path / "b", (1,)))
        async with following(a, b):
            with pytest.raises(Unavailable) as failure:
                await a.change("m", _pin(a, 2), "the pin of model 'm'")
            message = failure.value.message
            assert "took effect on worker 0 but not on every worker: worker 1: failed to load" in message, message
            assert _ready(a) == [2]
            await asyncio.sleep(1.0)  # five looks of the followers
            tries = [r for r in caplog.records if "could not take up" in r.getMessage()]
            assert len(tries) == 1, tries  # not again at every look
            _repo(tmp_path / "b", (2,))  # worker 1's copy mended: the same call again reaches it
            await a.change("m", _pin(a, 2), "the pin of model 'm'")
            assert _ready(a) == _ready(b) == [2]

    asyncio.run(scenario())


def test_a_load_without_parameters_picks_up_new_files_on_every_worker(tmp_path: Path):
    async def scenario() -> None:
        repo = _repo(tmp_path / "repo", (1,))
        a, b = await _workers(tmp_path / "share", repo, repo)
        async with following(a, b):
            await a.change("m", _load(a), "the load of model 'm'")  # nothing new: the same state
            _repo(repo, (2,))  # a new version's files
            await b.change("m", _load(b), "the load of model 'm'")  # the same state again, a new change
            assert _ready(a) == _ready(b) == [1, 2]

    asyncio.run(scenario())


def test_a_worker_that_does_not_take_a_change_up_in_time_is_named(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(control_share, "WAIT_S", 0.5)

    async def scenario() -> None:
        repo = _repo(tmp_path / "repo", (1, 2))
        a, b = await _workers(tmp_path / "share", repo, repo)
        async with following(a):  # b does not look (a worker busy loading, or stuck)
            with pytest.raises(Unavailable) as failure:
                await a.change("m", _pin(a, 1), "the pin of model 'm'")
            assert "worker 1: not taken up within 0.5 s" in failure.value.message, failure.value.message
            await b.catch_up()  # it takes it up when it can
            assert _ready(a) == _ready(b) == [1]

    asyncio.run(scenario())


def test_a_rollback_goes_back_to_the_same_version_on_a_worker_that_restarted(tmp_path: Path):
    async def scenario() -> None:
        repo = _repo(tmp_path / "repo", (1, 2))
        a, b = await _workers(tmp_path / "share", repo, repo)
        async with following(a, b):
            await a.change("m", _pin(a, 1), "the pin of model 'm'")
            await a.change("m", _load(a), "the load of model 'm'")  # unpinned: version 2 serves again
            (late,) = await _workers(tmp_path / "share", repo)  # a restarted worker 0: it serves that already

            async def rollback() -> None:
                check_loaded("m", await late.manager.rollback("m"))

            async with following(late):
                await late.change("m", rollback, "the rollback of model 'm'")  # its own history began at 2
                await b.catch_up()  # (late's table counts one worker: it does not wait for b)
                assert _ready(late) == _ready(b) == [1]

    asyncio.run(scenario())


def test_poll_mode_a_model_that_leaves_the_repository_leaves_the_table(tmp_path: Path):
    async def scenario() -> None:
        repo = _repo(tmp_path / "repo", (1, 2))
        a, b = await _workers(tmp_path / "share", repo, repo, prune=True)
        async with following(a, b):
            await a.change("m", lambda: a.manager.unload("m"), "the unload of model 'm'")
            for control in (a, b):  # what each worker's poller does when the model's directory goes
                await control.manager.unload("m", "removed from the repository")
                control.manager.forget("m")
            assert await _until(lambda: "m" not in a._entries and "m" not in b._entries)
            # the directory is back: a worker that starts now serves it, as the others' pollers do
            (late,) = await _workers(tmp_path / "share", repo, prune=True)
            assert _ready(late) == [1, 2]

    asyncio.run(scenario())


async def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        await asyncio.sleep(0.02)
    return predicate()
