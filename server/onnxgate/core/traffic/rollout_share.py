"""Rollouts under ``--workers N``: one worker judges, on the whole gateway's evidence.

Worker 0 is the leader: it alone judges the gates, saves the state files and tells the webhooks
and the registry. Every worker gathers evidence from the requests it serves; the others hand
theirs over as files, and follow the leader's state files. All of it lives in one directory the
workers share (``<rollouts.state_dir>/shared``, else the supervisor's statistics directory)::

    evidence/<route key>-<pid>-<n>.json   a worker's evidence since its last hand-over, for one step
    actions/<id>.json                     an operator's action that reached another worker
    answers/<id>.json                     the leader's decision on it (or why it refused)

Evidence is tagged with its step (index and start time): what was gathered for a step the leader
has left is dropped, never counted for the next. An operator's action that reaches a follower is
written for the leader, which applies it at its next judgement; the follower answers the client
with the leader's decision (or its refusal: 409, 404), waiting at most ``ACTION_TIMEOUT_S``.
A follower adopts the leader's state (step, phase, evidence, history) at every judgement, so
every worker serves the same split within one ``evaluate_every_s`` of a decision.

Files are written whole and renamed into place; a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from onnxgate.core.shared_table import read_json, write_json
from onnxgate.core.traffic.rollout_gates import Evidence
from onnxgate.errors import Conflict, GatewayError, ModelNotFound, Unavailable

log = logging.getLogger(__name__)

ACTION_TIMEOUT_S = 10.0
_STALE_S = 600.0  # an action or answer file older than this is removed


def _key(route: str) -> str:
    return hashlib.sha256(route.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class RolloutShare:
    """The shared directory of the workers' rollouts (module docstring); blocking: in threads."""

    def __init__(self, directory: str | Path, leader: bool) -> None:
        self.directory = Path(directory)
        self.leader = leader
        self._sent = 0

    # -- evidence ------------------------------------------------------------------------------
    def put_evidence(self, route: str, step: tuple[int, float], evidence: Evidence) -> None:
        """A follower hands over what it gathered for ``step`` of ``route``'s rollout."""
        self._sent += 1
        path = self.directory / "evidence" / f"{_key(route)}-{os.getpid()}-{self._sent}.json"
        write_json(path, {"route": route, "step": list(step), "evidence": evidence.to_dict()})

    def take_evidence(self, route: str, step: tuple[int, float]) -> Evidence:
        """The leader takes every worker's hand-over for ``route``: merged, the files removed;
        what was gathered for another step is dropped."""
        total = Evidence()
        folder = self.directory / "evidence"
        if not folder.is_dir():
            return total
        for path in sorted(folder.glob(f"{_key(route)}-*.json")):
            doc = read_json(path)
            path.unlink(missing_ok=True)
            if doc is None or doc.get("route") != route or doc.get("step") != list(step):
                continue
            try:
                total.merge(Evidence.from_dict(doc["evidence"]))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("rollouts: evidence %s unusable: %s", path.name, exc)
        return total

    # -- operators' actions ---------------------------------------------------------------------
    def request(self, route: str, action: str, reason: str, full: bool) -> dict[str, Any]:
        """A follower: have the leader apply ``action``; its decision, or the error it raised."""
        ident = uuid.uuid4().hex
        write_json(self.directory / "actions" / f"{ident}.json",
               {"route": route, "action": action, "reason": reason, "full": full, "time": time.time()})
        answer = self.directory / "answers" / f"{ident}.json"
        deadline = time.monotonic() + ACTION_TIMEOUT_S
        while time.monotonic() < deadline:
            if answer.exists() and (doc := read_json(answer)) is not None:
                answer.unlink(missing_ok=True)
                if "decision" in doc:
                    return doc["decision"]
                kind = {"conflict": Conflict, "not_found": ModelNotFound}.get(doc.get("kind", ""), GatewayError)
                raise kind(str(doc.get("error", "refused")))
            time.sleep(0.05)
        (self.directory / "actions" / f"{ident}.json").unlink(missing_ok=True)
        raise Unavailable(f"the worker that judges rollouts did not answer within {ACTION_TIMEOUT_S:g} s; retry")

    def pending(self) -> list[tuple[str, dict[str, Any]]]:
        """The leader: the actions waiting for it, oldest first, as (id, request)."""
        folder = self.directory / "actions"
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime if p.exists() else 0):
            doc = read_json(path)
            path.unlink(missing_ok=True)
            if doc is not None and time.time() - float(doc.get("time", 0)) < _STALE_S:
                out.append((path.stem, doc))
        return out

    def answer(self, ident: str, decision: dict[str, Any] | None, error: GatewayError | None = None) -> None:
        """The leader: the decision on action ``ident`` (or the error that refused it)."""
        doc: dict[str, Any] = {"decision": decision} if error is None else {
            "error": error.message,
            "kind": "conflict" if isinstance(error, Conflict) else "not_found" if isinstance(error, ModelNotFound)
            else "other",
        }
        write_json(self.directory / "answers" / f"{ident}.json", doc)
