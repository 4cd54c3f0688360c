"""The workers' shared route table (``--workers N``), two workers' traffic control planes in one
process on one share directory: what each change on either worker lands as, on both."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from onnxgate.core.metrics import Metrics
from onnxgate.core.shared_table import SharedTable
from onnxgate.core.traffic.control import TrafficControl
from onnxgate.core.traffic.routes import Route, parse_route
from workers_helpers import following

KNOWN = {"a": {1}, "b": {1}}


def _put(name: str, target: str):
    def edit(routes: tuple[Route, ...]) -> list[Route]:
        return [*(r for r in routes if r.name != name), parse_route({"name": name, "split": target})]

    return edit


async def _workers(directory: Path, count: int = 2) -> list[TrafficControl]:
    controls = []
    for i in range(count):
        control = TrafficControl(Metrics(CollectorRegistry()), lambda: KNOWN, lambda what: None)
        control.set(())
        await control.share_routes(SharedTable(directory, i, count))
        controls.append(control)
    return controls


def test_changes_made_at_once_on_two_workers_all_land_on_both(tmp_path: Path):
    asyncio.run(_changes_made_at_once(tmp_path))


async def _changes_made_at_once(tmp_path: Path) -> None:
    controls = await _workers(tmp_path)
    async with following(*controls):
        names = [f"r{i}" for i in range(12)]
        # each worker's changes queue behind one another; the two workers' race for the table
        await asyncio.gather(*(controls[i % 2].change(_put(n, "ab"[i % 3 == 0]), f"PUT /v2/routes/{n}")
                               for i, n in enumerate(names)))
        for control in controls:
            await control.catch_up()
        tables = [{r.name: str(r.primary) for r in c.configured} for c in controls]
        assert tables[0] == tables[1] == {n: "ab"[i % 3 == 0] for i, n in enumerate(names)}
        assert controls[0].generation == controls[1].generation == len(names)


def test_a_change_refused_under_the_lock_leaves_the_table_to_the_other_worker(tmp_path: Path):
    asyncio.run(_a_change_refused(tmp_path))


async def _a_change_refused(tmp_path: Path) -> None:
    controls = await _workers(tmp_path)
    async with following(*controls):
        refused = controls[0].change(_put("bad", "missing"), "PUT /v2/routes/bad")
        results = await asyncio.gather(refused, controls[1].change(_put("good", "a"), "PUT /v2/routes/good"),
                                       return_exceptions=True)
        assert type(results[0]).__name__ == "InvalidInput" and results[1] is None, results
        await controls[0].catch_up()
        assert [r.name for r in controls[0].configured] == [r.name for r in controls[1].configured] == ["good"]


UNUSABLE = {  # what table.json may hold that no worker can take up; the log lines it is worth, per worker
    "another build's route": (orjson.dumps({"generation": 7, "entries": [{"name": "r", "split": "a", "colour": 1}]}),
                              "unusable", 8),
    "not JSON": (b'{"generation": 7, "entr', "unreadable", 2),
    "no generation": (b'{"generation": "7", "entries": []}', "no generation", 2),
    "deleted": (None, "table.json", 2),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_an_unusable_shared_table_is_logged_once_and_replaced_by_the_next_change(tmp_path: Path, caplog, case):
    asyncio.run(_an_unusable_table(tmp_path, caplog, *UNUSABLE[case]))


async def _an_unusable_table(tmp_path: Path, caplog, content: bytes | None, logged: str, generation: int) -> None:
    controls = await _workers(tmp_path)
    async with following(*controls):
        await controls[0].change(_put("r", "a"), "PUT /v2/routes/r")
        if content is None:
            (tmp_path / "table.json").unlink()
        else:
            (tmp_path / "table.json").write_bytes(content)
        for _ in range(3):
            for control in controls:
                await control.catch_up()
        lines = [r for r in caplog.records if logged in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(lines) == (0 if content is None else 2), lines  # once per worker, not at every look
        assert [str(r.primary) for r in controls[1].configured] == ["a"]  # still serving what it served
        await controls[1].change(_put("s", "b"), "PUT /v2/routes/s")  # not a 500: the change replaces it
        await controls[0].catch_up()
        assert controls[0].generation == controls[1].generation == generation
        assert [r.name for r in controls[0].configured] == [r.name for r in controls[1].configured] == ["r", "s"]


def test_a_change_cancelled_while_it_writes_is_not_overwritten_by_the_next(tmp_path: Path):
    asyncio.run(_a_cancelled_write(tmp_path))


async def _a_cancelled_write(tmp_path: Path) -> None:
    controls = await _workers(tmp_path)
    share = controls[0]._share
    assert share is not None
    write, started, release = share.write, threading.Event(), threading.Event()

    def slow_write(*args) -> None:  # a slow disk: the write runs on after its change is cancelled
        started.set()
        assert release.wait(30)
        write(*args)

    share.write = slow_write  # type: ignore[method-assign]
    async with following(*controls):
        first = asyncio.create_task(controls[0].change(_put("first", "a"), "PUT /v2/routes/first"))
        assert await asyncio.to_thread(started.wait, 30)
        first.cancel()  # a client gone, the drain: the change's task ends, its write does not
        second = asyncio.create_task(controls[0].change(_put("second", "b"), "PUT /v2/routes/second"))
        await asyncio.sleep(0.2)  # the second change is on its way (it must wait for the first's write)
        release.set()
        await second
        for control in controls:
            await control.catch_up()
        assert first.cancelled()
        assert [r.name for r in controls[0].configured] == [r.name for r in controls[1].configured] == [
            "first", "second"]  # taken up by the worker that was cancelled, and kept by the next change
        assert controls[0].generation == controls[1].generation == 2
