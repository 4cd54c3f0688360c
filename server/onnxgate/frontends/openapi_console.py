"""The console's part of the OpenAPI document: ``GET /v2/models/summary`` (the JSON the console
shows, for anyone), the live drift report (``GET /v2/drift/{model}/report``, HTML) and the
console's static files (``GET /console``, ``/console/{file}``). :mod:`openapi_schemas` merges
these into its tables."""

from __future__ import annotations

from onnxgate.frontends.openapi_parts import BOOL, COUNT, NUM, STR, Schema, obj, ok, ref


def _null(description: str) -> Schema:
    return {"type": "number", "minimum": 0, "nullable": True, "description": description}


_WINDOW = "over the window (null when it covers no time)"
_VERSION_FIELDS: dict[str, Schema] = {
    "version": {"type": "integer", "minimum": 1},
    "state": {"type": "string", "description": "READY, UNAVAILABLE, LOADING, ..., as in the repository index"},
    "reason": {**STR, "description": "Why it is not ready (a load failure's message); text, never markup"},
    "provider": {**STR, "description": "The ONNX Runtime execution provider of its first instance"},
    "instances": COUNT,
    "queue_depth": {**COUNT, "description": "Requests waiting in its queue now (this worker's)"},
    "inference_count": {**COUNT, "description": "Rows answered since it loaded (every worker's)"},
    "request_rate": _null("Requests answered or failed a second, " + _WINDOW),
    "failure_rate": _null("Requests failed a second, " + _WINDOW),
    "row_rate": _null("Rows a second, " + _WINDOW),
    "latency_mean_ms": _null("Mean request latency of its successes, " + _WINDOW),
    "latency_p50_ms": _null("Request latency median of its successes, from onnxgate_request_duration_seconds' "
                            "buckets (shadow copies left out), " + _WINDOW),
    "latency_p99_ms": _null("Request latency 99th percentile of its successes, from the buckets, " + _WINDOW),
    "queue_p50_ms": _null("Queue wait median, from onnxgate_queue_wait_seconds' buckets, " + _WINDOW),
    "queue_p99_ms": _null("Queue wait 99th percentile, from the buckets, " + _WINDOW),
    "execute_p50_ms": _null("Execution time median, from onnxgate_compute_duration_seconds' buckets, " + _WINDOW),
    "execute_p99_ms": _null("Execution time 99th percentile, from the buckets, " + _WINDOW),
    "batch_sizes": {"type": "array", "description": "Executions by batch size (rows), smallest first", "items": obj(
        {"size": {"type": "integer", "minimum": 1}, "executions": {**COUNT, "description": "Since it loaded"},
         "window": {**COUNT, "description": "In the window"}},
        ("size", "executions", "window"))},
}

_FEATURE: Schema = obj({"model": STR, "feature": STR,
                         "psi": {"type": "number", "nullable": True, "description": "Population stability index"},
                         "ks": {"type": "number", "nullable": True, "description": "KS statistic (numeric features)"}},
                        ("model", "feature", "psi", "ks"))
# A drift model's settings (drift.models.<model>); null for a model the config does not name.
_THRESHOLDS: dict[str, Schema] = {
    "psi_threshold": {"type": "number", "nullable": True, "description": "A PSI at or above this is drift"},
    "ks_pvalue": {"type": "number", "nullable": True, "description": "A KS p-value below this is drift (null: "
                  "not a test)"},
    "chi2_pvalue": {"type": "number", "nullable": True, "description": "A chi-square p-value below this is drift "
                    "(null: not a test)"},
    "min_rows": {**COUNT, "nullable": True, "description": "Rows the window needs for gauges and the report"},
    "window": {**COUNT, "nullable": True, "description": "The most rows the window holds"},
}
SCHEMAS: dict[str, Schema] = {
    "SampleLogSummary": obj(
        {
            "records_written": {**COUNT, "description": "Records the sink took"},
            "records_dropped": {"type": "object", "additionalProperties": COUNT,
                                "description": "Records lost, by reason (queue_full, disk_full, io_error, ...)"},
            "queue_depth": {**COUNT, "description": "Samples waiting for the writer"},
            "drift": {"type": "array", "description": "Live drift per model of drift.models", "items": obj(
                {"model": STR, "alert": {**BOOL, "description": "A feature crosses its threshold"},
                 "window_rows": COUNT, "features": {"type": "array", "items": _FEATURE}, **_THRESHOLDS},
                ("model", "alert", "window_rows", "features", *_THRESHOLDS))},
        },
        ("records_written", "records_dropped", "queue_depth", "drift"),
        description="The sample log and live drift (this worker's); null without a sample log",
    ),
    "VersionSummary": obj(_VERSION_FIELDS, tuple(_VERSION_FIELDS)),
    "ModelSummary": obj(
        {
            "name": {**STR, "description": "As the repository names it; text, never markup"},
            "reason": {**STR, "description": "A model-level failure (bad config, no versions, unloaded)"},
            "ready_versions": {"type": "array", "items": {"type": "integer"}, "description": "Highest first"},
            "available_versions": {"type": "array", "items": {"type": "integer"}, "description":
                                   "The versions in the repository at the latest load, lowest first: what a pin "
                                   "(POST /v2/repository/models/{name}/load, parameters.version) may name"},
            "request_rate": _null("Requests a second over every version, " + _WINDOW),
            "latency_p50_ms": _null("Request latency median, from onnxgate_request_duration_seconds' buckets "
                                    "(shadow copies left out), " + _WINDOW),
            "latency_p99_ms": _null("Request latency 99th percentile, from the same buckets, " + _WINDOW),
            "versions": {"type": "array", "items": ref("VersionSummary")},
        },
        ("name", "reason", "ready_versions", "available_versions", "request_rate", "latency_p50_ms",
         "latency_p99_ms", "versions"),
    ),
    "ModelsSummary": obj(
        {
            "time": {**NUM, "description": "Unix seconds"},
            "window_s": {"type": "number", "minimum": 0, "description":
                         "The seconds the rates and quantiles cover: about the last minute, measured between "
                         "calls to this endpoint (so 0 on the first call after a quiet spell: call again)"},
            "ready": {**BOOL, "description": "As GET /v2/health/ready: the repository's models were loaded (a "
                      "model that failed says so in its own entry and GET /v2/models/{name}/ready) and the "
                      "gateway is not draining"},
            "draining": BOOL,
            "models": {"type": "array", "items": ref("ModelSummary")},
            "sample_log": {**ref("SampleLogSummary"), "nullable": True},
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
             "schema": STR},
}

_TEXT: Schema = {"type": "string"}
_STATIC_HEADERS: dict[str, Schema] = {
    name: {"description": text, "schema": STR}
    for name, text in (
        ("Content-Security-Policy", "default-src 'self'; no inline script or style; frame-ancestors 'none'"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-cache"),
    )
}

_REPORT_HEADERS: dict[str, Schema] = {
    **_STATIC_HEADERS,
    "Content-Security-Policy": {"description": "default-src 'none'; img-src data:; the report's stylesheet by "
                                "its hash; sandbox: no script runs", "schema": STR},
    "Cache-Control": {"description": "no-store", "schema": STR},
}
# Only the report has these headers; its errors are the API's JSON errors.
_REPORT = {"description": "The report: a table of every feature (PSI, KS, chi-square, verdict) and a "
           "reference/current histogram pair per feature, drifted first (at most 50), as inline PNGs",
           "content": {"text/html": {"schema": _TEXT}}, "headers": _REPORT_HEADERS}


# The console's entries of ``openapi_schemas.OPERATIONS``.
_PAGE = {"description": "The console's page", "content": {"text/html": {"schema": _TEXT}}}
_FILES = {"description": "The file", "content": {t: {"schema": _TEXT} for t in (
    "text/html", "text/javascript", "text/css", "image/svg+xml")}}
OPERATIONS: dict[str, dict] = {
    "models.summary": {"ok": ok(ref("ModelsSummary"))},
    # 404: the model has no drift.models entry; 503: drift is not configured, the window is short of
    # min_rows, or the reference does not fit; 429: another report is being rendered; 501: no matplotlib.
    "drift.report": {"ok": _REPORT, "errors": ("NotFound", "Unsupported")},
    "console.index": {"ok": _PAGE, "reply_headers": _STATIC_HEADERS},
    "console.file": {"ok": _FILES, "errors": ("NotFound",), "reply_headers": _STATIC_HEADERS},
}
