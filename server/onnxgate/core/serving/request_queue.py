"""A version's queued requests, in the order batches take them.

The order is: priority level (1 first; shadow copies last, below every level), then, within a
level, requests not timed out before those a DELAY queue policy set back, then earliest
deadline first (requests without a deadline after those with one), then arrival. With the
deadline scheduler off (``scheduler: fifo``) deadlines are left out of the order: FIFO within
a level, as in Triton.

The queue is a list kept sorted: an arrival goes in with one binary search (almost always at the
end of its level, where the list moves nothing), a batch leaves from the front, and rows and
bytes are kept as running totals, so what is ahead of a request costs a walk over only what is
behind it. Every method runs under the version's lock.
"""

from __future__ import annotations

import asyncio
import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NO_DEADLINE = 1 << 62  # sorts after every real deadline (perf_counter_ns)


@dataclass(eq=False, slots=True)
class Pending:
    """One queued request: its feeds, where it sorts, and how it is answered."""

    feeds: Mapping[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...]
    key: tuple  # batching compatibility: non-batch dims, datatypes, outputs
    future: asyncio.Future
    enqueued_ns: int
    nbytes: int = 0
    shadow: bool = False
    level: int = 1
    deadline_ns: int = 0  # 0 = none (perf_counter_ns)
    timeout_at_ns: int = 0  # the queue timeout, 0 = none
    delayed: int = 0  # 1 once its queue timeout passed under a DELAY policy
    order: tuple = ()  # its sort key while queued
    timer: asyncio.TimerHandle | None = field(default=None)
    dropped: bool = False  # its caller went away after its batch was formed: not computed
    late: bool = False  # taken but refused: its deadline could no longer be met
    hopeless: bool = False  # late, found behind a batch just taken
    probe: bool = False  # admitted to start at once although predicted late: it checks the fit
    trace: Any = None  # its sampled request's span (tracing on), for the batch span's links


class RequestQueue:
    """Queued requests, sorted (see the module doc); ``edf`` orders by deadline within a level."""

    __slots__ = ("_entries", "_seq", "edf", "nbytes", "per_level", "rows")

    def __init__(self, levels: int, edf: bool) -> None:
        self._entries: list[tuple] = []  # (level, delayed, deadline, seq, item)
        self._seq = itertools.count()
        self.edf = edf
        self.rows = 0
        self.nbytes = 0
        self.per_level = [0] * (levels + 2)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[Pending]:
        for entry in self._entries:
            yield entry[4]

    def first(self) -> Pending | None:
        return self._entries[0][4] if self._entries else None

    def last(self) -> Pending | None:
        return self._entries[-1][4] if self._entries else None

    def place(self, item: Pending) -> int:
        """Where ``item`` would go; sets its sort key."""
        deadline = item.deadline_ns if self.edf and item.deadline_ns else NO_DEADLINE
        item.order = (item.level, item.delayed, deadline, next(self._seq))
        return bisect_right(self._entries, item.order)

    def rows_ahead(self, index: int) -> int:
        """Rows queued before position ``index``."""
        return self.rows - sum(e[4].rows for e in self._entries[index:])

    def insert(self, index: int, item: Pending) -> None:
        """Queue ``item`` at ``index``, from :meth:`place` with nothing queued in between."""
        self._entries.insert(index, (*item.order, item))
        self.rows += item.rows
        self.nbytes += item.nbytes
        self.per_level[item.level] += 1

    def push(self, item: Pending) -> None:
        self.insert(self.place(item), item)

    def remove(self, item: Pending) -> bool:
        """Take ``item`` out, if it is queued."""
        entries = self._entries
        i = bisect_left(entries, item.order)
        if i < len(entries) and entries[i][4] is item:
            del entries[i]
            self._left(item)
            return True
        return False

    def remove_taken(self, taken: list[Pending]) -> None:
        """Take out ``taken``, queued items in queue order (what a batch took)."""
        if not taken:
            return
        entries = self._entries
        k = len(taken)
        if entries[k - 1][4] is taken[-1]:  # the common case: the batch is the queue's head
            del entries[:k]
        else:
            gone = {id(t) for t in taken}
            entries[:] = [e for e in entries if id(e[4]) not in gone]
        for item in taken:
            self._left(item)

    def clear(self) -> list[Pending]:
        items = [e[4] for e in self._entries]
        self._entries.clear()
        self.rows = self.nbytes = 0
        self.per_level = [0] * len(self.per_level)
        return items

    def _left(self, item: Pending) -> None:
        self.rows -= item.rows
        self.nbytes -= item.nbytes
        self.per_level[item.level] -= 1
