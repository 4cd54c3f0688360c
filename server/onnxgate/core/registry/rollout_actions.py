"""What a rollout's end does in the model registry (a route's ``rollout.mlflow``):

* ``promote_alias``: when the rollout completes, the alias of the candidate's registered model
  moves to the candidate's version (e.g. ``champion``; a gateway serving that alias follows it);
* ``rollback_tag``: when it rolls back, the candidate's version gets that tag, its value the
  decision's reason (at most 500 characters).

Both only for a candidate served from the MLflow registry (``mlflow://``). The calls run in a
thread, off the loop; a failure is logged and counted (``onnxgate_rollout_registry_failures_total``)
and never holds the rollout back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)


class RolloutRegistryActions:
    """Moves an alias on completion, tags a version on rollback (the repository's ``set_alias``
    and ``tag_version``); ``serving_version(model, version)`` names the version that serves."""

    def __init__(self, repository: Any, serving_version: Callable[[str, str], int | None],
                 registry: CollectorRegistry | None = None) -> None:
        self.repository = repository
        self.serving_version = serving_version
        self.failures = Counter("onnxgate_rollout_registry_failures",
                                "Registry actions of rollouts (alias moves, tags) that failed.", ["route"],
                                registry=registry)
        self._tasks: set[asyncio.Task] = set()

    def notify(self, rollout: Any, decision: dict[str, Any]) -> None:
        """On the loop: a decision of ``rollout``; start its registry action, if it has one."""
        cfg = rollout.config
        action: Callable[[int], None] | None = None
        candidate = cfg.candidate
        if decision.get("phase") == "completed" and cfg.mlflow_promote_alias:
            alias = cfg.mlflow_promote_alias
            action = lambda v: self.repository.set_alias(candidate.model, v, alias)  # noqa: E731
            what = f"alias {alias} -> the candidate's version"
        elif decision.get("decision") == "rollback" and cfg.mlflow_rollback_tag:
            tag, reason = cfg.mlflow_rollback_tag, str(decision.get("reason", ""))[:500]
            action = lambda v: self.repository.tag_version(candidate.model, v, tag, reason)  # noqa: E731
            what = f"tag {tag} on the candidate's version"
        if action is None:
            return
        version = self.serving_version(candidate.model, candidate.version)
        if version is None:
            log.error("rollout %s: %s not set: candidate '%s' has no serving version", rollout.route, what, candidate)
            self.failures.labels(rollout.route).inc()
            return
        task = asyncio.get_running_loop().create_task(self._run(rollout.route, what, action, version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, route: str, what: str, action: Callable[[int], None], version: int) -> None:
        try:
            await asyncio.to_thread(action, version)
            log.info("rollout %s: MLflow %s (version %d)", route, what, version)
        except Exception as exc:
            log.error("rollout %s: MLflow %s failed: %s", route, what, getattr(exc, "message", None) or exc)
            self.failures.labels(route).inc()

    async def close(self, timeout_s: float) -> None:
        """Let running actions finish for up to ``timeout_s``."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(0.1, timeout_s))
