"""How busy a version's instances are: the share of recent wall time they spent executing.

Each instance thread marks the start and end of its executions (one tuple store each: a reader
on the event loop sees either the state before or after, never half of it); the loop reads the
total once a second (``BusyMeter.ratio``) into the ``onnxgate_instance_busy_ratio`` gauge, an
autoscaling signal that, unlike the rate of ``onnxgate_instance_busy_seconds``, needs no
recording rule and counts a long execution while it runs, not only once it has ended.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

WINDOW_NS = 10_000_000_000  # the ratio covers about the last 10 s
TICK_S = 1.0  # how often the loop refreshes the gauge


class BusyMeter:
    """Busy time of ``instances`` instance threads, and its share of a sliding window."""

    def __init__(self, instances: int) -> None:
        self.instances = max(1, instances)
        # per instance: (busy ns of ended executions, start of the running one or None)
        self._state: list[tuple[int, int | None]] = [(0, None)] * self.instances
        self._samples: deque[tuple[int, int]] = deque()  # (when, total busy ns then), oldest first

    def start(self, slot: int, now_ns: int) -> None:
        """In instance ``slot``'s thread: an execution starts."""
        self._state[slot] = (self._state[slot][0], now_ns)

    def stop(self, slot: int, now_ns: int) -> None:
        """In instance ``slot``'s thread: its execution has ended."""
        done, since = self._state[slot]
        self._state[slot] = (done + (now_ns - since if since is not None else 0), None)

    def total_ns(self, now_ns: int) -> int:
        """Busy ns of every instance so far, running executions up to ``now_ns``."""
        total = 0
        for done, since in list(self._state):
            total += done + (max(0, now_ns - since) if since is not None else 0)
        return total

    def ratio(self, now_ns: int | None = None) -> float:
        """The busy share (0..1) of the instances since the oldest sample in the window (0 until
        a second sample exists); records a sample at ``now_ns``."""
        now = time.perf_counter_ns() if now_ns is None else now_ns
        total = self.total_ns(now)
        samples = self._samples
        samples.append((now, total))
        while len(samples) > 2 and samples[1][0] <= now - WINDOW_NS:
            samples.popleft()
        then, before = samples[0]
        if now <= then:
            return 0.0
        return min(1.0, max(0.0, (total - before) / ((now - then) * self.instances)))

    def show(self, gauge: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Set ``gauge`` to :meth:`ratio` now and every ``TICK_S`` on ``loop``, until :meth:`hide`."""
        gauge.set(self.ratio())
        self._gauge = gauge
        self._timer = loop.call_later(TICK_S, self.show, gauge, loop)

    def hide(self) -> None:
        """Stop refreshing the gauge, and set it to 0 (the version is gone)."""
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
            self._timer = None
            self._gauge.set(0)
