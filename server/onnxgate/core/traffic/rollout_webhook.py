"""A rollout's decisions posted to its ``webhook:`` as CloudEvents (structured JSON mode).

One event per decision (advance, complete, hold, rollback, pause, resume, promote, abort)::

    POST <webhook>
    Content-Type: application/cloudevents+json

    {"specversion": "1.0", "type": "dev.onnxgate.rollout.rollback", "source": "/v2/routes/fraud/rollout",
     "id": "<uuid>", "time": "2026-05-01T12:00:00Z", "subject": "fraud", "datacontenttype": "application/json",
     "data": {"route": "fraud", "candidate": "fraud_v2", "decision": "rollback", "phase": "rolled_back",
              "from_step": 2, "to_step": 2, "weight": 0, "reason": "...", "alert": true, "gates": [...]}}

Posted off the request path by one task, from a bounded queue (past ``QUEUE_SIZE`` events are
dropped and counted); an endpoint that fails is retried ``RETRIES`` times with a short backoff,
then the event is dropped and counted (``onnxgate_rollout_webhook_failures_total``). A webhook
never holds a rollout back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry, Counter

from onnxgate.core.traffic.rollout import Rollout

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
RETRIES = 2
TIMEOUT_S = 5.0


def cloud_event(route: str, candidate: str, decision: dict[str, Any]) -> dict[str, Any]:
    """The CloudEvent of one decision."""
    when = datetime.fromtimestamp(decision.get("time", time.time()), UTC)
    return {
        "specversion": "1.0",
        "type": f"dev.onnxgate.rollout.{decision['decision']}",
        "source": f"/v2/routes/{route}/rollout",
        "id": str(uuid.uuid4()),
        "time": when.isoformat().replace("+00:00", "Z"),
        "subject": route,
        "datacontenttype": "application/json",
        "data": {"route": route, "candidate": candidate, **decision},
    }


class RolloutWebhooks:
    """Posts every decision of a rollout that names a webhook."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.failures = Counter(
            "onnxgate_rollout_webhook_failures",
            "Rollout decisions not delivered to their webhook (endpoint failing, or the queue full).",
            ["route"],
            registry=registry,
        )
        self._queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task | None = None

    def notify(self, rollout: Rollout, decision: dict[str, Any]) -> None:
        """On the loop: queue the decision's event when the rollout has a webhook."""
        url = rollout.config.webhook
        if not url:
            return
        body = orjson.dumps(cloud_event(rollout.route, str(rollout.config.candidate), decision))
        try:
            self._queue.put_nowait((rollout.route, url, body))
        except asyncio.QueueFull:
            self.failures.labels(rollout.route).inc()
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._post_all())

    async def _post_all(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            while not self._queue.empty():
                route, url, body = self._queue.get_nowait()
                for attempt in range(RETRIES + 1):
                    try:
                        reply = await client.post(url, content=body,
                                                  headers={"content-type": "application/cloudevents+json"})
                        if reply.status_code < 300:
                            break
                        problem = f"HTTP {reply.status_code}"
                    except httpx.HTTPError as exc:
                        problem = f"{type(exc).__name__}: {exc}"
                    if attempt == RETRIES:
                        log.warning("rollout %s: webhook %s failed: %s; event dropped", route, url, problem)
                        self.failures.labels(route).inc()
                    else:
                        await asyncio.sleep(0.5 * (attempt + 1))

    async def close(self, timeout_s: float) -> None:
        """Let queued events go out for up to ``timeout_s``, then give up on them."""
        if self._task is None or self._task.done():
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        if not self._task.done():
            self._task.cancel()
