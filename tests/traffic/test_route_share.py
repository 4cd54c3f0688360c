"""The workers' shared route table (``--workers N``), two workers' traffic control planes in one
process on one share directory: what each change on either worker lands as, on both."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from onnxgate.core.metrics import Metrics
from onnxgate.core.shared_table import SharedTable, write_json
from onnxgate.core.traffic.control import TrafficControl
from onnxgate.core.traffic.routes import Route, parse_route

KNOWN = {"a": {1}, "b": {1}}


def _put(name: str, target: str):
    def edit(routes: tuple[Route, ...]) -> list[Route]:
        return [*(r for r in routes if r.name != name), parse_route({"name": name, "split": target})]

    return edit


async def _workers(directory: Path, count: int = 2) -> tuple[list[TrafficControl], list[asyncio.Task]]:
    controls = []
    for i in range(count):
        control = TrafficControl(Metrics(CollectorRegistry()), lambda: KNOWN, lambda what: None)
        control.set(())
        await control.share_routes(SharedTable(directory, i, count))
        controls.append(control)
    return controls, [asyncio.create_task(c.follow()) for c in controls]


def test_changes_made_at_once_on_two_workers_all_land_on_both(tmp_path: Path):
    asyncio.run(_changes_made_at_once(tmp_path))


async def _changes_made_at_once(tmp_path: Path) -> None:
    controls, followers = await _workers(tmp_path)
    try:
        names = [f"r{i}" for i in range(12)]
        # each worker's changes queue behind one another; the two workers' race for the table
        await asyncio.gather(*(controls[i % 2].change(_put(n, "ab"[i % 3 == 0]), f"PUT /v2/routes/{n}")
                               for i, n in enumerate(names)))
        for control in controls:
            await control.catch_up()
        tables = [{r.name: str(r.primary) for r in c.configured} for c in controls]
        assert tables[0] == tables[1] == {n: "ab"[i % 3 == 0] for i, n in enumerate(names)}
        assert controls[0].generation == controls[1].generation == len(names)
    finally:
        for task in followers:
            task.cancel()


def test_a_change_refused_under_the_lock_leaves_the_table_to_the_other_worker(tmp_path: Path):
    asyncio.run(_a_change_refused(tmp_path))


async def _a_change_refused(tmp_path: Path) -> None:
    controls, followers = await _workers(tmp_path)
    try:
        refused = controls[0].change(_put("bad", "missing"), "PUT /v2/routes/bad")
        results = await asyncio.gather(refused, controls[1].change(_put("good", "a"), "PUT /v2/routes/good"),
                                       return_exceptions=True)
        assert type(results[0]).__name__ == "InvalidInput" and results[1] is None, results
        await controls[0].catch_up()
        assert [r.name for r in controls[0].configured] == [r.name for r in controls[1].configured] == ["good"]
    finally:
        for task in followers:
            task.cancel()


def test_an_unusable_shared_table_is_logged_once_and_replaced_by_the_next_change(tmp_path: Path, caplog):
    asyncio.run(_an_unusable_table(tmp_path, caplog))


async def _an_unusable_table(tmp_path: Path, caplog) -> None:
    controls, followers = await _workers(tmp_path)
    try:
        await controls[0].change(_put("r", "a"), "PUT /v2/routes/r")
        table = {"generation": 7, "entries": [{"name": "r", "split": "a", "colour": "red"}]}  # another build's
        write_json(tmp_path / "table.json", table)
        for _ in range(3):
            for control in controls:
                await control.catch_up()
        unusable = [r for r in caplog.records if "unusable" in r.getMessage()]
        assert len(unusable) == 2, unusable  # once per worker, not at every look
        assert [str(r.primary) for r in controls[1].configured] == ["a"]  # still serving what it served
        await controls[1].change(_put("s", "b"), "PUT /v2/routes/s")
        await controls[0].catch_up()
        assert controls[0].generation == controls[1].generation == 8
        assert [r.name for r in controls[0].configured] == [r.name for r in controls[1].configured] == ["r", "s"]
    finally:
        for task in followers:
            task.cancel()
