"""Rotating record files: JSONL or Parquet.

A file is written as ``.<name>.part`` in the sink directory and renamed (atomically,
same directory) to ``<name>`` when complete: when it reaches ``rotate_mb``, when it is
``rotate_s`` old, and on close. A reader that skips dot files never sees a torn file
(``drift_stats.read_records`` reads a directory so). Names sort by time:
``samples-20240501T120000.123456Z-<pid>-<seq>.jsonl``.
On a write error the part file is cut back to its last complete record (JSONL) or abandoned
(Parquet), and the records lost are counted.

- JSONL: one record per line, UTF-8 JSON (record schema: ``records.py``).
- Parquet: one row per record. Scalar columns ``schema_version`` (int32), ``time``, ``id``,
  ``request_id``, ``trace_id``,
  ``route``, ``model``, ``version``, ``protocol``, ``status``, ``error`` (string) and
  ``latency_s`` (float64); the nested parts ``headers``, ``inputs``, ``outputs``, ``shadow`` and
  ``model_tags`` are JSON text columns, each holding exactly the JSON value the JSONL line holds (``json.loads``
  them). File metadata: ``onnxgate.schema_version`` and ``onnxgate.json_columns``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxgate.core.monitoring.config import SinkConfig

from onnxgate.core.monitoring.sinks import Sink, SinkStats, encode_json

log = logging.getLogger("onnxgate.sample_log")

JSON_COLUMNS = ("headers", "inputs", "outputs", "shadow", "model_tags")  # Parquet: JSON text columns
_STRING_COLUMNS = ("time", "id", "request_id", "trace_id", "route", "model", "version", "protocol", "status", "error")

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
