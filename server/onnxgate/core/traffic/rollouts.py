"""Rollouts in a running gateway: every route's candidate walked from shadow to 100 % on evidence.

A route with a ``rollout:`` section (:mod:`rollout_config`) is under this controller's charge
while its rollout is running, paused or holding: its live split is the rollout's
(:meth:`Rollout.split`), and every request its primary targets answer is mirrored to the
candidate (its own budget, independent of the route's ``shadow:``), so the gates always have
paired answers. The gateway section::

    rollouts:
      state_dir: /var/lib/onnxgate/rollouts  # one small state file per route, written atomically;
                                             # "" = in memory only (a restart starts over)
      evaluate_every_s: 1.0                  # how often the gates are judged
      mirror_max_in_flight: 64               # mirrored calls in flight per route, past it dropped

Evidence is gathered on the event loop (plain counters and histograms) and judged in a thread
every ``evaluate_every_s`` (the exact binomial bounds cost milliseconds at large counts), where
the state file is written too. After a restart the state file wins over the config's split
until the rollout completes or is aborted. Latency is judged on execution time, not on
end-to-end latency: a mirrored call runs at low priority and waits longer in its queue, so the
gate compares the execution time of the batch that answered the primary with that of the batch
that answered the candidate, both without their queue wait (:attr:`InferResponse.compute_ns`).

Under ``--workers N`` worker 0 judges on every worker's evidence and the others follow its
state (:mod:`rollout_share`); route changes reach every worker through their shared route table
(:mod:`~onnxgate.core.shared_table`), operators' actions are applied by worker 0 wherever they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from onnxgate.core.inference import InferResponse
from onnxgate.core.metrics import Metrics
from onnxgate.core.sections import check, parse_fields
from onnxgate.core.traffic.rollout import Rollout
from onnxgate.core.traffic.rollout_gates import Evidence
from onnxgate.core.traffic.rollout_share import RolloutShare
from onnxgate.core.traffic.rollout_state import StateStore
from onnxgate.core.traffic.routes import Route, Target
from onnxgate.errors import Conflict, GatewayError, InferenceFailed, ModelNotFound, Unavailable

log = logging.getLogger(__name__)

ACTIONS = ("pause", "resume", "promote", "abort")
_GATE_STATE = {"pass": 1, "pending": 0, "fail": -1}


@dataclass(frozen=True, slots=True)
class RolloutsConfig:
    """The ``rollouts:`` section (module docstring)."""

    state_dir: str = ""
    evaluate_every_s: float = 1.0
    mirror_max_in_flight: int = 64

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RolloutsConfig:
        """Parse the section; raises ``ConfigError``."""
        c = cls(**parse_fields(cls, d or {}, "rollouts"))
        every = c.evaluate_every_s
        check(0.05 <= every <= 3600, f"rollouts.evaluate_every_s must be 0.05..3600, got {every}")
        check(c.mirror_max_in_flight >= 1, f"rollouts.mirror_max_in_flight must be >= 1, got {c.mirror_max_in_flight}")
        return c


def candidate_fault(exc: BaseException) -> bool:
    """Whether a failed candidate call counts against it: the model failed, could not serve, or
    is gone (a pinned version unloaded), not the caller's bad input nor a load shed."""
    return isinstance(exc, InferenceFailed | Unavailable | ModelNotFound) or not isinstance(exc, GatewayError)


class _Metrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.step = Gauge("onnxgate_rollout_step", "The rollout's step index (0 = the first step).", ["route"],
                          registry=r, multiprocess_mode="liveall")
        self.weight = Gauge("onnxgate_rollout_candidate_weight", "The candidate's share of live traffic, percent.",
                            ["route"], registry=r, multiprocess_mode="liveall")
        self.active = Gauge("onnxgate_rollout_active", "1 while the rollout runs, is paused or holds; else 0.",
                            ["route", "phase"], registry=r, multiprocess_mode="liveall")
        self.decisions = Counter("onnxgate_rollout_decisions", "Rollout decisions, by the gates or an operator.",
                                 ["route", "decision"], registry=r)
        self.gate_value = Gauge("onnxgate_rollout_gate_value", "A gate's point estimate in the current step.",
                                ["route", "gate"], registry=r, multiprocess_mode="liveall")
        self.gate_bound = Gauge("onnxgate_rollout_gate_bound",
                                "A gate's one-sided confidence bound on the side that must pass.",
                                ["route", "gate"], registry=r, multiprocess_mode="liveall")
        self.gate_verdict = Gauge("onnxgate_rollout_gate_verdict", "A gate's verdict: 1 pass, 0 pending, -1 fail.",
                                  ["route", "gate"], registry=r, multiprocess_mode="liveall")
        self.comparisons = Gauge("onnxgate_rollout_comparisons", "Paired answers compared in the current step.",
                                 ["route"], registry=r, multiprocess_mode="liveall")

    def show(self, ro: Rollout) -> None:
        name = ro.route
        self.step.labels(name).set(ro.step_index)
        self.weight.labels(name).set(ro.candidate_weight)
        for phase in ("running", "paused", "holding", "rolled_back", "completed", "aborted"):
            self.active.labels(name, phase).set(1 if ro.phase == phase else 0)
        self.comparisons.labels(name).set(ro.evidence.comparisons)
        for g in ro.last_gates:
            self.gate_verdict.labels(name, g.name).set(_GATE_STATE.get(g.verdict, 0))
            if g.value is not None:
                self.gate_value.labels(name, g.name).set(g.value)
            if g.bound is not None:
                self.gate_bound.labels(name, g.name).set(g.bound)


Notify = Callable[[Rollout, dict], None]


class Rollouts:
    """Every route's rollout in this process: its split, its mirror, its evidence, its state file."""

    def __init__(self, metrics: Metrics, config: RolloutsConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.use(config or RolloutsConfig())
        self._rollouts: dict[str, Rollout] = {}
        self._pending: dict[str, Evidence] = {}  # gathered on the loop since the last judgement
        self._saved: dict[str, dict] = {}  # the states read at the start, taken up by configure
        self._lock = threading.Lock()  # the Rollout objects: judged and acted on in threads
        self._metrics = _Metrics(metrics)
        self.on_change: Callable[[], None] = lambda: None  # the service re-applies its routes
        self.notify: list[Notify] = []  # decisions go to these too (webhooks, MLflow)

    # -- configuration -----------------------------------------------------------------------
    def use(self, config: RolloutsConfig, share: RolloutShare | None = None, state_dir: str = "") -> None:
        """Take the ``rollouts:`` section (before the routes are first set); under ``--workers N``
        the workers' ``share`` and the state directory they use (the section's, or a private one)."""
        self.config = config
        self.share = share
        directory = config.state_dir or state_dir
        self.store = StateStore(directory) if directory else None

    @property
    def judges(self) -> bool:
        """Whether this process judges the gates and writes the state (not a following worker)."""
        return self.share is None or self.share.leader

    def load_states(self) -> None:
        """Read the saved states (blocking: in a thread, before the routes are first set)."""
        if self.store is None or not self.store.directory.is_dir():  # made by the first save
            return
        for name in self.store.routes():
            if (state := self.store.load(name)) is not None:
                self._saved[name] = state

    def configure(self, routes: Iterable[Route]) -> None:
        """Follow a new route table: a rollout per route with a ``rollout:`` section (the same
        config keeps its running rollout; a new one takes up its saved state when that matches)."""
        new: dict[str, Rollout] = {}
        for route in routes:
            if route.rollout is None:
                continue
            old = self._rollouts.get(route.name)
            if old is not None and old.config == route.rollout:
                new[route.name] = old
                continue
            state = self._saved.pop(route.name, None)
            if state is None and old is not None:  # new gates or timings: the same walk goes on
                state = old.to_state()
            new[route.name] = Rollout(route.name, route.rollout, self.clock, state)
            if new[route.name].resumed:
                log.info("rollout %s: resumed at step %d (%s) from its state file", route.name,
                         new[route.name].step_index, new[route.name].phase)
        self._rollouts = new
        self._pending = {n: e for n, e in self._pending.items() if n in new}
        for ro in new.values():
            self._metrics.show(ro)

    def check_change(self, current: Mapping[str, Route], proposed: Mapping[str, Route], what: str) -> None:
        """Raise :class:`Conflict` when ``proposed`` changes a route whose rollout is active."""
        for name, ro in self._rollouts.items():
            if ro.active and current.get(name) != proposed.get(name):
                raise Conflict(
                    f"route '{name}' is under a rollout ({ro.phase} at step {ro.step_index}, candidate "
                    f"'{ro.config.candidate}'): {what} would change it; abort the rollout first "
                    f"(POST /v2/routes/{name}/rollout/abort), or PUT the route with ?abort_rollout=true"
                )

    def effective(self, route: Route) -> Route:
        """The route as it serves now: its split the rollout's."""
        ro = self._rollouts.get(route.name)
        if ro is None:
            return route
        split = ro.split(route.split)
        return route if split == route.split else dataclasses.replace(route, split=split)

    def get(self, name: str) -> Rollout:
        route_rollout = self._rollouts.get(name)
        if route_rollout is None:
            raise ModelNotFound(f"route '{name}' has no rollout")
        return route_rollout

    def __bool__(self) -> bool:
        return bool(self._rollouts)

    # -- evidence, on the loop ---------------------------------------------------------------
    def mirror_target(self, name: str) -> Target | None:
        """The candidate that requests of route ``name`` are mirrored to, or None."""
        ro = self._rollouts.get(name)
        return ro.config.candidate if ro is not None and ro.mirroring else None

    def _evidence(self, name: str) -> Evidence:
        ev = self._pending.get(name)
        if ev is None:
            ev = self._pending[name] = Evidence()
        return ev

    def live_result(self, name: str, error: BaseException | None) -> None:
        """A live request the candidate answered (error None) or failed."""
        if error is None or candidate_fault(error):
            self._evidence(name).add_candidate(error is None)

    def observer(self, name: str) -> Callable[..., None]:
        """What the shadow runner calls when a mirrored call to the candidate ends."""

        def observe(primary: InferResponse | None, answer: InferResponse | None, error: BaseException | None,
                    shed: bool, comparison: Mapping[str, Any] | None) -> None:
            ev = self._evidence(name)
            if error is not None:
                if not shed and candidate_fault(error):
                    ev.add_candidate(False)
                return
            if answer is None:
                return
            ev.add_candidate(True)
            if primary is None or comparison is None:
                return
            rows = agree = 0
            worst: float | None = None
            for entry in comparison.get("outputs", {}).values():
                rows += entry.get("rows", 0)
                agree += entry.get("rows_agree", 0)
                if "max_abs_diff" in entry:
                    worst = max(worst or 0.0, entry["max_abs_diff"])
            ev.add_comparison(rows, agree, worst, _seconds(primary.compute_ns), _seconds(answer.compute_ns))

        return observe

    # -- judgement ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Judge every rollout every ``evaluate_every_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.evaluate_every_s)
            try:
                await self.evaluate()
            except Exception:
                log.exception("rollouts: evaluation failed")

    async def evaluate(self) -> list[dict]:
        """Hand the gathered evidence over and judge every rollout now; the decisions taken."""
        if not self._rollouts:
            return []
        batches, self._pending = self._pending, {}
        rollouts = dict(self._rollouts)
        if self.judges:
            decided = await asyncio.to_thread(self._judge, rollouts, batches)
            self._decided(decided)
            return [d for _, d in decided]
        if await asyncio.to_thread(self._follow, rollouts, batches):
            self._decided([])
            self.on_change()
        return []

    def _judge(self, rollouts: dict[str, Rollout], batches: dict[str, Evidence]) -> list[tuple[Rollout, dict]]:
        decided = []
        share = self.share
        with self._lock:
            for name, ro in rollouts.items():
                if (ev := batches.get(name)) is not None:
                    ro.add(ev)
                if share is not None:
                    ro.add(share.take_evidence(name, ro.step_key))
                if (d := ro.tick()) is not None:
                    decided.append((ro, d))
                self._save(ro)
            if share is not None:
                decided += self._apply_requests(rollouts)
        return decided

    def _apply_requests(self, rollouts: dict[str, Rollout]) -> list[tuple[Rollout, dict]]:
        """The judging worker: the operators' actions that reached the other workers."""
        assert self.share is not None
        decided = []
        for ident, req in self.share.pending():
            ro = rollouts.get(req.get("route", ""))
            try:
                if ro is None:
                    raise ModelNotFound(f"route '{req.get('route')}' has no rollout")
                decision = self._apply(ro, str(req.get("action")), str(req.get("reason", "")), bool(req.get("full")))
            except GatewayError as exc:
                self.share.answer(ident, None, exc)
                continue
            decided.append((ro, decision))
            self.share.answer(ident, decision)
        return decided

    def _follow(self, rollouts: dict[str, Rollout], batches: dict[str, Evidence]) -> bool:
        """A following worker: hand over its evidence, take up the judging worker's states;
        whether a step or phase changed."""
        assert self.share is not None
        changed = False
        with self._lock:
            for name, ro in rollouts.items():
                if (ev := batches.get(name)) is not None and ro.mirroring:
                    try:
                        self.share.put_evidence(name, ro.step_key, ev)
                    except OSError as exc:
                        log.error("rollout %s: evidence not handed over: %s", name, exc)
                if self.store is not None and (state := self.store.load(name)) is not None:
                    changed = ro.adopt(state) or changed
        return changed

    def _save(self, ro: Rollout) -> None:
        if self.store is None or not self.judges:
            return
        try:
            self.store.save(ro.route, ro.to_state())
        except OSError as exc:
            log.error("rollout %s: state file not written: %s", ro.route, exc)

    def _decided(self, decided: list[tuple[Rollout, dict]]) -> None:
        for ro in self._rollouts.values():
            self._metrics.show(ro)
        for ro, d in decided:
            self._metrics.decisions.labels(ro.route, d["decision"]).inc()
            for notify in self.notify:
                with contextlib.suppress(Exception):
                    notify(ro, d)
        if decided:
            self.on_change()

    # -- operators ---------------------------------------------------------------------------
    async def summary(self, name: str) -> dict:
        """GET /v2/routes/{name}/rollout."""
        ro = self.get(name)
        return await asyncio.to_thread(self._locked, ro.summary)

    async def act(self, name: str, action: str, reason: str = "", full: bool = False) -> dict:
        """An operator's ``pause``, ``resume``, ``promote`` (``full``: to 100 %) or ``abort``;
        the decision. Raises :class:`Conflict` when the rollout's phase does not allow it."""
        _check_action(action)
        ro = self.get(name)
        if not self.judges:  # the judging worker applies it
            assert self.share is not None
            decision = await asyncio.to_thread(self.share.request, name, action, reason, full)
            if await asyncio.to_thread(self._follow, {name: ro}, {}):
                self.on_change()
            return decision
        decision = await asyncio.to_thread(self._locked, lambda: self._apply(ro, action, reason, full))
        self._decided([(ro, decision)])
        return decision

    def _apply(self, ro: Rollout, action: str, reason: str, full: bool) -> dict:
        _check_action(action)
        decision = ro.promote(full) if action == "promote" else getattr(ro, action)(reason)
        self._save(ro)
        return decision

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            return fn()

    async def close(self) -> None:
        """Judge what was gathered last and write every state file (the drain)."""
        with contextlib.suppress(Exception):
            await self.evaluate()


def _check_action(action: str) -> None:
    """An action of an operator, checked where it arrives and where it is applied (a follower
    worker's request reaches the judging worker as a file)."""
    if action not in ACTIONS:
        raise ModelNotFound(f"unknown rollout action '{action}'; use one of {', '.join(ACTIONS)}")


def _seconds(ns: int) -> float | None:
    return ns / 1e9 if ns > 0 else None
