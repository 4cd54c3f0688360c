"""The audit log: one JSON line per admin action (and per refused admin call), written off the
event loop.

A record: ``{"time", "token", "peer", "action", "target", "result"}``; ``token`` is the token's
name (never the token), ``"-"`` without one; ``result`` is ``"ok"`` or what the caller was
answered (``"403 PermissionDenied: ..."``). Calls the failure limit refuses (429) are not
recorded one by one, so a guesser cannot fill the log; the failures that led to the limit are.

With ``security.audit_log`` set, records are appended to that file by a writer thread (a bounded
queue: past ``MAX_QUEUED`` waiting records new ones are dropped, counted and logged as errors);
without it they go to the ``onnxgate.audit`` logger, at INFO whatever ``--log-level`` says.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import threading
from pathlib import Path

import orjson

log = logging.getLogger("onnxgate.audit")
log.setLevel(logging.INFO)  # admin actions are recorded whatever --log-level says

MAX_QUEUED = 10_000
_STOP = object()


class AuditLog:
    """Where admin actions are recorded."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - the writer thread owns it
            self._thread = threading.Thread(target=self._write, name="onnxgate-audit", daemon=True)
            self._thread.start()

    def record(self, token: str, peer: str, action: str, target: str, result: str) -> None:
        """Record one action (never blocks, never raises)."""
        entry = {
            "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "token": token or "-",
            "peer": peer,
            "action": action,
            "target": target,
            "result": result,
        }
        if self._thread is None:
            log.info("%s", orjson.dumps(entry).decode())
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("audit log %s is not keeping up: %d record(s) dropped so far", self.path, self.dropped)

    def _write(self) -> None:
        while (entry := self._queue.get()) is not _STOP:
            try:
                self._file.write(orjson.dumps(entry) + b"\n")
            except OSError as exc:
                log.error("cannot write the audit log %s: %s", self.path, exc)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds) and close the file (blocking)."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):  # a stuck writer (a dead disk): it is a daemon thread
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None
        self._file.close()
