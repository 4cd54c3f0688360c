"""The HTTP sink: records to a CloudEvents collector.

Records are sent as CloudEvents 1.0 in structured batch mode (one POST of
``application/cloudevents-batch+json``: a JSON array of events with ``specversion``, ``id``,
``source``, ``type: io.onnxgate.sample``, ``time``, ``subject`` (the model), ``datacontenttype``
and ``data`` = the record). A batch goes out at ``batch_size`` events or ``flush_s`` after its
first one. Connection errors, timeouts, 408, 429 and 5xx are retried ``retries`` times with
exponential backoff; then the batch is dropped (``collector_down``) and, until a later probe
succeeds, batches are dropped without waiting. Other 4xx drop the batch (``collector_rejected``).
Event ids are made once per record, so a collector can drop duplicates from retries.

The URL comes from the config file only. User info in it (``https://user:password@host/...``) is
sent as HTTP Basic credentials; log lines show the URL without user info, query or fragment
(``onnxgate.core.urls.redact_url``), and errors without any of them.
"""

from __future__ import annotations

import base64
import http.client
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxgate.core.monitoring.config import SinkConfig

from onnxgate.core.monitoring.sinks import Sink, SinkStats, encode_json
from onnxgate.core.urls import redact_text, redact_url, url_secrets

log = logging.getLogger("onnxgate.sample_log")

_RETRY_STATUS = frozenset({408, 429})
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"


class _Refuse(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the status it is: following it would send the credentials to
    another host, and turn the POST into a GET whose 200 would count as delivered."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_Refuse)


def post(url: str, body: bytes, content_type: str, timeout: float) -> int:
    """POST ``body``; the HTTP status, or raises OSError when no answer came (its text never holds
    the URL's user info or query). User info in ``url`` goes as HTTP Basic credentials."""
    headers, secrets = {"Content-Type": content_type}, url_secrets(url)
    try:
        parts = urllib.parse.urlsplit(url)
        userinfo, _, host = parts.netloc.rpartition("@")
        if userinfo:
            user, _, password = userinfo.partition(":")
            pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            url = urllib.parse.urlunsplit(parts._replace(netloc=host))
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        with _NO_REDIRECTS.open(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, bad replies
        raise OSError(redact_text(str(exc), secrets)) from None


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
        self.shown_url = redact_url(config.url)  # what log lines show
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
                self._warn("down", "sample log: collector %s unreachable: %s", self.shown_url, exc)
                continue
            if 200 <= status < 300:
                self._down_until, self._down_wait = -math.inf, self.config.backoff_s
                self.stats.written(n)
                return
            if 400 <= status < 500 and status not in _RETRY_STATUS:
                self._warn("rejected", "sample log: collector %s refused a batch: HTTP %d", self.shown_url, status)
                self.stats.dropped("collector_rejected", n)
                return
            self._warn("status", "sample log: collector %s answered HTTP %d", self.shown_url, status)
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
