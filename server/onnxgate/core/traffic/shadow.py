"""Shadow traffic: mirror a primary request to a candidate model, compare, never interfere.

The mirrored request starts once the primary's inputs are decoded and runs as its own task on
a per-route budget (``max_in_flight``; beyond it the mirror is dropped and counted). It goes
through the shadow target's batcher as a low-priority request, shed first under load. The
primary never waits for it: the comparison happens when both answers are in, in the shadow
task. Every task is owned here and awaited or cancelled on close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from onnxgate.core.inference import InferRequest, InferResponse
from onnxgate.core.traffic.comparison import Comparator
from onnxgate.core.traffic.routes import Route, Target
from onnxgate.errors import GatewayError, Overloaded

log = logging.getLogger(__name__)

RunShadow = Callable[[InferRequest, Target], Awaitable[InferResponse]]
# (the primary's note, shadow target, its answer or error, the comparison or None): a mirrored
# request that the caller noted is reported back once both answers are in (the sample log's hook).
Report = Callable[[Any, str, InferResponse | None, BaseException | None, Mapping[str, Any] | None], None]
# (the primary's answer or None when it failed, the shadow's answer, its error, whether it was shed
# rather than failed, the comparison or None): every mirrored request's end, for a rollout's evidence.
Observe = Callable[
    [InferResponse | None, InferResponse | None, BaseException | None, bool, Mapping[str, Any] | None], None
]


class Mirror:
    """The primary's side of one mirrored request."""

    __slots__ = ("_primary",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._primary: asyncio.Future = loop.create_future()

    def primary_done(self, response: InferResponse, latency_s: float, note: Any = None) -> None:
        """The primary answered; a ``note`` (not None) is reported with the shadow's answer."""
        if not self._primary.done():
            self._primary.set_result((response, latency_s, note))

    def primary_failed(self) -> None:
        if not self._primary.done():
            self._primary.set_result(None)


class ShadowRunner:
    """Owns every shadow task and each route's in-flight budget."""

    def __init__(self, comparator: Comparator, report: Report | None = None) -> None:
        self.comparator = comparator
        self.report = report  # where noted mirrored requests go (the service's sample-log hook)
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: dict[tuple[str, Target], int] = {}

    def start(self, route: Route, primary: Target, request: InferRequest, run: RunShadow) -> Mirror | None:
        """Start mirroring ``request`` to the route's shadow; None when the route's budget is used
        up (counted)."""
        assert route.shadow is not None
        return self.mirror(route.name, primary, route.shadow.target, route.shadow.max_in_flight, request, run)

    def mirror(
        self, route: str, primary: Target, shadow: Target, max_in_flight: int, request: InferRequest, run: RunShadow,
        observe: Observe | None = None,
    ) -> Mirror | None:
        """Start mirroring ``request`` to ``shadow`` on a budget of ``max_in_flight`` for that
        route and target; None when it is used up (counted). ``observe`` hears how it ended."""
        key = (route, shadow)
        if self._in_flight.get(key, 0) >= max_in_flight:
            self.comparator.record_failure(route, str(primary), str(shadow), "dropped")
            return None
        loop = asyncio.get_running_loop()
        mirror = Mirror(loop)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        task = loop.create_task(self._run(route, primary, shadow, request, run, mirror, observe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return mirror

    async def _run(
        self, route: str, primary: Target, shadow: Target, request: InferRequest, run: RunShadow, mirror: Mirror,
        observe: Observe | None,
    ) -> None:
        pair = (route, str(primary), str(shadow))
        shed = False
        try:
            started = time.perf_counter()
            answer: InferResponse | None = None
            error: GatewayError | None = None
            try:
                answer = await run(request, shadow)
            except Overloaded as exc:
                # Shed under load, or refused because the primary's deadline would pass first.
                shed = exc.reason in ("shadow_shed", "deadline")
                self.comparator.record_failure(*pair, "dropped" if shed else "failed")
                error = exc
            except GatewayError as exc:
                log.debug("shadow %s failed: %s", shadow, exc.message)
                self.comparator.record_failure(*pair, "failed")
                error = exc
            shadow_latency = time.perf_counter() - started
            outcome = await mirror._primary
            if outcome is None:  # the primary failed: nothing to compare with
                if answer is not None:
                    self.comparator.record_failure(*pair, "primary_failed")
                if observe is not None:
                    observe(None, answer, error, shed, None)
                return
            response, primary_latency, note = outcome
            result = None
            if answer is not None:
                result = self.comparator.record(
                    *pair,
                    {o.name: o.data for o in response.outputs},
                    {o.name: o.data for o in answer.outputs},
                    shadow_latency - primary_latency,
                )
            if observe is not None:
                observe(response, answer, error, shed, result)
            if note is not None and self.report is not None:
                self.report(note, str(shadow), answer, error, result)
        except asyncio.CancelledError:
            raise
        except Exception:  # a shadow must never take anything down
            log.exception("shadow request on route %s failed unexpectedly", route)
            self.comparator.record_failure(*pair, "failed")
        finally:
            self._in_flight[(route, shadow)] -= 1

    async def close(self, timeout: float) -> None:
        """Let running shadows finish for up to ``timeout`` seconds, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
