"""Statistics of every worker of ``onnxgate serve --workers N``, answered by any one of them.

Each worker owns a :class:`SharedStats`: every ``interval_s`` it writes a snapshot of its own
statistics to ``<dir>/<pid>.json`` (taken on the loop, written in a thread, replaced in one
rename) and reads the other workers' snapshots back (in a thread) into a cache. A statistics
answer is the worker's own live counts plus that cache: counts and durations add up, the last
inference is the latest of all. So another worker's requests show up in this worker's answer
within about two intervals; poll, don't expect them at once.

A worker that died leaves its last snapshot behind and it keeps counting, as the supervisor's
Prometheus counters do: totals never go down (the requests of its last interval are lost).
A version appears in an answer when this worker has it; the others' counts for it are added.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from onnxgate.core.serving.stats import INFERENCE_STAT_FIELDS, BatchStats, Duration, VersionStats

log = logging.getLogger(__name__)

_BATCH_FIELDS = ("compute_input", "compute_infer", "compute_output")
_COUNTS = ("inference_count", "execution_count")
Key = tuple[str, int]


# -- one snapshot as plain JSON values ---------------------------------------------------------
def to_doc(s: VersionStats) -> dict:
    """A version's statistics as JSON values (a copy: safe to hand to another thread)."""
    doc: dict = {"name": s.name, "version": s.version, "last_inference_ms": s.last_inference_ms}
    doc.update({k: getattr(s, k) for k in _COUNTS})
    doc.update({k: [getattr(s, k).count, getattr(s, k).ns] for k in INFERENCE_STAT_FIELDS})
    doc["batches"] = [
        [b.batch_size, *([getattr(b, k).count, getattr(b, k).ns] for k in _BATCH_FIELDS)] for b in s.batches.values()
    ]
    return doc


def from_doc(doc: dict) -> VersionStats:
    s = VersionStats(str(doc["name"]), int(doc["version"]), int(doc["last_inference_ms"]))
    for k in _COUNTS:
        setattr(s, k, int(doc[k]))
    for k in INFERENCE_STAT_FIELDS:
        setattr(s, k, Duration(*map(int, doc[k])))
    for size, *durations in doc["batches"]:
        b = BatchStats(int(size), *(Duration(*map(int, d)) for d in durations))
        s.batches[b.batch_size] = b
    return s


# -- adding statistics up ----------------------------------------------------------------------
def add(total: VersionStats, other: VersionStats) -> None:
    """Add ``other`` into ``total`` (the same version, counted by another process)."""
    total.last_inference_ms = max(total.last_inference_ms, other.last_inference_ms)
    for k in _COUNTS:
        setattr(total, k, getattr(total, k) + getattr(other, k))
    for k in INFERENCE_STAT_FIELDS:
        getattr(total, k).add(getattr(other, k).ns, getattr(other, k).count)
    for size, ob in other.batches.items():
        tb = total.batches.get(size)
        if tb is None:
            tb = total.batches[size] = BatchStats(size)
        for k in _BATCH_FIELDS:
            getattr(tb, k).add(getattr(ob, k).ns, getattr(ob, k).count)


def copy(s: VersionStats) -> VersionStats:
    out = VersionStats(s.name, s.version)
    add(out, s)
    return out


def merge(own: Iterable[VersionStats], others: dict[Key, VersionStats]) -> list[VersionStats]:
    """``own`` (in its order) with each version's counts from ``others`` added; new objects."""
    out = []
    for s in own:
        extra = others.get((s.name, s.version))
        if extra is None:
            out.append(s)
            continue
        total = copy(s)
        add(total, extra)
        out.append(total)
    return out


def read_snapshots(directory: Path, skip: str) -> dict[Key, VersionStats]:
    """Every snapshot in ``directory`` but the file named ``skip``, added up per version.
    Blocking: call it in a thread. A file that cannot be read or parsed is left out."""
    totals: dict[Key, VersionStats] = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == skip:
            continue
        try:
            docs = json.loads(path.read_bytes())
            snapshot = [from_doc(d) for d in docs]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("statistics snapshot %s left out: %s", path, exc)
            continue
        for s in snapshot:
            key = (s.name, s.version)
            if key in totals:
                add(totals[key], s)
            else:
                totals[key] = s
    return totals


def write_snapshot(directory: Path, name: str, docs: list[dict]) -> None:
    """Replace ``directory/name`` with ``docs`` in one rename. Blocking: call it in a thread."""
    tmp = directory / f".{name}.tmp"
    tmp.write_bytes(json.dumps(docs, separators=(",", ":")).encode())
    os.replace(tmp, directory / name)


class SharedStats:
    """This worker's side of the shared statistics directory; the gateway starts and closes it."""

    def __init__(
        self,
        directory: Path,
        source: Callable[[], Iterable[VersionStats]],
        interval_s: float = 1.0,
        name: str | None = None,
    ) -> None:
        self.directory = directory
        self.source = source  # this worker's statistics, every version
        self.interval_s = interval_s
        self.file = name or f"{os.getpid()}.json"
        self._others: dict[Key, VersionStats] = {}
        self._task: asyncio.Task | None = None

    def merged(self, own: Iterable[VersionStats]) -> list[VersionStats]:
        """``own`` with the other workers' counts (as last read) added."""
        return merge(own, self._others)

    async def exchange(self) -> None:
        """Write this worker's snapshot, then read the others'."""
        docs = [to_doc(s) for s in self.source()]  # on the loop: the counts are updated there
        self._others = await asyncio.to_thread(self._swap, docs)

    def _swap(self, docs: list[dict]) -> dict[Key, VersionStats]:
        write_snapshot(self.directory, self.file, docs)
        return read_snapshots(self.directory, self.file)

    async def _run(self) -> None:
        while True:
            try:
                await self.exchange()
            except OSError as exc:
                log.warning("statistics snapshot not shared: %s", exc)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stats-share")

    async def close(self) -> None:
        """Stop, after one last snapshot so that this worker's final counts stay counted."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.exchange()
        except OSError as exc:
            log.warning("last statistics snapshot not shared: %s", exc)
