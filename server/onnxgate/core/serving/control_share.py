"""Model control under ``--workers N``: a load, unload, pin or rollback reaches every worker.

The control state of every model an operator changed lives in a table the workers share
(:mod:`~onnxgate.core.shared_table`, ``<the supervisor's statistics directory>/models``); per
model, ``{"loaded": true, "override": the config override it serves with (a pin), or null,
"serial": the generation of the change, "history": the versions that served}`` or
``{"loaded": false, ...}``. The worker that takes a call holds the table's lock from before it
acts until the table is written: it takes up what the other workers changed, makes the change
itself (one it refuses or fails changes nothing anywhere), and writes the model's new state over
the table. Calls on different workers are so made one after the other; a pin or a rollback is
written as what it did (a load pinned to a version), so every worker serves the same version.

Every worker looks for a newer table every ``POLL_S`` and takes up each change it has not taken
up yet (by its serial): it loads a model the table says loaded (with its override: a load
without one also picks up new files, as on the worker that took it) and unloads one it says
unloaded, through the manager, so requests keep being answered while versions swap, and adopts
the history of the worker that took the change (a rollback then goes back to the same version
whichever worker takes it). What it could not take up is in its report, with why, until a later
change of that model. A worker that starts (or restarts) takes the table up before it listens,
skipping what it serves already.

The call is answered once every worker has taken it up. A worker that could not, or did not
within :data:`WAIT_S`, is named in a 503 (the change stands where it was taken up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format

from onnxgate.core import shared_table
from onnxgate.core.serving.manager import ModelEntry, ModelManager
from onnxgate.core.shared_table import SharedTable
from onnxgate.errors import GatewayError, ModelLoadError, Unavailable
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

WAIT_S = 50.0  # how long a call waits for the lock and then for every worker (under clients' 60 s)


def check_loaded(name: str, entry: ModelEntry) -> None:
    """Raise ModelLoadError unless the latest load of ``name`` left every version it planned ready."""
    if entry.last_failures or not entry.ready_versions():
        reasons = entry.last_failures or {0: entry.reason or "no version is ready"}
        detail = "; ".join(f"version {v}: {r}" if v else r for v, r in sorted(reasons.items()))
        raise ModelLoadError(f"failed to load model '{name}': {detail}")


class ModelControlShare:
    """One worker's side of the shared model control state (module docstring)."""

    def __init__(self, manager: ModelManager, table: SharedTable, prune: bool = False) -> None:
        self.manager = manager
        self.table = table
        self.prune = prune  # poll mode: a model that left the repository leaves the table (_prune)
        self.generation = 0  # of the shared table this worker has taken up
        self._entries: dict[str, Any] = {}  # the table's entries at that generation
        self._taken: dict[str, Any] = {}  # model: the serial of the change taken up last (or failed)
        self._failed: dict[str, str] = {}  # model: why its latest change could not be taken up
        self._changing = asyncio.Lock()  # one change (or catch-up) at a time in this process
        self._background: set[asyncio.Task] = set()

    def state_of(self, name: str) -> dict[str, Any]:
        """What this worker serves of ``name``, in the table's form (without the serial)."""
        entry = self.manager.models.get(name)
        if entry is None or not entry.versions:
            return {"loaded": False}
        override = entry.override
        doc = json_format.MessageToDict(override, preserving_proto_field_name=True) if override is not None else None
        return {"loaded": True, "override": doc}

    async def start(self) -> None:
        """Take up the table (after the repository's models are loaded, before listening)."""
        await asyncio.to_thread(self.table.open_lock)
        await self.catch_up(starting=True)

    async def follow(self) -> None:
        """:meth:`catch_up` every ``POLL_S``, until cancelled."""
        while True:
            await self.catch_up()
            if self.prune and any(name not in self.manager.models for name in self._entries):
                await self._prune()
            await asyncio.sleep(shared_table.POLL_S)

    async def _prune(self) -> None:
        """Poll mode: drop the state of models the poller forgot (they left the repository), as
        one worker alone forgets an operator's unload or pin then; a model that comes back is the
        repository's again, also on a worker that restarts."""
        try:
            async with self._changing:
                async with shared_table.locked(self.table):
                    await self._catch_up()
                    gone = sorted(name for name in self._entries if name not in self.manager.models)
                    if not gone:  # another worker dropped them first
                        return
                    entries = {n: state for n, state in self._entries.items() if n not in gone}
                    generation = self.generation + 1
                    await shared_table.write_and_unlock(self.table, generation, entries,
                                                        f"left the repository: {', '.join(gone)}")
                await self._record(generation, entries)
                log.info("models: %s left the repository; dropped from the workers' shared control state", gone)
        except Exception:
            log.exception("models: the workers' shared control state could not be pruned")

    async def catch_up(self, starting: bool = False) -> None:
        """Take up the table if another worker changed it (what fails is logged and reported)."""
        try:
            async with self._changing:
                await self._catch_up(starting)
        except Exception:
            log.exception("models: the workers' shared control state could not be taken up")

    async def change(self, name: str, action: Callable[[], Awaitable[None]], what: str) -> None:
        """Run ``action`` (this worker's load or unload of ``name``) and make every worker match
        what it did; returns once every worker has (Unavailable naming those that did not). A
        caller gone meanwhile does not stop it: what was done here is published all the same."""
        task = asyncio.ensure_future(self._change(name, action, what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieve)
        generation = await asyncio.shield(task)
        reports = await shared_table.wait_served(self.table, generation, WAIT_S)
        behind = []
        for i, doc in enumerate(reports):
            if doc is None or not isinstance(doc.get("generation"), int) or doc["generation"] < generation:
                behind.append(f"worker {i}: not taken up within {WAIT_S:g} s (it takes it up when it can)")
            elif isinstance(doc.get("failed"), dict) and name in doc["failed"]:
                behind.append(f"worker {i}: {doc['failed'][name]}")
        if behind:
            raise Unavailable(f"{what} took effect on worker {self.table.index} but not on every worker: "
                              + "; ".join(behind))

    async def _change(self, name: str, action: Callable[[], Awaitable[None]], what: str) -> int:
        async with self._changing:
            async with shared_table.locked(self.table, WAIT_S):  # no other worker changes the table (or acts)
                await self._catch_up()
                await action()  # refused or failed: nothing is published
                generation = self.generation + 1
                entries = {**self._entries, name: {**self.state_of(name), "serial": generation,
                                                   "history": self._history(name)}}
                await shared_table.write_and_unlock(self.table, generation, entries, what)
            self._taken[name] = generation
            self._failed.pop(name, None)
            await self._record(generation, entries)
            return generation

    async def _catch_up(self, starting: bool = False) -> None:
        found = await asyncio.to_thread(self.table.newer, self.generation)
        if found is None:
            return
        generation, entries = found
        if not isinstance(entries, dict):
            log.error("models: generation %d of the workers' shared control state is unusable, not taken up",
                      generation)
            entries = {}
        for name, state in entries.items():
            serial = state.get("serial") if isinstance(state, dict) else None
            if name in self._taken and self._taken[name] == serial:
                continue  # taken up (or failed) already
            self._taken[name] = serial
            if not (starting and isinstance(state, dict) and self.state_of(name) == _served(state)):
                await self._take_up(name, state)
            # a rollback goes back along the history of the worker that took the last change
            entry, history = self.manager.models.get(name), state.get("history") if isinstance(state, dict) else None
            if entry is not None and isinstance(history, list) and all(type(v) is int for v in history):
                entry.history = history[-16:]
        await self._record(generation, entries)

    async def _take_up(self, name: str, state: Any) -> None:
        try:
            await self._apply(name, state)
        except Exception as exc:  # a GatewayError, or a state another build wrote
            reason = exc.message if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
            log.error("models: could not take up %s of model %s from the workers' share: %s", state, name, reason)
            self._failed[name] = reason
        else:
            self._failed.pop(name, None)
            log.info("models: took up %s of model %s from the workers' share", state, name)

    def _history(self, name: str) -> list[int]:
        entry = self.manager.models.get(name)
        return list(entry.history) if entry is not None else []

    async def _record(self, generation: int, entries: dict[str, Any]) -> None:
        self.generation, self._entries = generation, entries
        await asyncio.to_thread(self.table.applied, generation, dict(self._failed))

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


def _served(state: dict[str, Any]) -> dict[str, Any]:
    """A table state as :meth:`ModelControlShare.state_of` gives it (what serves, not the change)."""
    return {k: v for k, v in state.items() if k not in ("serial", "history")}


def _retrieve(task: asyncio.Task) -> None:
    """A change whose caller is gone: its failure is logged, not left unretrieved."""
    if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, GatewayError):
        log.error("models: a control change failed", exc_info=exc)
