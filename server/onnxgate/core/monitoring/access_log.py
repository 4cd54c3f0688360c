"""The access log: one JSON line per inference request, written off the event loop.

Opt-in, by the ``access_log:`` section of gateway.yaml::

    access_log:
      path: "-"            # "-" = standard output; else a file, appended to (and reopened when
                           # it is moved or deleted, e.g. by logrotate)
      queue_size: 10000    # lines waiting for the writer; past it lines are dropped and counted
                           # (onnxgate_access_log_dropped_total): the request path never waits

A line (keys always present; ``null`` where there is nothing)::

    {"time": "2026-05-01T12:00:00.123456Z", "request_id": "...", "trace_id": "4bf9...", "peer": "127.0.0.1:53312",
     "protocol": "http", "model": "fraud", "route": "fraud", "version": "2", "status": 200, "outcome": "ok",
     "rows": 4, "queue_ms": 0.41, "compute_ms": 1.2, "latency_ms": 2.9, "reason": null, "error": null}

``time`` is when the answer was sent; ``model`` is the name asked for (a model or a route),
``route`` the route (null when the name is a model) and ``version`` the version that answered;
``status`` is the HTTP status, or the gRPC status code's name; ``outcome`` is ``ok`` or the
failure's kind; ``reason`` why a shed request (429 / RESOURCE_EXHAUSTED) was shed; ``error`` its
message (at most 200 characters). Under ``--workers N`` every worker appends to the same file,
a line per write.

The event loop only appends a tuple of raw values to a bounded queue; the writer thread formats
and writes them in batches.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from onnxgate.core.sections import check, parse_fields

log = logging.getLogger(__name__)

STDOUT = "-"
MAX_ERROR_CHARS = 200
REOPEN_CHECK_S = 1.0  # how often the writer checks that its file is still there
FLUSH_INTERVAL_S = 0.05  # how often the writer takes what is queued: a line is written within it
MIN_CLOSE_S = 0.5  # what closing waits for the last lines at least


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """The ``access_log:`` section (module docstring)."""

    path: str = STDOUT
    queue_size: int = 10000

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccessLogConfig:
        """Parse the section; raises ``ConfigError``."""
        c = cls(**parse_fields(cls, d, "access_log"))
        check(bool(c.path), "access_log.path must be '-' (standard output) or a file path")
        check(c.queue_size >= 1, f"access_log.queue_size must be >= 1, got {c.queue_size}")
        return c

    def check_writable(self) -> None:
        """Raise ``ConfigError`` when the file cannot be opened for appending: the early check
        of a whole gateway's start (under ``--workers N`` a worker that cannot open it would
        only exit, and be restarted, again and again)."""
        if self.path == STDOUT:
            return
        try:
            with open(self.path, "ab"):
                pass
        except OSError as exc:
            check(False, f"access_log.path {self.path!r} cannot be opened for appending: {exc.strerror}")


def _peer(peer: Any) -> str | None:
    """An ASGI client (host, port), a gRPC peer ("ipv4:1.2.3.4:5"), or None, as text."""
    if peer is None:
        return None
    if isinstance(peer, tuple | list) and len(peer) == 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def format_line(entry: tuple) -> bytes:
    """One access-log line (with its newline) from the tuple :meth:`AccessLogger.offer` takes."""
    (when, request_id, trace_id, peer, protocol, model, route, version, status, outcome, rows, queue_ns,
     compute_ns, latency_ns, reason, error) = entry
    return orjson.dumps({
        "time": _time(when), "request_id": request_id, "trace_id": trace_id or None, "peer": _peer(peer),
        "protocol": protocol, "model": model, "route": route or None, "version": version or None,
        "status": status, "outcome": outcome, "rows": rows, "queue_ms": _ms(queue_ns),
        "compute_ms": _ms(compute_ns), "latency_ms": _ms(latency_ns), "reason": reason or None,
        "error": error[:MAX_ERROR_CHARS] if error else None,
    }) + b"\n"


_second: list = [None, ""]  # the last whole second formatted, and its text: one strftime a second


def _time(t: float) -> str:
    """``t`` as RFC 3339 UTC with microseconds, as the sample log writes it."""
    sec, micro = divmod(round(t * 1e6), 1_000_000)
    if _second[0] != sec:
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{micro:06d}Z"


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


class AccessLogger:
    """A bounded queue of access-log entries and the thread that writes them.

    The writer writes to a file descriptor of its own (standard output's is duplicated): a
    write blocked on a stuck pipe holds no Python-level lock, so the drain can give up on it
    (``close``) and the process still exits."""

    def __init__(self, config: AccessLogConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        # entries waiting for the writer: appended on the loop, taken by the writer (deque's append
        # and popleft are atomic); the writer wakes every FLUSH_INTERVAL_S, not per entry, so a
        # busy gateway pays no thread switch per request
        self._pending: deque[tuple] = deque()
        self._stop = threading.Event()
        self.written = Counter("onnxgate_access_log_lines", "Access-log lines written.", registry=registry)
        self.dropped = Counter(
            "onnxgate_access_log_dropped",
            "Access-log lines dropped: the writer was access_log.queue_size lines behind, writing failed, "
            "or the drain ended before they were written.",
            registry=registry,
        )
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> None:
        """Open the output (raises OSError when a file cannot be opened) and start the writer."""
        self._open()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def offer(self, entry: tuple) -> None:
        """On the loop: queue one entry (see :func:`format_line`), or drop it when the writer is
        ``queue_size`` lines behind. Never blocks."""
        if len(self._pending) >= self.config.queue_size or self._thread is None:
            self.dropped.inc()
            return
        self._pending.append(entry)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued within ``timeout_s`` (at least ``MIN_CLOSE_S``: a drain that used
        its whole budget still logs its last answers), then stop the writer and close the output.
        Lines the writer could not write by then (its output is stuck) are counted as dropped;
        the writer, a daemon thread, is left blocked and the output open."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        timeout_s = max(MIN_CLOSE_S, timeout_s)
        thread.join(timeout_s)
        if thread.is_alive():
            left = len(self._pending)
            self._pending.clear()
            self.dropped.inc(left)
            log.warning("access log: the output did not take the last %d lines in %.2fs; dropped", left, timeout_s)
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the writer thread -------------------------------------------------------------------
    def _open(self) -> None:
        if self.config.path == STDOUT:
            sys.stdout.flush()
            self._fd = os.dup(sys.stdout.fileno())
            return
        self._fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(self._fd)
        self._inode = (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        """Reopen the file when it was moved or deleted (log rotation)."""
        if self.config.path == STDOUT:
            return
        try:
            st = os.stat(self.config.path)
            moved = (st.st_dev, st.st_ino) != self._inode
        except FileNotFoundError:
            moved = True
        if moved:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._open()

    def _run(self) -> None:
        checked = time.monotonic()
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self._drain()
            if time.monotonic() - checked >= REOPEN_CHECK_S:
                checked = time.monotonic()
                self._guarded(self._reopen_if_moved, 0)
        self._drain()

    def _drain(self) -> None:
        """Write every pending entry, in batches of at most 1024 lines."""
        pending = self._pending
        while pending:
            batch = [pending.popleft() for _ in range(min(len(pending), 1024))]
            lines = self._format(batch)
            self._guarded(lambda data=lines: self._write(data), lines.count(b"\n"))

    def _format(self, batch: list[tuple]) -> bytes:
        """The batch's lines; an entry that cannot be formatted is dropped alone."""
        try:
            return b"".join(map(format_line, batch))
        except Exception:
            out = []
            for entry in batch:
                try:
                    out.append(format_line(entry))
                except Exception as exc:
                    self.dropped.inc()
                    log.warning("access log: an entry could not be written: %s", exc)
            return b"".join(out)

    def _write(self, data: bytes) -> None:
        self._reopen_if_moved()
        view = memoryview(data)
        while view:
            assert self._fd is not None
            view = view[os.write(self._fd, view):]
        self.written.inc(data.count(b"\n"))

    def _guarded(self, step: Any, lines: int) -> None:
        """Run a writer step; a failure (disk full) drops its lines, never the thread."""
        try:
            step()
        except Exception as exc:
            if lines:
                self.dropped.inc(lines)
            log.warning("access log: %s", exc)
