"""The rollout endpoints' part of the OpenAPI document: a route's ``rollout`` section, the state
``GET /v2/routes/{route}/rollout`` answers, the decisions, and the 409 a change under a running
rollout gets. :mod:`openapi_schemas` merges these into its tables."""

from __future__ import annotations

from onnxgate.frontends.openapi_parts import BOOL, COUNT, NUM, STR, Schema, body, obj, ok, ref

_NUM_OR_NULL: Schema = {"type": "number", "nullable": True}
_PHASES = ["running", "paused", "holding", "rolled_back", "completed", "aborted"]
_DECISIONS = ["advance", "complete", "hold", "rollback", "pause", "resume", "promote", "abort"]
_STEP: Schema = {"oneOf": [{"type": "string", "enum": ["shadow"]}, {"type": "integer", "minimum": 1, "maximum": 100}]}


SCHEMAS: dict[str, Schema] = {
    "RolloutConfig": obj(
        {
            "candidate": {**STR, "description": "model or model:version"},
            "steps": {"type": "array", "items": _STEP, "minItems": 1,
                      "description": "shadow (mirrored only), then the candidate's weight in percent; ends at 100"},
            "min_dwell_s": {"type": "number", "minimum": 0},
            "max_step_s": {"type": "number", "minimum": 0},
            "min_comparisons": {"type": "integer", "minimum": 1},
            "confidence": {"type": "number", "exclusiveMinimum": True, "minimum": 0.5, "exclusiveMaximum": True,
                           "maximum": 1},
            "gates": obj({k: {"type": "number", "minimum": 0} for k in (
                "agreement_min", "abs_diff_p99_max", "error_rate_max", "latency_p99_ratio_max")},
                additionalProperties=False),
            "on_fail": {"type": "string", "enum": ["rollback", "hold"]},
            "on_timeout": {"type": "string", "enum": ["rollback", "hold"]},
            "webhook": {**STR, "description": "http(s) URL: a CloudEvent per decision"},
            "mlflow": obj({"promote_alias": STR, "rollback_tag": STR}, additionalProperties=False),
        },
        ("candidate",),
        additionalProperties=False,
        description="A candidate walked from shadow to 100 % on its gates (README \"Rollouts\")",
    ),
    "GateResult": obj(
        {
            "name": {"type": "string", "enum": ["agreement", "abs_diff_p99", "error_rate", "latency_p99_ratio"]},
            "threshold": NUM,
            "value": {**_NUM_OR_NULL, "description": "The point estimate"},
            "bound": {**_NUM_OR_NULL, "description": "The one-sided bound on the side that must pass"},
            "fail_bound": {**_NUM_OR_NULL, "description": "The bound on the other side: past the threshold, fail"},
            "verdict": {"type": "string", "enum": ["pass", "pending", "fail"]},
            "samples": COUNT,
            "confidence": NUM,
        },
        ("name", "threshold", "value", "bound", "verdict"),
    ),
    "RolloutDecision": obj(
        {
            "time": {**NUM, "description": "Unix seconds"},
            "decision": {"type": "string", "enum": _DECISIONS},
            "from_step": COUNT,
            "to_step": COUNT,
            "weight": {"type": "integer", "minimum": 0, "maximum": 100},
            "phase": {"type": "string", "enum": _PHASES},
            "reason": STR,
            "by": {"type": "string", "enum": ["gates", "operator"]},
            "alert": BOOL,
            "gates": {"type": "array", "items": ref("GateResult")},
        },
        ("time", "decision", "from_step", "to_step", "weight", "reason"),
    ),
    "Rollout": obj(
        {
            "route": STR,
            "candidate": STR,
            "phase": {"type": "string", "enum": _PHASES},
            "reason": STR,
            "step_index": COUNT,
            "steps": {"type": "array", "items": _STEP},
            "candidate_weight": {"type": "integer", "minimum": 0, "maximum": 100},
            "mirroring": BOOL,
            "step_started": NUM,
            "elapsed_s": NUM,
            "comparisons": COUNT,
            "min_comparisons": COUNT,
            "min_dwell_s": NUM,
            "max_step_s": NUM,
            "candidate_requests": COUNT,
            "candidate_errors": COUNT,
            "confidence": NUM,
            "gates": {"type": "array", "items": ref("GateResult")},
            "history": {"type": "array", "items": ref("RolloutDecision")},
        },
        ("route", "candidate", "phase", "step_index", "steps", "candidate_weight", "gates", "history"),
        description="A route's rollout now: its step, the gates judged on this step's evidence, its decisions",
    ),
    "RolloutAction": obj(
        {"reason": {**STR, "maxLength": 500, "description": "Kept in the decision and the audit log"},
         "full": {**BOOL, "description": "promote: to 100 % at once, not the next step"}},
        additionalProperties=False,
    ),
}

PARAMETERS: dict[str, Schema] = {
    "action": {"name": "action", "in": "path", "required": True, "description": "What to do",
               "schema": {"type": "string", "enum": ["pause", "resume", "promote", "abort"]}},
    "abortRollout": {"name": "abort_rollout", "in": "query", "required": False,
                     "description": "true: abort the route's running rollout and make the change (without it, a "
                     "change to a route under a rollout is 409)", "schema": {"type": "boolean"}},
}

CONFLICT: Schema = {
    "description": "The route is under a running rollout (abort it first, or ?abort_rollout=true), or the "
    "rollout's phase does not allow the action",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


# The rollout endpoints' entries of ``openapi_schemas.OPERATIONS``.
OPERATIONS: dict[str, dict] = {
    "routes.rollout": {"ok": ok(ref("Rollout")), "errors": ("NotFound",)},
    "routes.rollout_action": {
        "ok": ok(ref("RolloutDecision"), "The decision taken"),
        "body": body(ref("RolloutAction")),
        "errors": ("BadRequest", "NotFound", "Conflict", "PayloadTooLarge", "Unsupported"),
    },
}
