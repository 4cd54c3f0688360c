"""Routes under ``--workers N``: one table that every worker serves, whichever worker was asked.

The table lives in one directory the workers share (``<the supervisor's statistics
directory>/routes``)::

    table.json      {"generation": n, "routes": [route documents], "what": "PUT /v2/routes/r", ...}
    .lock           held (``flock``) while a worker compares and writes table.json
    applied-<i>     the generation worker ``i`` serves, written once it serves it

Generation 0 is the config file's routes, which every worker starts with; table.json appears
with the first change. A change (a route PUT or DELETE on any worker, or SIGHUP, which worker 0
alone publishes) is made by the worker that took it, in :class:`~onnxgate.core.traffic.control.
TrafficControl`: holding the lock, it catches up with table.json, checks the change against that
table (validation, rollout conflicts) and writes generation n+1; no other worker can change the
table in between, so concurrent changes on different workers are made one after the other, each
checked against the one before. It then serves it, and waits until every worker says it serves
n+1 (at most :data:`WAIT_S`), so once a change is answered every worker routes by it. Every
worker looks at table.json every :data:`POLL_S`; a worker that starts (or restarts) takes it up
before it listens. Readers take no lock.

Files are written whole and renamed into place; a reader never sees half of one. Every method
but :meth:`RouteShare.try_lock` and :meth:`RouteShare.unlock` blocks: call them in threads.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxgate.core.traffic.rollout_share import read_json, write_json

POLL_S = 0.2  # how often a worker looks for a newer table
WAIT_S = 5.0  # how long a change waits for every worker to serve it


class RouteShare:
    """The shared route table of one worker (module docstring)."""

    def __init__(self, directory: str | Path, index: int, count: int) -> None:
        self.directory = Path(directory)
        self.index, self.count = index, count
        self._table = self.directory / "table.json"
        self._seen: tuple[int, int, int, int] | None = None  # table.json's (inode, mtime_ns, size, generation)
        self._lock_fd: int | None = None  # .lock, opened by open_lock in the worker's own process

    def newer(self, generation: int) -> tuple[int, list[dict[str, Any]]] | None:
        """The shared table when its generation is above ``generation``: (generation, route
        documents); None when it is not (or no change was ever published)."""
        try:
            st = self._table.stat()
        except FileNotFoundError:
            return None
        seen, key = self._seen, (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen is not None and seen[:3] == key and seen[3] <= generation:
            return None  # unchanged since it was last read (cheap: one stat every POLL_S)
        doc = read_json(self._table)
        if doc is None or not isinstance(doc.get("routes"), list) or not isinstance(doc.get("generation"), int):
            return None
        found = doc["generation"]
        self._seen = (*key, found)
        return (found, doc["routes"]) if found > generation else None

    def open_lock(self) -> None:
        """Open the lock file, in the worker's own process (a descriptor inherited across a fork
        would share its lock with the parent's)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_lock(self) -> bool:
        """Take the lock if no other worker holds it (one system call on an open descriptor,
        which never waits: callable on the event loop). The caller's changes are serialized in
        the process already, and a descriptor's own ``flock`` never blocks itself."""
        if self._lock_fd is None:
            raise RuntimeError("RouteShare.open_lock was not called")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        """Let the other workers change the table."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def write(self, generation: int, routes: Sequence[dict[str, Any]], what: str) -> None:
        """Write ``routes`` as ``generation``, holding the lock (:meth:`try_lock`), having caught up
        with the generation before it."""
        current = read_json(self._table) if self._table.exists() else {"generation": 0}
        if current is None or current.get("generation", 0) != generation - 1:
            raise RuntimeError(f"routes: the shared table is not at generation {generation - 1} under the lock")
        write_json(self._table, {"generation": generation, "routes": list(routes), "what": what,
                                 "worker": self.index, "time": time.time()})

    def applied(self, generation: int) -> None:
        """This worker serves ``generation`` now."""
        write_json(self.directory / f"applied-{self.index}", {"generation": generation, "pid": os.getpid()})

    def lagging(self, generation: int) -> list[int]:
        """The workers that do not say they serve ``generation`` (or a later one) yet."""
        out = []
        for i in range(self.count):
            path = self.directory / f"applied-{i}"
            doc = read_json(path) if path.exists() else None
            served = doc.get("generation") if doc is not None else 0
            if not isinstance(served, int) or served < generation:
                out.append(i)
        return out
