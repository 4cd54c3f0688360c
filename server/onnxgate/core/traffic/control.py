"""The traffic control plane: the routes as configured and as they serve, their rollouts, their shadows.

A route table is replaced in one step after validation; what serves is each configured route in
its effective form (a rollout's split, :meth:`Rollouts.effective`), rebuilt whenever a rollout
moves. A change to a route whose rollout is active is a :class:`Conflict` unless the caller
aborts that rollout explicitly (``abort_rollout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from onnxgate.core import shared_table
from onnxgate.core.inference import InferRequest, InferResponse
from onnxgate.core.metrics import Metrics
from onnxgate.core.shared_table import SharedTable
from onnxgate.core.traffic.comparison import Comparator
from onnxgate.core.traffic.rollout_share import RolloutShare
from onnxgate.core.traffic.rollouts import Rollouts, RolloutsConfig
from onnxgate.core.traffic.routes import Route, RouteTable, parse_route, parse_routes
from onnxgate.core.traffic.shadow import Mirror, RunShadow, ShadowRunner
from onnxgate.core.traffic.targets import Target
from onnxgate.errors import InvalidInput, ModelNotFound

log = logging.getLogger(__name__)

_WAIT_S = 5.0  # how long a route change waits for every worker to serve it


class TrafficControl:
    """Routes, rollouts and shadows of one gateway process.

    ``known_models`` gives the repository's models and their versions (what targets must name);
    ``check_shared(what)`` raises when a change would reach this process only (``--workers N``)."""

    def __init__(self, metrics: Metrics, known_models: Callable[[], Mapping[str, Collection[int]]],
                 check_shared: Callable[[str], None]) -> None:
        self.table = RouteTable()  # what serves
        self.configured: tuple[Route, ...] = ()  # as configured
        self.rollouts = Rollouts(metrics)
        self.rollouts.on_change = self.apply
        self.shadows = ShadowRunner(Comparator(metrics))
        self.sticky = False  # whether a route splits by a header
        self._known_models = known_models
        self._check_shared = check_shared
        self._share: SharedTable | None = None  # --workers N: the workers' shared table
        self.generation = 0  # of the shared table this process serves (0: the config file's)
        self._unusable = -1  # the shared table's generation found unusable last (logged once)
        self._changing = asyncio.Lock()  # one change (or catch-up) at a time in this process

    def configure_rollouts(self, config: RolloutsConfig, *notify: Callable[[Any, dict], None],
                           share: RolloutShare | None = None, state_dir: str = "") -> None:
        """The ``rollouts:`` section (the state directory), and who hears of every decision;
        under ``--workers N`` the workers' share. Before the routes are first set."""
        self.rollouts.use(config, share, state_dir)
        self.rollouts.notify.extend(notify)

    def set(self, routes: Iterable[Route], what: str = "") -> None:
        """Replace the whole table of this process, after validating it. ``what`` names a change
        that must not touch a route under an active rollout (:class:`Conflict`); "" = the start."""
        routes = tuple(routes)
        self._check(routes, what)
        self._commit(routes)

    def _check(self, routes: tuple[Route, ...], what: str) -> None:
        current = {r.name: r for r in self.configured}
        # a change validates what it changes: a route left as it was stays valid even when a version
        # it pins was unloaded since (it answers 404 / 503 for it), and does not block the others
        changed = [r for r in routes if current.get(r.name) != r] if what else list(routes)
        RouteTable(changed).validate(self._known_models())
        if what:
            self.rollouts.check_change(current, {r.name: r for r in routes}, what)

    def _commit(self, routes: tuple[Route, ...]) -> None:
        self.configured = routes
        self.rollouts.configure(routes)
        self.apply()

    async def change(self, edit: Callable[[tuple[Route, ...]], Iterable[Route]], what: str) -> None:
        """Replace the table by ``edit(the table as configured)``, checked as :meth:`set` checks;
        under ``--workers N`` on every worker (:mod:`~onnxgate.core.shared_table`): the
        edit is made to the shared table, and this returns once every worker serves the result."""
        async with self._changing:
            share = self._share
            if share is None:
                self._check_shared(what)
                self.set(edit(self.configured), what)
                return
            async with shared_table.locked(share):  # no other worker changes the table meanwhile
                await self._catch_up(share)
                routes = tuple(edit(self.configured))
                self._check(routes, what)
                generation = max(self.generation, self._unusable) + 1  # a change replaces an unusable table
                await shared_table.write_and_unlock(share, generation, [r.to_dict() for r in routes], what)
            self._commit(routes)
            self.generation = generation
            await asyncio.to_thread(share.applied, generation)
        await shared_table.wait_served(share, generation, _WAIT_S)

    async def share_routes(self, share: SharedTable) -> None:
        """Under ``--workers N``: serve the workers' shared table from now on (after the routes
        are first set, before listening: a restarted worker takes up the changes made so far)."""
        await asyncio.to_thread(share.open_lock)
        self._share = share
        await self.catch_up()

    async def catch_up(self) -> None:
        """Take up the shared table if another worker changed it (a bad one is logged, skipped)."""
        if self._share is None:
            return
        try:
            async with self._changing:
                await self._catch_up(self._share)
        except Exception:
            log.exception("routes: the workers' shared route table could not be taken up")

    async def follow(self) -> None:
        """Under ``--workers N``: :meth:`catch_up` every ``shared_table.POLL_S``, until cancelled."""
        while self._share is not None:
            await self.catch_up()
            await asyncio.sleep(shared_table.POLL_S)

    async def _catch_up(self, share: SharedTable) -> None:
        found = await asyncio.to_thread(share.newer, self.generation)
        if found is None:
            return
        generation, docs = found
        # checked by the worker that published it; this one's view of the repository may differ
        # for a moment (a pinned version it has not loaded answers 404 / 503, as after an unload)
        try:
            routes = parse_routes(docs)
        except InvalidInput as exc:  # written by another build of the gateway, or by hand
            if generation != self._unusable:  # once, not at every look
                log.error("routes: generation %d of the workers' shared table is unusable, not taken up: %s",
                          generation, exc.message)
                self._unusable = generation
            return
        self._commit(routes)
        self.generation = generation
        await asyncio.to_thread(share.applied, generation)
        log.info("routes: took up generation %d from the workers' share: %s", generation,
                 sorted(r.name for r in self.configured))

    def apply(self) -> None:
        """Serve the configured routes in their effective form (their rollouts' splits)."""
        table = RouteTable(self.rollouts.effective(r) for r in self.configured)
        self.table = table
        self.sticky = any(r.sticky_header for r in table.routes.values())

    async def put(self, doc: Mapping[str, Any], abort_rollout: bool = False) -> Route:
        """Add or replace one route from its JSON form (validated; the others stay as they are)."""
        route = parse_route(doc)
        if abort_rollout:  # only a change that is valid aborts the rollout it replaces
            RouteTable([route]).validate(self._known_models())
            await self._abort(route.name, "aborted by a route PUT with abort_rollout=true")
        await self.change(lambda routes: [*(r for r in routes if r.name != route.name), route],
                          f"PUT /v2/routes/{route.name}")
        return route

    async def delete(self, name: str, abort_rollout: bool = False) -> None:
        if abort_rollout:
            await self._abort(name, "aborted by a route DELETE with abort_rollout=true")

        def without(routes: tuple[Route, ...]) -> list[Route]:
            if all(r.name != name for r in routes):  # another worker deleted it first
                raise ModelNotFound(f"unknown route '{name}'")
            return [r for r in routes if r.name != name]

        await self.change(without, f"DELETE /v2/routes/{name}")

    def route(self, name: str) -> Route:
        """A route as configured (its ``split`` the configured one; see :meth:`rollout`)."""
        for route in self.configured:
            if route.name == name:
                return route
        raise ModelNotFound(f"unknown route '{name}'")

    async def _abort(self, name: str, reason: str) -> None:
        with contextlib.suppress(ModelNotFound):
            if self.rollouts.get(name).active:
                await self.rollouts.act(name, "abort", reason)

    async def rollout(self, name: str) -> dict:
        """The route's rollout: state, step, gates with their bounds, decisions."""
        self.route(name)
        return await self.rollouts.summary(name)

    async def rollout_action(self, name: str, action: str, reason: str = "", full: bool = False) -> dict:
        """An operator's pause, resume, promote or abort of the route's rollout."""
        self.route(name)  # under --workers N the judging worker applies it (rollout_share)
        return await self.rollouts.act(name, action, reason, full)

    # -- one request on a route under a rollout --------------------------------------------------
    def watch(self, route: Route, target: Target, request: InferRequest, run: RunShadow,
              before_mirror: Callable[[], None]) -> RolloutWatch | None:
        """The rollout's side of one request on ``route`` sent to ``target``: a mirror to the
        candidate when the primary answers (``before_mirror`` first), the candidate's live
        result when it answers; None when the route has no rollout that mirrors."""
        candidate = self.rollouts.mirror_target(route.name) if self.rollouts else None
        if candidate is None:
            return None
        if candidate == target:
            return RolloutWatch(self.rollouts, route.name, None)
        before_mirror()
        mirror = self.shadows.mirror(route.name, target, candidate, self.rollouts.config.mirror_max_in_flight,
                                     request, run, self.rollouts.observer(route.name))
        return RolloutWatch(self.rollouts, route.name, mirror) if mirror is not None else None

    def comparison(self, name: str) -> dict:
        """The route's shadow comparison summary."""
        self.route(name)
        return self.shadows.comparator.summary(name)


class RolloutWatch:
    """How one request ends, told to its route's rollout: the primary's answer goes to the
    candidate's mirror; the candidate's own live answer (no mirror) counts as its result."""

    __slots__ = ("_mirror", "_rollouts", "_route")

    def __init__(self, rollouts: Rollouts, route: str, mirror: Mirror | None) -> None:
        self._rollouts, self._route, self._mirror = rollouts, route, mirror

    def done(self, response: InferResponse, latency_s: float) -> None:
        if self._mirror is not None:
            self._mirror.primary_done(response, latency_s)
        else:
            self._rollouts.live_result(self._route, None)

    def failed(self, error: BaseException) -> None:
        if self._mirror is not None:
            self._mirror.primary_failed()
        else:
            self._rollouts.live_result(self._route, error)
