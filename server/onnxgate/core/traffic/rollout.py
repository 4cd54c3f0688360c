"""The state machine of one route's rollout: shadow, then live steps, to 100 % or back to 0.

::

                  gates pass, dwell and comparisons done
       running ───────────────────────────────────────────► next step (running) ... ► completed
        │  │  ▲                                              (weight 100, candidate alone)
        │  │  └──── resume ──── paused ◄── pause
        │  │
        │  └─ a gate fails ─► rolled_back (on_fail: rollback; weight 0)  ── resume ─► step 0
        │                  └► holding    (on_fail: hold; stays, until an operator acts)
        └─ max_step_s without passing ─► holding (on_timeout: hold; still judged, may advance)
                                      └► rolled_back (on_timeout: rollback)
       any but completed/aborted ── abort ─► aborted (weight 0, final)

Pure: no I/O, no tasks, an injected clock. The caller merges the evidence that its mirrored
and live requests produce (``add``), calls ``tick`` now and then, applies ``split`` to the
route, saves ``to_state()`` and reacts to the decisions (alerts, the MLflow alias). Every
decision is a dict appended to ``history``: ``time``, ``decision`` (advance, complete, hold,
rollback by the gates; pause, resume, promote, abort by an operator), ``from_step``,
``to_step`` (step indexes), ``weight`` (the candidate's, after), ``phase`` (after), ``reason``
(a sentence), ``by`` (``gates`` or ``operator``), ``alert`` (hold and rollback by the gates)
and ``gates`` (the verdicts it was taken on).

A fail acts at once, even before ``min_dwell_s``. A hold after a timeout is still judged at
every tick and advances when the gates pass; a hold after a failed gate waits for an operator.
Resuming from a failed hold starts the step's evidence afresh (the old would fail again).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from onnxgate.core.traffic.rollout_config import RolloutConfig
from onnxgate.core.traffic.rollout_gates import Evidence, GateResult, evaluate
from onnxgate.core.traffic.routes import Target
from onnxgate.errors import Conflict

log = logging.getLogger(__name__)

PHASES = ("running", "paused", "holding", "rolled_back", "completed", "aborted")
ACTIVE = frozenset({"running", "paused", "holding"})
HISTORY_KEEP = 100  # decisions kept in memory and in the state
STATE_VERSION = 1


class RolloutConflict(Conflict):
    """An operator action the rollout's phase does not allow (a conflict with its state)."""


class Rollout:
    """One route's rollout of ``config.candidate``."""

    def __init__(
        self,
        route: str,
        config: RolloutConfig,
        clock: Callable[[], float] = time.time,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.route = route
        self.config = config
        self.clock = clock
        self.phase = "running"
        self.step_index = 0
        self.step_started = clock()
        self.evidence = Evidence()
        self.history: list[dict[str, Any]] = []
        self.last_gates: list[GateResult] = []
        self.reason = ""  # why it is paused, holding, rolled back or aborted
        self.hold_cause: str | None = None  # holding: "timeout" or "fail"
        self.resumed = False  # whether ``state`` was taken up
        if state is not None:
            if not self.matches(state):
                log.info("rollout %s: the saved state is of another candidate or steps; starting afresh", route)
            else:
                try:
                    self._restore(state)
                    self.resumed = True
                except (KeyError, TypeError, ValueError) as exc:  # checked before anything is taken up
                    log.warning("rollout %s: the saved state is unusable (%s); starting afresh", route, exc)

    # ---- what the route sees ----

    @property
    def active(self) -> bool:
        """Running, paused or holding: the route is under the rollout's control."""
        return self.phase in ACTIVE

    @property
    def mirroring(self) -> bool:
        """Whether requests the primary answers are mirrored to the candidate."""
        return self.phase in ACTIVE

    @property
    def candidate_weight(self) -> int:
        """The candidate's share of live traffic, in percent."""
        if self.phase == "completed":
            return 100
        return self.config.steps[self.step_index] if self.active else 0

    def split(self, base: tuple[tuple[Target, float], ...]) -> tuple[tuple[Target, float], ...]:
        """The route's effective split: the candidate at ``candidate_weight`` percent, the base
        targets scaled into the rest (zero weights dropped); the base unchanged when inactive."""
        candidate = self.config.candidate
        if self.phase == "completed":
            return ((candidate, 100.0),)
        weight = self.candidate_weight
        if not self.active or weight == 0:
            return base
        total = sum(w for _, w in base)
        rest = 100.0 - weight
        out: list[tuple[Target, float]] = []
        share = float(weight)
        for target, w in base:
            scaled = w * rest / total if total > 0 else 0.0
            if target == candidate:
                share += scaled
            elif scaled > 0:
                out.append((target, scaled))
        return (*out, (candidate, share))  # base first: it stays the primary on a tie

    def add(self, evidence: Evidence) -> None:
        """Merge evidence into the current step's (ignored when not mirroring)."""
        if self.mirroring:
            self.evidence.merge(evidence)

    # ---- the gates ----

    def tick(self) -> dict[str, Any] | None:
        """Judge the current step now; the decision taken (also appended to history) or None."""
        if self.phase not in ("running", "holding"):
            return None
        cfg = self.config
        now = self.clock()
        gates = self.last_gates = evaluate(self.evidence, cfg.gates, cfg.confidence)
        if self.phase == "holding" and self.hold_cause == "fail":
            return None  # an operator decides
        failed = [g for g in gates if g.verdict == "fail"]
        if failed:
            reason = f"{self._where()}: gate failed: " + "; ".join(g.describe() for g in failed)
            return self._fall_back(cfg.on_fail, "fail", now, reason, gates)
        elapsed = now - self.step_started
        ev = self.evidence
        if (
            elapsed >= cfg.min_dwell_s
            and ev.comparisons >= cfg.min_comparisons
            and all(g.verdict == "pass" for g in gates)
        ):
            passed = "; ".join(g.describe() for g in gates) or "no gates"
            reason = f"{self._where()} passed after {elapsed:.0f} s and {ev.comparisons} comparisons: {passed}"
            if self.step_index == len(cfg.steps) - 1:
                return self._complete(now, "complete", reason, gates, "gates")
            return self._step(now, "advance", reason, gates, "gates")
        if self.phase == "running" and elapsed >= cfg.max_step_s:
            missing = []
            if ev.comparisons < cfg.min_comparisons:
                missing.append(f"{ev.comparisons} of {cfg.min_comparisons} comparisons")
            missing += [g.describe() for g in gates if g.verdict != "pass"]
            reason = (
                f"too little evidence after {elapsed:.0f} s (max_step_s {cfg.max_step_s:g}) in {self._where()}: "
                + "; ".join(missing)
            )
            return self._fall_back(cfg.on_timeout, "timeout", now, reason, gates)
        return None

    def _fall_back(self, action: str, cause: str, now: float, reason: str, gates: list[GateResult]) -> dict:
        start = self.step_index
        if action == "rollback":
            self.phase, self.hold_cause = "rolled_back", None
        else:
            self.phase, self.hold_cause = "holding", cause
        self.reason = reason
        return self._record(now, action, start, reason, gates, "gates", alert=True)

    # ---- operator actions ----

    def pause(self, reason: str = "") -> dict[str, Any]:
        """Stop judging (evidence still gathers, weights stay) until ``resume``."""
        self._require(("running", "holding"), "pause")
        now = self.clock()
        self.phase = "paused"
        self.reason = reason or "paused by an operator"
        return self._record(now, "pause", self.step_index, self.reason, [], "operator")

    def resume(self, reason: str = "") -> dict[str, Any]:
        """Paused or holding: run again, the step's timer restarted (its evidence afresh after a
        failed gate). Rolled back: start over at step 0 with fresh evidence."""
        self._require(("paused", "holding", "rolled_back"), "resume")
        now, start = self.clock(), self.step_index
        if self.phase == "rolled_back":
            self.step_index = 0
            self.evidence = Evidence()
        elif self.hold_cause == "fail":
            self.evidence = Evidence()
        self.phase, self.hold_cause, self.reason = "running", None, ""
        self.step_started = now
        self.last_gates = []
        reason = reason or f"resumed by an operator at {self._where()}"
        return self._record(now, "resume", start, reason, [], "operator")

    def promote(self, full: bool = False) -> dict[str, Any]:
        """Go to the next step now, or (``full``, or from the last step) complete."""
        self._require(tuple(ACTIVE), "promote")
        now = self.clock()
        gates = evaluate(self.evidence, self.config.gates, self.config.confidence)
        if full or self.step_index == len(self.config.steps) - 1:
            return self._complete(
                now, "promote", f"promoted to 100 % by an operator from {self._where()}", gates, "operator"
            )
        return self._step(now, "promote", f"promoted by an operator from {self._where()}", gates, "operator")

    def abort(self, reason: str = "") -> dict[str, Any]:
        """Stop for good: candidate weight 0, no mirroring."""
        self._require(("running", "paused", "holding", "rolled_back"), "abort")
        now = self.clock()
        self.phase, self.hold_cause = "aborted", None
        self.reason = reason or "aborted by an operator"
        return self._record(now, "abort", self.step_index, self.reason, [], "operator")

    def _require(self, phases: tuple[str, ...], action: str) -> None:
        if self.phase not in phases:
            raise RolloutConflict(
                f"rollout of route '{self.route}' is {self.phase}: cannot {action} (only when {' or '.join(phases)})"
            )

    # ---- moves ----

    def _where(self) -> str:
        step = self.config.steps[self.step_index]
        return f"step {self.step_index} ({'shadow' if step == 0 else f'{step} %'})"

    def _step(self, now: float, decision: str, reason: str, gates: list[GateResult], by: str) -> dict:
        if self.config.steps[self.step_index + 1] == 100:  # the candidate takes all: it is the primary now
            return self._complete(now, "complete" if by == "gates" else decision, reason, gates, by)
        start = self.step_index
        self.step_index += 1
        self.phase, self.hold_cause, self.reason = "running", None, ""
        self.step_started = now
        self.evidence = Evidence()
        return self._record(now, decision, start, reason, gates, by)

    def _complete(self, now: float, decision: str, reason: str, gates: list[GateResult], by: str) -> dict:
        start = self.step_index
        self.step_index = len(self.config.steps) - 1
        self.phase, self.hold_cause, self.reason = "completed", None, ""
        return self._record(now, decision, start, reason, gates, by)

    def _record(
        self, now: float, decision: str, start: int, reason: str, gates: list[GateResult], by: str, alert: bool = False
    ) -> dict[str, Any]:
        entry = {
            "time": now,
            "decision": decision,
            "from_step": start,
            "to_step": self.step_index,
            "weight": self.candidate_weight,
            "phase": self.phase,
            "reason": reason,
            "by": by,
            "alert": alert,
            "gates": [g.to_dict() for g in gates],
        }
        self.history.append(entry)
        del self.history[:-HISTORY_KEEP]
        log.info("rollout %s: %s, candidate weight %d %%: %s", self.route, decision, self.candidate_weight, reason)
        return entry

    # ---- state and views ----

    def matches(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` is of this rollout: the same candidate and steps."""
        return (
            isinstance(state, Mapping)
            and state.get("candidate") == str(self.config.candidate)
            and state.get("steps") == self.config.user_steps
        )

    def adopt(self, state: Mapping[str, Any]) -> bool:
        """Take up another process's state of this rollout (``--workers N``: the judging
        worker's); whether the step or the phase changed. A state of another candidate or steps,
        or an unusable one, is ignored."""
        if not self.matches(state):
            return False
        before = (self.phase, self.step_index, self.step_started)
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("rollout %s: the judging worker's state is unusable (%s)", self.route, exc)
            return False
        return (self.phase, self.step_index, self.step_started) != before

    @property
    def step_key(self) -> tuple[int, float]:
        """The current step, as evidence handed between processes is tagged with."""
        return (self.step_index, self.step_started)

    def to_state(self) -> dict[str, Any]:
        """JSON-able; the constructor's ``state`` takes it up again."""
        return {
            "version": STATE_VERSION,
            "route": self.route,
            "candidate": str(self.config.candidate),
            "steps": self.config.user_steps,
            "phase": self.phase,
            "step_index": self.step_index,
            "step_started": self.step_started,
            "evidence": self.evidence.to_dict(),
            "history": self.history[-HISTORY_KEEP:],
            "reason": self.reason,
            "hold_cause": self.hold_cause,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r}, not {STATE_VERSION}")
        phase, index, started = state["phase"], state["step_index"], state["step_started"]
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.config.steps):
            raise ValueError(f"step_index {index!r} outside the steps")
        if isinstance(started, bool) or not isinstance(started, int | float) or not math.isfinite(started):
            raise ValueError(f"step_started {started!r} is not a time")
        history, reason, cause = state.get("history", []), state.get("reason", ""), state.get("hold_cause")
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("history must be a list of decisions")
        if not isinstance(reason, str) or cause not in (None, "timeout", "fail"):
            raise ValueError("reason or hold_cause malformed")
        self.evidence = Evidence.from_dict(state["evidence"])
        self.phase, self.step_index, self.step_started = phase, index, float(started)
        self.history = list(history[-HISTORY_KEEP:])
        self.reason, self.hold_cause = reason, cause

    def summary(self) -> dict[str, Any]:
        """The rollout as GET /v2/routes/{name}/rollout shows it (the gates judged now)."""
        cfg, ev = self.config, self.evidence
        now = self.clock()
        return {
            "route": self.route,
            "candidate": str(cfg.candidate),
            "phase": self.phase,
            "reason": self.reason,
            "step_index": self.step_index,
            "steps": cfg.user_steps,
            "candidate_weight": self.candidate_weight,
            "mirroring": self.mirroring,
            "step_started": self.step_started,
            "elapsed_s": now - self.step_started,
            "comparisons": ev.comparisons,
            "min_comparisons": cfg.min_comparisons,
            "min_dwell_s": cfg.min_dwell_s,
            "max_step_s": cfg.max_step_s,
            "candidate_requests": ev.candidate_requests,
            "candidate_errors": ev.candidate_errors,
            "confidence": cfg.confidence,
            "gates": [g.to_dict() for g in evaluate(ev, cfg.gates, cfg.confidence)],
            "history": list(self.history),
        }
