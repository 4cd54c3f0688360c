"""A table every worker of ``--workers N`` serves, whichever worker was asked to change it.

The routes (:mod:`~onnxgate.core.traffic.control`) and the models' control state
(:mod:`~onnxgate.core.serving.control_share`) each live in one directory the workers share
(under the supervisor's statistics directory)::

    table.json      {"generation": n, "entries": ..., "what": "PUT /v2/routes/r", "worker": i, ...}
    .lock           held (``flock``) while a worker catches up with table.json and writes it
    applied-<i>     the generation worker ``i`` serves, written once it serves it (and what failed)

Generation 0 is what every worker starts with (the config file, the repository); table.json
appears with the first change. The worker that takes a change, holding the lock, catches up with
table.json, checks the change against it and writes generation n+1 (:func:`locked`,
:func:`write_and_unlock`): no other worker can change the table in between, so changes made at
once on different workers are made one after the other, each checked against the one before. It
then serves it, and waits until every worker says it serves n+1 (:func:`wait_served`), so once a
change is answered every worker serves it. Every worker looks at table.json every
:data:`POLL_S`; a worker that starts (or restarts) takes it up before it listens. Readers take
no lock.

Files are written whole and renamed into place; a reader never sees half of one. The methods of
:class:`SharedTable` but :meth:`~SharedTable.try_lock` and :meth:`~SharedTable.unlock` block:
call them in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from onnxgate.errors import Unavailable

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a worker looks for a newer table
LOCK_WAIT_S = 10.0  # how long a change waits for other workers' changes (each holds the lock for ms)
_LOCK_POLL_S = 0.005


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` whole: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(doc))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None (logged) when it cannot be read or is not one."""
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("%s unreadable: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


class SharedTable:
    """One worker's side of a shared table (module docstring)."""

    def __init__(self, directory: str | Path, index: int, count: int) -> None:
        self.directory = Path(directory)
        self.index, self.count = index, count
        self._table = self.directory / "table.json"
        self._seen: tuple[int, int, int, int] | None = None  # table.json's (inode, mtime_ns, size, generation)
        self._lock_fd: int | None = None  # .lock, opened by open_lock in the worker's own process
        self._held = False  # this process holds the lock (a change, or the write of a cancelled one)
        self._writing = False  # a write_unlocking runs: the lock is its to release

    def newer(self, generation: int) -> tuple[int, Any] | None:
        """The table when its generation is above ``generation``: (generation, entries); None
        when it is not (or no change was ever published)."""
        try:
            st = self._table.stat()
        except FileNotFoundError:
            return None
        seen, key = self._seen, (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen is not None and seen[:3] == key and seen[3] <= generation:
            return None  # unchanged since it was last read (cheap: one stat every POLL_S)
        doc = read_json(self._table)
        if doc is None or "entries" not in doc or not isinstance(doc.get("generation"), int):
            if doc is not None:  # (read_json logged why it could not read it)
                log.warning("%s holds no generation and entries: not taken up; the next change replaces it",
                            self._table)
            self._seen = (*key, -1)  # looked at once, not at every look
            return None
        found = doc["generation"]
        self._seen = (*key, found)
        return (found, doc["entries"]) if found > generation else None

    def open_lock(self) -> None:
        """Open the lock file, in the worker's own process (a descriptor inherited across a fork
        would share its lock with the parent's)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_lock(self) -> bool:
        """Take the lock if no one holds it: no other worker, and no change of this process (a
        descriptor's own ``flock`` never blocks itself, so that is remembered here: a cancelled
        change's write may still hold it). One system call on an open descriptor, which never
        waits: callable on the event loop."""
        if self._lock_fd is None:
            raise RuntimeError("SharedTable.open_lock was not called")
        if self._held:
            return False
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._held = True
        return True

    def unlock(self) -> None:
        """Let the other workers (and this process's next change) change the table."""
        if self._lock_fd is not None and self._held:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._held = False

    def write_unlocking(self, generation: int, entries: Any, what: str) -> None:
        """:meth:`write`, then :meth:`unlock` whatever happens (in the same thread, after the file is in place)."""
        try:
            self.write(generation, entries, what)
        finally:
            self._writing = False  # first: a change that takes the lock next may start a write of its own
            self.unlock()

    def write(self, generation: int, entries: Any, what: str) -> None:
        """Write ``entries`` as ``generation``, holding the lock, having caught up with the one
        before it (a table that cannot be read is replaced)."""
        current = read_json(self._table) if self._table.exists() else {"generation": 0}
        found = current.get("generation", 0) if current is not None else None
        if isinstance(found, int) and found >= generation:
            raise RuntimeError(f"the shared table {self.directory} is at generation {found}, not below {generation}")
        write_json(self._table, {"generation": generation, "entries": entries, "what": what,
                                 "worker": self.index, "time": time.time()})

    def applied(self, generation: int, failed: dict[str, str] | None = None) -> None:
        """This worker serves ``generation`` now (``failed``: what of it it could not take up, and why)."""
        write_json(self.directory / f"applied-{self.index}",
                   {"generation": generation, "pid": os.getpid(), "failed": failed or {}})

    def reports(self) -> list[dict[str, Any] | None]:
        """Every worker's last ``applied`` record (None: none yet)."""
        out = []
        for i in range(self.count):
            path = self.directory / f"applied-{i}"
            out.append(read_json(path) if path.exists() else None)
        return out

    def lagging(self, generation: int) -> list[int]:
        """The workers that do not say they serve ``generation`` (or a later one) yet."""
        out = []
        for i, doc in enumerate(self.reports()):
            served = doc.get("generation") if doc is not None else 0
            if not isinstance(served, int) or served < generation:
                out.append(i)
        return out


@contextlib.asynccontextmanager
async def locked(table: SharedTable, wait_s: float = LOCK_WAIT_S) -> AsyncIterator[None]:
    """``async with locked(table):`` around catching up, checking and :func:`write_and_unlock`:
    the workers' lock on ``table`` (waiting while another worker changes it, at most ``wait_s``:
    then Unavailable), released at the end of the block, however it ends, unless a write started
    in it still runs (that write releases it once the file is in place)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not table.try_lock():
        if loop.time() > deadline:
            raise Unavailable(f"another worker has held the lock of {table.directory.name} for over {wait_s:g} s; "
                              "retry")
        await asyncio.sleep(_LOCK_POLL_S)
    try:
        yield
    finally:
        if not table._writing:
            table.unlock()


async def write_and_unlock(table: SharedTable, generation: int, entries: Any, what: str) -> None:
    """Write ``generation`` (in :func:`locked`) and unlock once the write ended, not before it,
    even if the caller is cancelled meanwhile (its process then takes it up at its next look)."""
    table._writing = True
    write = asyncio.ensure_future(asyncio.to_thread(table.write_unlocking, generation, entries, what))
    await asyncio.shield(write)


async def wait_served(table: SharedTable, generation: int, timeout: float) -> list[dict[str, Any] | None]:
    """Wait until every worker serves ``generation`` (at most ``timeout``; a worker still behind
    then takes it up when it next looks, or when it restarts); every worker's report, by index."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while behind := await asyncio.to_thread(table.lagging, generation):
        if loop.time() > deadline:
            log.warning("%s: generation %d is not served yet by worker(s) %s after %.1f s; they take it up when "
                        "they next look (or when they restart)", table.directory.name, generation, behind, timeout)
            break
        await asyncio.sleep(POLL_S / 4)
    return await asyncio.to_thread(table.reports)
