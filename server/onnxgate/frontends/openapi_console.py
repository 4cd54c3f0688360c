"""The console's part of the OpenAPI document: ``GET /v2/models/summary`` (the JSON the console
shows, for anyone) and the console's static files (``GET /console``, ``/console/{file}``).
:mod:`openapi_schemas` merges these into its tables."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_STR: Schema = {"type": "string"}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_BOOL: Schema = {"type": "boolean"}
_NUM: Schema = {"type": "number"}


def _null(description: str) -> Schema:
    return {"type": "number", "minimum": 0, "nullable": True, "description": description}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


_WINDOW = "over the window (null when it covers no time)"
_VERSION_FIELDS: dict[str, Schema] = {
    "version": {"type": "integer", "minimum": 1},
    "state": {"type": "string", "description": "READY, UNAVAILABLE, LOADING, ..., as in the repository index"},
    "reason": {**_STR, "description": "Why it is not ready (a load failure's message); text, never markup"},
    "provider": {**_STR, "description": "The ONNX Runtime execution provider of its first instance"},
    "instances": _COUNT,
    "queue_depth": {**_COUNT, "description": "Requests waiting in its queue now (this worker's)"},
    "inference_count": {**_COUNT, "description": "Rows answered since it loaded (every worker's)"},
    "request_rate": _null("Requests answered or failed a second, " + _WINDOW),
    "failure_rate": _null("Requests failed a second, " + _WINDOW),
    "row_rate": _null("Rows a second, " + _WINDOW),
    "latency_mean_ms": _null("Mean request latency of its successes, " + _WINDOW),
    "queue_p50_ms": _null("Queue wait median, from onnxgate_queue_wait_seconds' buckets, " + _WINDOW),
    "queue_p99_ms": _null("Queue wait 99th percentile, from the buckets, " + _WINDOW),
    "execute_p50_ms": _null("Execution time median, from onnxgate_compute_duration_seconds' buckets, " + _WINDOW),
    "execute_p99_ms": _null("Execution time 99th percentile, from the buckets, " + _WINDOW),
    "batch_sizes": {"type": "array", "description": "Executions by batch size (rows), smallest first", "items": _obj(
        {"size": {"type": "integer", "minimum": 1}, "executions": {**_COUNT, "description": "Since it loaded"},
         "window": {**_COUNT, "description": "In the window"}},
        ("size", "executions", "window"))},
}

_FEATURE: Schema = _obj({"model": _STR, "feature": _STR,
                         "psi": {"type": "number", "nullable": True, "description": "Population stability index"},
                         "ks": {"type": "number", "nullable": True, "description": "KS statistic (numeric features)"}},
                        ("model", "feature", "psi", "ks"))
SCHEMAS: dict[str, Schema] = {
    "SampleLogSummary": _obj(
        {
            "records_written": {**_COUNT, "description": "Records the sink took"},
            "records_dropped": {"type": "object", "additionalProperties": _COUNT,
                                "description": "Records lost, by reason (queue_full, disk_full, io_error, ...)"},
            "queue_depth": {**_COUNT, "description": "Samples waiting for the writer"},
            "drift": {"type": "array", "description": "Live drift per model of drift.models", "items": _obj(
                {"model": _STR, "alert": {**_BOOL, "description": "A feature crosses its threshold"},
                 "window_rows": _COUNT, "features": {"type": "array", "items": _FEATURE}},
                ("model", "alert", "window_rows", "features"))},
        },
        ("records_written", "records_dropped", "queue_depth", "drift"),
        description="The sample log and live drift (this worker's); null without a sample log",
    ),
    "VersionSummary": _obj(_VERSION_FIELDS, tuple(_VERSION_FIELDS)),
    "ModelSummary": _obj(
        {
            "name": {**_STR, "description": "As the repository names it; text, never markup"},
            "reason": {**_STR, "description": "A model-level failure (bad config, no versions, unloaded)"},
            "ready_versions": {"type": "array", "items": {"type": "integer"}, "description": "Highest first"},
            "request_rate": _null("Requests a second over every version, " + _WINDOW),
            "latency_p50_ms": _null("Request latency median, from onnxgate_request_duration_seconds' buckets "
                                    "(shadow copies left out), " + _WINDOW),
            "latency_p99_ms": _null("Request latency 99th percentile, from the same buckets, " + _WINDOW),
            "versions": {"type": "array", "items": _ref("VersionSummary")},
        },
        ("name", "reason", "ready_versions", "request_rate", "latency_p50_ms", "latency_p99_ms", "versions"),
    ),
    "ModelsSummary": _obj(
        {
            "time": {**_NUM, "description": "Unix seconds"},
            "window_s": {"type": "number", "minimum": 0, "description":
                         "The seconds the rates and quantiles cover: about the last minute, measured between "
                         "calls to this endpoint (so 0 on the first call after a quiet spell: call again)"},
            "ready": {**_BOOL, "description": "As GET /v2/health/ready: every model loaded and not draining"},
            "draining": _BOOL,
            "models": {"type": "array", "items": _ref("ModelSummary")},
            "sample_log": {**_ref("SampleLogSummary"), "nullable": True},
        },
        ("time", "window_s", "ready", "draining", "models", "sample_log"),
        description="Every model and version at a glance. Rates, the mean latency and batch counts add up "
        "every worker under --workers N; the quantiles, queue depths and the window are the answering "
        "worker's own. Quantiles are estimated from histogram buckets as histogram_quantile does.",
    ),
}

PARAMETERS: dict[str, Schema] = {
    "file": {"name": "file", "in": "path", "required": True,
             "description": "One of the console's files (index.html, app.js, style.css); anything else is 404",
             "schema": _STR},
}

_TEXT: Schema = {"type": "string"}
_STATIC_HEADERS: dict[str, Schema] = {
    name: {"description": text, "schema": _STR}
    for name, text in (
        ("Content-Security-Policy", "default-src 'self'; no inline script or style; frame-ancestors 'none'"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-cache"),
    )
}


def operations(ok: Any) -> dict[str, dict[str, Any]]:
    """The console's entries of ``openapi_schemas.OPERATIONS`` (built with its helper)."""
    page = {"description": "The console's page", "content": {"text/html": {"schema": _TEXT}}}
    files = {"description": "The file", "content": {t: {"schema": _TEXT} for t in (
        "text/html", "text/javascript", "text/css", "image/svg+xml")}}
    return {
        "models.summary": {"ok": ok(_ref("ModelsSummary"))},
        "console.index": {"ok": page, "reply_headers": _STATIC_HEADERS},
        "console.file": {"ok": files, "errors": ("NotFound",), "reply_headers": _STATIC_HEADERS},
    }
