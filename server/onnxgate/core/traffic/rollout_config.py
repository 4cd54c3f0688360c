"""The ``rollout:`` section of a route: a candidate walked from shadow to 100 % on evidence.

::

    routes:
      - name: fraud
        split: [{target: fraud_v1, weight: 100}]
        rollout:
          candidate: fraud_v2              # model or model:version
          steps: [shadow, 5, 25, 50, 100]  # "shadow": weight 0, mirrored only; then percent
          min_dwell_s: 60                  # at least this long in each step
          max_step_s: 3600                 # too little evidence by then: on_timeout
          min_comparisons: 500             # compared answers a step needs before it can pass
          confidence: 0.95                 # one-sided confidence of every bound
          gates:                           # each optional, at least one
            agreement_min: 0.99            # argmax row agreement with the primary
            abs_diff_p99_max: 0.05         # p99 of the per-request max |primary - candidate|
            error_rate_max: 0.001          # candidate errors / candidate requests
            latency_p99_ratio_max: 1.3     # candidate p99 service time / primary p99
          on_fail: rollback                # rollback | hold
          on_timeout: hold                 # hold | rollback
          webhook: http://alerts.local/rollouts
          mlflow: {promote_alias: champion, rollback_tag: rollout_failed}

Parsing only: what the gates mean is ``rollout_gates``, how steps are walked ``rollout``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from onnxgate.core.traffic.targets import Target
from onnxgate.errors import InvalidInput

SHADOW = "shadow"  # the user's name of step 0: candidate weight 0, mirrored only
DEFAULT_STEPS = (0, 5, 25, 50, 100)
_KEYS = frozenset(
    {
        "candidate",
        "steps",
        "min_dwell_s",
        "max_step_s",
        "min_comparisons",
        "confidence",
        "gates",
        "on_fail",
        "on_timeout",
        "webhook",
        "mlflow",
    }
)
_ACTIONS = ("rollback", "hold")


@dataclass(frozen=True, slots=True)
class Gates:
    """The thresholds a step must pass; None = not gated on that statistic."""

    agreement_min: float | None = None  # argmax row agreement, 0..1
    abs_diff_p99_max: float | None = None  # p99 of the per-request max abs diff, >= 0
    error_rate_max: float | None = None  # candidate errors / candidate requests, 0..1
    latency_p99_ratio_max: float | None = None  # candidate p99 latency / primary p99 latency, > 0

    def to_dict(self) -> dict[str, float]:
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """One route's rollout; ``steps`` are candidate weights in percent, 0 being the shadow step."""

    candidate: Target
    steps: tuple[int, ...] = DEFAULT_STEPS
    min_dwell_s: float = 60.0
    max_step_s: float = 3600.0
    min_comparisons: int = 500
    confidence: float = 0.95
    gates: Gates = Gates()
    on_fail: str = "rollback"  # rollback | hold
    on_timeout: str = "hold"  # hold | rollback
    webhook: str | None = None
    mlflow_promote_alias: str | None = None
    mlflow_rollback_tag: str | None = None

    @property
    def user_steps(self) -> list[int | str]:
        """The steps as the user writes them: ``["shadow", 5, ...]``."""
        return [SHADOW if s == 0 else s for s in self.steps]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> RolloutConfig:
        """Parse the section; raises InvalidInput naming ``where`` and the field."""
        if not isinstance(d, Mapping):
            raise InvalidInput(f"{where}: rollout must be a mapping, got {d!r}")
        unknown = sorted(map(str, set(d) - _KEYS))
        if unknown:
            raise InvalidInput(f"{where}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
        if d.get("candidate") is None:
            raise InvalidInput(f"{where}: candidate is required (the model or model:version rolled out)")
        candidate = Target.parse(d.get("candidate"), f"{where} candidate")
        steps = _steps(d.get("steps"), where)
        min_dwell_s = _number(d, "min_dwell_s", 60.0, where)
        if min_dwell_s < 0:
            raise InvalidInput(f"{where}: min_dwell_s must be >= 0, got {min_dwell_s}")
        max_step_s = _number(d, "max_step_s", 3600.0, where)
        if max_step_s < min_dwell_s or max_step_s <= 0:
            raise InvalidInput(
                f"{where}: max_step_s must be positive and >= min_dwell_s ({min_dwell_s}), got {max_step_s}"
            )
        min_comparisons = d.get("min_comparisons", 500)
        if isinstance(min_comparisons, bool) or not isinstance(min_comparisons, int) or min_comparisons < 1:
            raise InvalidInput(f"{where}: min_comparisons must be an integer >= 1, got {min_comparisons!r}")
        confidence = _number(d, "confidence", 0.95, where)
        if not 0.5 < confidence < 1:
            raise InvalidInput(f"{where}: confidence must be between 0.5 and 1 (exclusive), got {confidence}")
        on_fail = _choice(d, "on_fail", "rollback", where)
        on_timeout = _choice(d, "on_timeout", "hold", where)
        webhook = d.get("webhook")
        if webhook is not None:
            parts = urlsplit(webhook) if isinstance(webhook, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidInput(f"{where}: webhook must be an http(s) URL, got {webhook!r}")
        alias, tag = _mlflow(d.get("mlflow"), where)
        return cls(
            candidate=candidate,
            gates=_gates(d.get("gates"), where),
            steps=steps,
            min_dwell_s=min_dwell_s,
            max_step_s=max_step_s,
            min_comparisons=min_comparisons,
            confidence=confidence,
            on_fail=on_fail,
            on_timeout=on_timeout,
            webhook=webhook,
            mlflow_promote_alias=alias,
            mlflow_rollback_tag=tag,
        )

    def to_dict(self) -> dict[str, Any]:
        """The user's form (``from_dict(to_dict())`` gives the same config)."""
        doc: dict[str, Any] = {
            "candidate": str(self.candidate),
            "steps": self.user_steps,
            "min_dwell_s": self.min_dwell_s,
            "max_step_s": self.max_step_s,
            "min_comparisons": self.min_comparisons,
            "confidence": self.confidence,
            "gates": self.gates.to_dict(),
            "on_fail": self.on_fail,
            "on_timeout": self.on_timeout,
        }
        if self.webhook is not None:
            doc["webhook"] = self.webhook
        mlflow = {
            k: v
            for k, v in (("promote_alias", self.mlflow_promote_alias), ("rollback_tag", self.mlflow_rollback_tag))
            if v is not None
        }
        if mlflow:
            doc["mlflow"] = mlflow
        return doc

    def check_split(self, split: tuple[tuple[Target, float], ...], where: str) -> None:
        """The candidate must not already take traffic in the route's own split."""
        if any(t == self.candidate for t, _ in split):
            raise InvalidInput(f"{where}: candidate '{self.candidate}' is already a target of the split")


def _number(d: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _choice(d: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = d.get(key, default)
    if value not in _ACTIONS:
        raise InvalidInput(f"{where}: {key} must be 'rollback' or 'hold', got {value!r}")
    return value


def _steps(doc: Any, where: str) -> tuple[int, ...]:
    if doc is None:
        return DEFAULT_STEPS
    if not isinstance(doc, list | tuple) or not doc:
        raise InvalidInput(f"{where}: steps must be a non-empty list like [shadow, 5, 25, 50, 100], got {doc!r}")
    steps: list[int] = []
    for i, step in enumerate(doc):
        if step == SHADOW and isinstance(step, str):
            if i:
                raise InvalidInput(f"{where}: steps[{i}]: 'shadow' may only be the first step")
            steps.append(0)
            continue
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 100:
            raise InvalidInput(f"{where}: steps[{i}] must be 'shadow' or an integer percent 1..100, got {step!r}")
        if steps and step <= steps[-1]:
            raise InvalidInput(f"{where}: steps must be strictly increasing, got {list(doc)}")
        steps.append(step)
    if steps[-1] != 100:
        raise InvalidInput(f"{where}: the last step must be 100, got {list(doc)}")
    return tuple(steps)


def _gates(doc: Any, where: str) -> Gates:
    if not isinstance(doc, Mapping):
        raise InvalidInput(f"{where}: gates must be a mapping with at least one of {list(Gates.__slots__)}")
    unknown = sorted(map(str, set(doc) - set(Gates.__slots__)))
    if unknown:
        raise InvalidInput(f"{where}: gates: unknown key(s) {unknown}; known: {list(Gates.__slots__)}")
    values: dict[str, float] = {}
    for key in Gates.__slots__:
        if doc.get(key) is None:
            continue
        value = _number(doc, key, 0.0, f"{where}: gates")
        ok = {
            "agreement_min": 0 <= value <= 1,
            "abs_diff_p99_max": value >= 0,
            "error_rate_max": 0 <= value <= 1,
            "latency_p99_ratio_max": value > 0,
        }[key]
        if not ok:
            rule = {
                "agreement_min": "within 0..1",
                "abs_diff_p99_max": ">= 0",
                "error_rate_max": "within 0..1",
                "latency_p99_ratio_max": "> 0",
            }[key]
            raise InvalidInput(f"{where}: gates.{key} must be {rule}, got {value}")
        values[key] = value
    if not values:
        raise InvalidInput(f"{where}: gates must set at least one of {list(Gates.__slots__)}")
    return Gates(**values)


def _mlflow(doc: Any, where: str) -> tuple[str | None, str | None]:
    if doc is None:
        return None, None
    if not isinstance(doc, Mapping) or set(doc) - {"promote_alias", "rollback_tag"}:
        raise InvalidInput(f"{where}: mlflow must be {{promote_alias, rollback_tag}} (both optional), got {doc!r}")
    out = []
    for key in ("promote_alias", "rollback_tag"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidInput(f"{where}: mlflow.{key} must be a non-empty string, got {value!r}")
        out.append(value)
    return out[0], out[1]
