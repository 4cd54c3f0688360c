"""Model control under ``--workers N``: a load, unload, pin or rollback reaches every worker.

The control state of every model an operator changed lives in a table the workers share
(:mod:`~onnxgate.core.shared_table`, ``<the supervisor's statistics directory>/models``); per
model, ``{"loaded": true, "override": the config override it serves with (a pin), or null}`` or
``{"loaded": false}``. The worker that takes a call makes the change itself first, so a load that
fails changes nothing anywhere; then, holding the table's lock, it writes the model's new state
over the table as the other workers left it. A pin or a rollback is written as what it did (a
load pinned to a version): every worker serves the same version, whatever its own history.

Every worker looks for a newer table every ``POLL_S`` and makes its models match it: it loads a
model the table says loaded (with its override) and unloads one it says unloaded, each through
the manager, so requests keep being answered while versions swap. A worker remembers what it
could not take up (and why, in its report) and tries again only when the table's state for that
model changes. A worker that starts (or restarts) takes the table up before it listens. The call
is answered once every worker has taken it up (at most :data:`WAIT_S`), with the failure of any
worker that could not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import json_format

from onnxgate.core import shared_table
from onnxgate.core.serving.manager import ModelEntry, ModelManager
from onnxgate.core.shared_table import SharedTable
from onnxgate.errors import GatewayError, ModelLoadError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

WAIT_S = 120.0  # how long a call waits for every worker to take it up (they load the model too)

T = TypeVar("T")


def check_loaded(name: str, entry: ModelEntry) -> None:
    """Raise ModelLoadError unless the latest load of ``name`` left every version it planned ready."""
    if entry.last_failures or not entry.ready_versions():
        reasons = entry.last_failures or {0: entry.reason or "no version is ready"}
        detail = "; ".join(f"version {v}: {r}" if v else r for v, r in sorted(reasons.items()))
        raise ModelLoadError(f"failed to load model '{name}': {detail}")


class ModelControlShare:
    """One worker's side of the shared model control state (module docstring)."""

    def __init__(self, manager: ModelManager, table: SharedTable) -> None:
        self.manager = manager
        self.table = table
        self.generation = 0  # of the shared table this worker has taken up
        self._entries: dict[str, Any] = {}  # the table's entries at that generation
        self._failed: dict[str, tuple[Any, str]] = {}  # model: (state it could not take up, why)
        self._changing = asyncio.Lock()  # one change (or catch-up) at a time in this process

    def state_of(self, name: str) -> dict[str, Any]:
        """What this worker serves of ``name``, in the table's form."""
        entry = self.manager.models.get(name)
        if entry is None or not entry.versions:
            return {"loaded": False}
        override = entry.override
        doc = json_format.MessageToDict(override, preserving_proto_field_name=True) if override is not None else None
        return {"loaded": True, "override": doc}

    async def start(self) -> None:
        """Take up the table (after the repository's models are loaded, before listening)."""
        await asyncio.to_thread(self.table.open_lock)
        await self.catch_up()

    async def follow(self) -> None:
        """:meth:`catch_up` every ``POLL_S``, until cancelled."""
        while True:
            await self.catch_up()
            await asyncio.sleep(shared_table.POLL_S)

    async def catch_up(self) -> None:
        """Take up the table if another worker changed it (what fails is logged and reported)."""
        try:
            async with self._changing:
                found = await asyncio.to_thread(self.table.newer, self.generation)
                if found is not None:
                    await self._take_up(*found)
        except Exception:
            log.exception("models: the workers' shared control state could not be taken up")

    async def change(self, name: str, action: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``action`` (this worker's load or unload of ``name``), then make every worker match
        what it did; its result, once every worker has (ModelLoadError naming those that failed)."""
        async with self._changing:
            result = await action()  # refused or failed: nothing is published
            state = self.state_of(name)
            await shared_table.lock(self.table)
            try:  # no other worker changes the table until it is unlocked
                found = await asyncio.to_thread(self.table.newer, self.generation)
                generation, entries = found if found is not None else (self.generation, self._entries)
                if not isinstance(entries, dict):
                    entries = {}  # unusable (another build's): replaced
                entries = {**entries, name: state}
            except BaseException:
                self.table.unlock()
                raise
            await shared_table.write_and_unlock(self.table, generation + 1, entries, what)
            await self._take_up(generation + 1, entries)  # the other workers' changes meanwhile
        reports = await shared_table.wait_served(self.table, generation + 1, WAIT_S)
        failed = [(i, doc["failed"][name]) for i, doc in enumerate(reports)
                  if doc is not None and doc.get("generation", 0) >= generation + 1
                  and isinstance(doc.get("failed"), dict) and name in doc["failed"]]
        if failed:
            detail = "; ".join(f"worker {i}: {reason}" for i, reason in failed)
            raise ModelLoadError(f"{what} took effect on worker {self.table.index} but failed on {detail}")
        return result

    async def _take_up(self, generation: int, entries: Any) -> None:
        if not isinstance(entries, dict):
            log.error("models: generation %d of the workers' shared control state is unusable, not taken up",
                      generation)
            entries = {}
        for name, state in entries.items():
            if self.state_of(name) == state:
                self._failed.pop(name, None)
                continue
            if (failed := self._failed.get(name)) is not None and failed[0] == state:
                continue  # failed already: again when the state changes
            try:
                await self._apply(name, state)
            except Exception as exc:  # a GatewayError, or a state another build wrote
                reason = exc.message if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
                log.error("models: could not take up %s of model %s from the workers' share: %s", state, name, reason)
                self._failed[name] = (state, reason)
            else:
                self._failed.pop(name, None)
                log.info("models: took up %s of model %s from the workers' share", state, name)
        self.generation, self._entries = generation, entries
        failed = {name: reason for name, (_, reason) in self._failed.items()}
        await asyncio.to_thread(self.table.applied, generation, failed)

    async def _apply(self, name: str, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("loaded"), bool):
            raise ValueError(f"not a model state: {state!r}")
        if not state["loaded"]:
            if self.manager.models.get(name) is not None:
                await self.manager.unload(name)
            return
        override = None
        if state.get("override") is not None:
            override = json_format.ParseDict(state["override"], mc.ModelConfig())
        check_loaded(name, await self.manager.load(name, override))
