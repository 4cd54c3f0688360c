"""Routes under ``--workers N``: one table that every worker serves, whichever worker was asked.

The table lives in one directory the workers share (``<the supervisor's statistics
directory>/routes``)::

    table.json      {"generation": n, "routes": [route documents], "what": "PUT /v2/routes/r", ...}
    .lock           held (``flock``) while a worker compares and writes table.json
    applied-<i>     the generation worker ``i`` serves, written once it serves it

Generation 0 is the config file's routes, which every worker starts with; table.json appears
with the first change. A change (a route PUT or DELETE on any worker, or SIGHUP, which worker 0
alone publishes) is made by the worker that took it, in :class:`~onnxgate.core.traffic.control.
TrafficControl`: it catches up with table.json, checks the change against that table (validation,
rollout conflicts), and writes generation n+1 only if table.json still holds n (compare and swap
under the lock; otherwise it catches up and checks again). It then serves it, and waits until
every worker says it serves n+1 (at most :data:`WAIT_S`), so once a change is answered every
worker routes by it. Every worker looks at table.json every :data:`POLL_S`; a worker that starts
(or restarts) takes it up before it listens.

Files are written whole and renamed into place; a reader never sees half of one. Every method
blocks: call them in threads.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxgate.core.traffic.rollout_share import read_json, write_json

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a worker looks for a newer table
WAIT_S = 5.0  # how long a change waits for every worker to serve it


class RouteShare:
    """The shared route table of one worker (module docstring)."""

    def __init__(self, directory: str | Path, index: int, count: int) -> None:
        self.directory = Path(directory)
        self.index, self.count = index, count
        self._table = self.directory / "table.json"
        self._seen: tuple[int, int, int] | None = None  # table.json's (mtime_ns, size, generation) last read

    def newer(self, generation: int) -> tuple[int, list[dict[str, Any]]] | None:
        """The shared table when its generation is above ``generation``: (generation, route
        documents); None when it is not (or no change was ever published)."""
        try:
            st = self._table.stat()
        except FileNotFoundError:
            return None
        seen = self._seen
        if seen is not None and seen[:2] == (st.st_mtime_ns, st.st_size) and seen[2] <= generation:
            return None  # unchanged since it was last read (cheap: one stat every POLL_S)
        doc = read_json(self._table)
        if doc is None or not isinstance(doc.get("routes"), list) or not isinstance(doc.get("generation"), int):
            return None
        found = doc["generation"]
        self._seen = (st.st_mtime_ns, st.st_size, found)
        return (found, doc["routes"]) if found > generation else None

    def publish(self, expected: int, routes: Sequence[dict[str, Any]], what: str) -> int | None:
        """Write ``routes`` as the next generation if the shared one is still ``expected``: the
        new generation, or None when another worker changed the table first (catch up, retry)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = read_json(self._table) if self._table.exists() else {"generation": 0}
                if current is None or int(current.get("generation", 0)) != expected:
                    return None
                generation = expected + 1
                write_json(self._table, {"generation": generation, "routes": list(routes), "what": what,
                                         "worker": self.index, "time": time.time()})
                return generation
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

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

    def wait_served(self, generation: int, timeout: float = WAIT_S) -> list[int]:
        """Wait until every worker serves ``generation``; the ones that still did not at the end."""
        deadline = time.monotonic() + timeout
        while (behind := self.lagging(generation)) and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
        if behind:
            log.warning("routes: generation %d is not served yet by worker(s) %s after %.1f s; they take it up "
                        "when they next look (or when they restart)", generation, behind, timeout)
        return behind
