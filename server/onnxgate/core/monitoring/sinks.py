"""Where sampled records go: rotating JSONL or Parquet files, or a CloudEvents HTTP collector.

Sinks run on the sample logger's writer thread, never on the event loop, and never raise: they
report through :class:`SinkStats` how many records were written and how many were dropped, by
reason (``disk_full``, ``io_error``, ``collector_down``, ``collector_rejected``, ``shutdown``).

**Files.** A file is written as ``.<name>.part`` in the sink directory and renamed (atomically,
same directory) to ``<name>`` when complete: when it reaches ``rotate_mb``, when it is
``rotate_s`` old, and on close. A reader that skips dot files never sees a torn file
(``drift_stats.read_records`` reads a directory so). Names sort by time:
``samples-20240501T120000.123456Z-<pid>-<seq>.jsonl``.
On a write error the part file is cut back to its last complete record (JSONL) or abandoned
(Parquet), and the records lost are counted.

- JSONL: one record per line, UTF-8 JSON (record schema: ``core/sample_log.py``).
- Parquet: one row per record. Scalar columns ``schema_version`` (int32), ``time``, ``id``,
  ``route``, ``model``, ``version``, ``protocol``, ``status``, ``error`` (string) and
  ``latency_s`` (float64); the nested parts ``headers``, ``inputs``, ``outputs``, ``shadow`` and
  ``model_tags`` are JSON text columns, each holding exactly the JSON value the JSONL line holds (``json.loads``
  them). File metadata: ``onnxgate.schema_version`` and ``onnxgate.json_columns``.

**HTTP.** Records are sent as CloudEvents 1.0 in structured batch mode (one POST of
``application/cloudevents-batch+json``: a JSON array of events with ``specversion``, ``id``,
``source``, ``type: io.onnxgate.sample``, ``time``, ``subject`` (the model), ``datacontenttype``
and ``data`` = the record). A batch goes out at ``batch_size`` events or ``flush_s`` after its
first one. Connection errors, timeouts, 408, 429 and 5xx are retried ``retries`` times with
exponential backoff; then the batch is dropped (``collector_down``) and, until a later probe
succeeds, batches are dropped without waiting. Other 4xx drop the batch (``collector_rejected``).
Event ids are made once per record, so a collector can drop duplicates from retries.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import math
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from onnxgate.core.monitoring.config import SinkConfig

log = logging.getLogger("onnxgate.sample_log")

JSON_COLUMNS = ("headers", "inputs", "outputs", "shadow", "model_tags")
_STRING_COLUMNS = ("time", "id", "route", "model", "version", "protocol", "status", "error")


class SinkStats(Protocol):
    """What a sink reports to its owner."""

    def written(self, n: int) -> None: ...

    def dropped(self, reason: str, n: int) -> None: ...


class Sink:
    """A destination for records; every method is called from one writer thread and never raises."""

    def __init__(self, stats: SinkStats) -> None:
        self.stats = stats
        self.deadline = math.inf  # time.monotonic() after which nothing waits or retries (set on close)
        self._warned: dict[str, float] = {}

    def write(self, records: list[dict]) -> None:
        """Take ``records`` (this base sink, type ``none``, discards them)."""

    def tick(self) -> None:
        """Time-based work (rotation by age, flushing a partial batch); called often."""

    def close(self) -> None:
        """Finish everything pending."""

    def _warn(self, key: str, msg: str, *args: object) -> None:
        """Log a warning at most once a minute per ``key``."""
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) >= 60.0:
            self._warned[key] = now
            log.warning(msg, *args)


def encode_json(value: Any) -> bytes:
    """JSON the way every sink writes it (NaN and infinities become null)."""
    return orjson.dumps(value, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _reason(exc: OSError) -> str:
    return "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "io_error"


class _FileSink(Sink):
    """Rotation and the part-file protocol; subclasses write the format."""

    suffix = ""

    def __init__(self, config: SinkConfig, stats: SinkStats, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(stats)
        self.directory = Path(config.path)
        self.rotate_bytes = max(1, int(config.rotate_mb * 1024 * 1024))
        self.rotate_s = config.rotate_s
        self._clock = clock
        self._seq = 0
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._opened = 0.0
        self._rows = 0  # records in the open file

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        try:
            if self._tmp is None:
                self._open()
            self._append(records)
        except OSError as exc:
            self._warn(_reason(exc), "sample log: cannot write to %s: %s; dropping records", self.directory, exc)
            if self._tmp is None or self._rewind():  # no file, or the file is whole again without them
                self.stats.dropped(_reason(exc), len(records))
            else:
                self._abandon(exc, len(records))
            return
        self._rows += len(records)
        self.stats.written(len(records))
        try:
            full = self._size() >= self.rotate_bytes
        except OSError:
            full = True
        if full:
            self._finish()

    def tick(self) -> None:
        if self._tmp is not None and self._clock() - self._opened >= self.rotate_s:
            self._finish()

    def close(self) -> None:
        if self._tmp is not None:
            self._finish()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000_000)) + f".{now // 1000 % 1_000_000:06d}Z"
        name = f"samples-{stamp}-{os.getpid()}-{self._seq:06d}{self.suffix}"
        tmp = self.directory / f".{name}.part"
        try:
            self._create(tmp)
        except BaseException:
            with contextlib.suppress(OSError):  # it may exist, half made
                tmp.unlink(missing_ok=True)
            raise
        self._tmp, self._final = tmp, self.directory / name
        self._opened = self._clock()
        self._rows = 0

    def _finish(self) -> None:
        assert self._tmp is not None and self._final is not None
        try:
            self._seal()
            os.replace(self._tmp, self._final)
        except OSError as exc:
            self._warn(_reason(exc), "sample log: cannot complete a file in %s: %s", self.directory, exc)
            self._abandon(exc)
            return
        self._tmp = self._final = None

    def _abandon(self, exc: OSError, extra: int = 0) -> None:
        """Give up the open file: its records and ``extra`` more are lost and counted."""
        self._discard()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)
        self._tmp = self._final = None
        lost, self._rows = self._rows + extra, 0
        if lost:
            self.stats.dropped(_reason(exc), lost)

    # -- the format: subclasses ------------------------------------------------------------
    def _create(self, path: Path) -> None:
        raise NotImplementedError

    def _append(self, records: list[dict]) -> None:
        raise NotImplementedError

    def _rewind(self) -> bool:
        """After a failed append: put the file back to its last complete record, if possible."""
        return False

    def _size(self) -> int:
        raise NotImplementedError

    def _seal(self) -> None:
        """Complete the file (it is renamed next)."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Release the file without completing it; never raises."""
        raise NotImplementedError


class JsonlSink(_FileSink):
    """One JSON record per line."""

    suffix = ".jsonl"

    def __init__(self, config: SinkConfig, stats: SinkStats, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, stats, clock)
        self._fd = -1
        self._good = 0  # bytes of complete lines

    def _create(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._good = 0

    def _append(self, records: list[dict]) -> None:
        data = memoryview(b"".join(encode_json(r) + b"\n" for r in records))
        done = 0
        while done < len(data):
            done += os.write(self._fd, data[done:])
        self._good += len(data)

    def _rewind(self) -> bool:
        try:
            os.ftruncate(self._fd, self._good)
            os.lseek(self._fd, self._good, os.SEEK_SET)
        except OSError:
            return False
        return True

    def _size(self) -> int:
        return self._good

    def _seal(self) -> None:
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _discard(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


class ParquetSink(_FileSink):
    """Rows buffered in memory and written as row groups; the footer is written on completion."""

    suffix = ".parquet"

    def __init__(self, config: SinkConfig, stats: SinkStats, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, stats, clock)
        import pyarrow as pa  # only for this sink: the gateway does not need pyarrow otherwise

        self._pa = pa
        fields = [("schema_version", pa.int32())] + [(c, pa.string()) for c in _STRING_COLUMNS]
        fields += [("latency_s", pa.float64())] + [(c, pa.string()) for c in JSON_COLUMNS]
        meta = {"onnxgate.schema_version": "1", "onnxgate.json_columns": ",".join(JSON_COLUMNS)}
        self._schema = pa.schema(fields, metadata=meta)
        self._writer: Any = None
        self._pending: list[dict] = []
        self._pending_bytes = 0
        self._group_bytes = min(4 * 1024 * 1024, max(1, self.rotate_bytes // 4))

    def _create(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(str(path), self._schema, compression="zstd")

    def _append(self, records: list[dict]) -> None:
        rows, size = [], 0
        for r in records:  # coerced to the schema here, so a bad record fails alone, not the row group
            row: dict[str, Any] = {c: None if r.get(c) is None else str(r[c]) for c in _STRING_COLUMNS}
            row["schema_version"] = int(r.get("schema_version", 1))
            row["latency_s"] = None if r.get("latency_s") is None else float(r["latency_s"])
            for column in JSON_COLUMNS:
                value = r.get(column)
                row[column] = None if value is None else encode_json(value).decode()
                size += len(row[column] or "")
            rows.append(row)
        self._pending.extend(rows)
        self._pending_bytes += size
        if self._pending_bytes >= self._group_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            rows, self._pending, self._pending_bytes = self._pending, [], 0
            self._writer.write_table(self._pa.Table.from_pylist(rows, schema=self._schema))

    def _size(self) -> int:
        assert self._tmp is not None
        return self._tmp.stat().st_size

    def _seal(self) -> None:
        try:
            self._flush()
        finally:
            writer, self._writer = self._writer, None
            writer.close()

    def _discard(self) -> None:
        self._pending, self._pending_bytes = [], 0
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # the file is being thrown away
                writer.close()


_RETRY_STATUS = frozenset({408, 429})
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"


def post(url: str, body: bytes, content_type: str, timeout: float) -> int:
    """POST ``body``; the HTTP status, or raises OSError when no answer came."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, bad replies
        raise OSError(str(exc)) from exc


class HttpSink(Sink):
    """CloudEvents batches to a collector, with retry, backoff and a circuit while it is down."""

    def __init__(
        self,
        config: SinkConfig,
        stats: SinkStats,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(stats)
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._events: list[dict] = []
        self._first_at = 0.0
        self._down_until = -math.inf  # while down, batches are dropped until this probe time
        self._down_wait = config.backoff_s

    def write(self, records: list[dict]) -> None:
        if not self._events:
            self._first_at = self._clock()
        source = self.config.source
        for r in records:
            self._events.append(
                {
                    "specversion": "1.0",
                    "id": uuid.uuid4().hex,
                    "source": source,
                    "type": "io.onnxgate.sample",
                    "time": r.get("time"),
                    "subject": r.get("model"),
                    "datacontenttype": "application/json",
                    "data": r,
                }
            )
        while len(self._events) >= self.config.batch_size:
            self._send_batch()

    def tick(self) -> None:
        if self._events and self._clock() - self._first_at >= self.config.flush_s:
            while self._events:
                self._send_batch()

    def close(self) -> None:
        while self._events:
            self._send_batch()

    def _send_batch(self) -> None:
        batch = self._events[: self.config.batch_size]
        del self._events[: self.config.batch_size]
        self._first_at = self._clock()
        n = len(batch)
        if self._clock() < self._down_until:
            self.stats.dropped("collector_down", n)
            return
        body = encode_json(batch)
        delay = self.config.backoff_s
        outcome = "collector_down"
        probing = self._down_until > -math.inf  # while down, one try per probe: no retries
        for attempt in range(1 if probing else self.config.retries + 1):
            if attempt and not self._wait(delay):
                outcome = "shutdown"
                break
            delay = min(delay * 2, self.config.backoff_max_s)
            remaining = self.deadline - self._clock()
            if remaining <= 0:
                outcome = "shutdown"
                break
            try:
                status = post(self.config.url, body, BATCH_CONTENT_TYPE, min(self.config.timeout_s, remaining))
            except OSError as exc:
                self._warn("down", "sample log: collector %s unreachable: %s", self.config.url, exc)
                continue
            if 200 <= status < 300:
                self._down_until, self._down_wait = -math.inf, self.config.backoff_s
                self.stats.written(n)
                return
            if 400 <= status < 500 and status not in _RETRY_STATUS:
                self._warn("rejected", "sample log: collector %s refused a batch: HTTP %d", self.config.url, status)
                self.stats.dropped("collector_rejected", n)
                return
            self._warn("status", "sample log: collector %s answered HTTP %d", self.config.url, status)
        if outcome == "collector_down":
            self._down_until = self._clock() + self._down_wait
            self._down_wait = min(max(self._down_wait * 2, 0.001), max(self.config.backoff_max_s, 0.001))
        self.stats.dropped(outcome, n)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless that would pass the deadline."""
        if self._clock() + seconds >= self.deadline:
            return False
        self._sleep(seconds)
        return True


def make_sink(config: SinkConfig, stats: SinkStats) -> Sink:
    """The sink the config names."""
    if config.type == "jsonl":
        return JsonlSink(config, stats)
    if config.type == "parquet":
        return ParquetSink(config, stats)
    if config.type == "http":
        return HttpSink(config, stats)
    return Sink(stats)
