"""Where sampled records go: the sink interface every destination implements.

Sinks run on the sample logger's writer thread, never on the event loop, and never raise: they
report through :class:`SinkStats` how many records were written and how many were dropped, by
reason (``disk_full``, ``io_error``, ``collector_down``, ``collector_rejected``, ``shutdown``).

The sinks: ``file_sinks.py`` (rotating JSONL and Parquet files) and ``http_sink.py``
(CloudEvents batches to a collector).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    pass

log = logging.getLogger("onnxgate.sample_log")



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
