"""The wire formats of the HTTP API as OpenAPI 3.0 components, and what each endpoint takes and answers.

:mod:`openapi` joins these to the endpoint table (paths, methods, scopes) into the document
served at ``GET /v2/openapi.json``. :data:`OPERATIONS` has one entry per endpoint with HTTP
routes, keyed by the endpoint's name; an endpoint without one makes the document fail to build
(and its test fail), so no route goes undescribed.
"""

from __future__ import annotations

from typing import Any

from onnxgate.core.serving.stats import INFERENCE_STAT_FIELDS
from onnxgate.core.serving.tensors import DATATYPES
from onnxgate.frontends import openapi_console, openapi_rollouts
from onnxgate.frontends.openapi_parts import BOOL as _BOOL
from onnxgate.frontends.openapi_parts import COUNT as _COUNT
from onnxgate.frontends.openapi_parts import INT as _INT
from onnxgate.frontends.openapi_parts import STR as _STR
from onnxgate.frontends.openapi_parts import Schema, ref
from onnxgate.frontends.openapi_parts import array as _array
from onnxgate.frontends.openapi_parts import body as _body
from onnxgate.frontends.openapi_parts import json_content as _json
from onnxgate.frontends.openapi_parts import obj as _obj
from onnxgate.frontends.openapi_parts import ok as _ok

_SCALAR: Schema = {"anyOf": [{"type": "number"}, _STR, _BOOL]}  # BYTES as text, NaN/Infinity as strings
_DURATION = _obj({"count": _COUNT, "ns": _COUNT}, ("count", "ns"))

SCHEMAS: dict[str, Schema] = {
    "Error": _obj(
        {
            "error": {**_STR, "description": "What went wrong (at most 2048 characters)"},
            "reason": {**_STR, "description": "On 429: why the request was shed, as the metric's reason "
                       "(queue_full, queue_bytes, timeout, deadline, priority, shadow_shed, decode_budget, auth)"},
        },
        ("error",),
        description="Every error answer of the V2 API: {\"error\": \"...\"}",
    ),
    "Live": _obj({"live": _BOOL, "error": _STR}, ("live",)),
    "Ready": _obj({"ready": _BOOL, "error": _STR}, ("ready",)),
    "ModelReady": _obj({"name": _STR, "ready": _BOOL, "error": _STR}, ("name", "ready")),
    "ServerMetadata": _obj({"name": _STR, "version": _STR, "extensions": _array(_STR)},
                           ("name", "version", "extensions")),
    "Datatype": {"type": "string", "enum": [d.v2 for d in DATATYPES]},
    "TensorMetadata": _obj(
        {"name": _STR, "datatype": ref("Datatype"),
         "shape": _array({"type": "integer", "minimum": -1}, description="-1: a variable dimension")},
        ("name", "datatype", "shape"),
    ),
    "ModelMetadata": _obj(
        {"name": _STR, "versions": _array(_STR), "platform": _STR,
         "inputs": _array(ref("TensorMetadata")), "outputs": _array(ref("TensorMetadata"))},
        ("name", "versions", "platform", "inputs", "outputs"),
    ),
    "ModelConfig": {
        "type": "object",
        "description": "Triton's JSON form of the model's completed ModelConfig (proto/model_config.proto): "
        "proto field names, enum names, every field, 64-bit integers as numbers",
        "properties": {"name": _STR, "platform": _STR, "max_batch_size": _INT,
                       "input": _array({"type": "object"}), "output": _array({"type": "object"})},
        "required": ["name", "max_batch_size", "input", "output"],
    },
    "Parameters": {
        "type": "object",
        "description": "Request parameters: binary_data_output (boolean), priority (level, 1 the highest), "
        "timeout (microseconds in the queue); others are passed on",
        "properties": {"binary_data_output": _BOOL, "priority": _COUNT, "timeout": _COUNT},
        "additionalProperties": _SCALAR,
    },
    "TensorData": _array(
        {"anyOf": [{"type": "number"}, _STR, _BOOL, ref("TensorData")]},
        description="Row-major elements, flat or nested; BYTES as UTF-8 strings; "
        "NaN and infinities as the strings \"NaN\", \"Infinity\", \"-Infinity\"",
    ),
    "RequestInput": _obj(
        {
            "name": _STR,
            "datatype": ref("Datatype"),
            "shape": _array(_COUNT, maxItems=32),
            "parameters": _obj(
                {"binary_data_size": {**_COUNT, "description": "The tensor's bytes follow the JSON header "
                                      "(Inference-Header-Content-Length), in input order"}},
                additionalProperties=_SCALAR,
            ),
            "data": ref("TensorData"),
        },
        ("name", "datatype", "shape"),
        description="One input: 'data', or parameters.binary_data_size with the bytes after the JSON header",
    ),
    "RequestOutput": _obj(
        {
            "name": _STR,
            "parameters": _obj(
                {"binary_data": {**_BOOL, "description": "This output's data in binary after the JSON"},
                 "classification": {"type": "integer", "minimum": 1, "description": "Top-k classes"}},
                additionalProperties=_SCALAR,
            ),
        },
        ("name",),
    ),
    "InferRequest": _obj(
        {"id": _STR, "parameters": ref("Parameters"), "inputs": _array(ref("RequestInput"), minItems=1),
         "outputs": _array(ref("RequestOutput"))},
        ("inputs",),
        example={"id": "42", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    ),
    "ResponseOutput": _obj(
        {
            "name": _STR,
            "datatype": ref("Datatype"),
            "shape": _array(_COUNT),
            "parameters": _obj({"binary_data_size": _COUNT}),
            "data": _array(_SCALAR, description="Flat, row-major; absent when the output is sent in binary"),
        },
        ("name", "datatype", "shape"),
    ),
    "InferResponse": _obj(
        {"model_name": {**_STR, "description": "The model that answered (a route's target)"},
         "model_version": _STR, "id": {**_STR, "description": "The request's id"},
         "parameters": {"type": "object"},
         "outputs": _array(ref("ResponseOutput"))},
        ("model_name", "model_version", "outputs"),
    ),
    "Statistics": _obj(
        {
            "model_stats": _array(_obj(
                {
                    "name": _STR,
                    "version": _STR,
                    "last_inference": {**_COUNT, "description": "Milliseconds since the epoch; 0: never"},
                    "inference_count": _COUNT,
                    "execution_count": _COUNT,
                    "inference_stats": _obj({k: ref("Duration") for k in INFERENCE_STAT_FIELDS},
                                            INFERENCE_STAT_FIELDS),
                    "batch_stats": _array(_obj(
                        {"batch_size": _COUNT, "compute_input": ref("Duration"), "compute_infer": ref("Duration"),
                         "compute_output": ref("Duration")},
                        ("batch_size", "compute_input", "compute_infer", "compute_output"),
                    )),
                },
                ("name", "version", "last_inference", "inference_count", "execution_count", "inference_stats",
                 "batch_stats"),
            )),
        },
        ("model_stats",),
        description="Triton's statistics extension",
    ),
    "Duration": _DURATION,
    "IndexRequest": _obj({"ready": {**_BOOL, "description": "Only ready versions"}}),
    "IndexRow": _obj(
        {"name": _STR, "version": _STR, "state": {**_STR, "description": "READY, UNAVAILABLE, ..."},
         "reason": _STR},
        ("name", "state"),
    ),
    "LoadRequest": _obj(
        {
            "parameters": _obj(
                {
                    "config": {**_STR, "description": "ModelConfig JSON merged over config.pbtxt, kept until "
                               "a load without parameters"},
                    "version": {"anyOf": [{"type": "integer", "minimum": 1}, _STR],
                                "description": "Serve exactly this version (a pin)"},
                    "rollback": {**_BOOL, "description": "Pin the version that served before the current one"},
                },
                description="Parameters named file:... (model files in the request) answer 501",
            ),
        },
    ),
    "UnloadRequest": _obj({"parameters": {"type": "object"}}),
    "Route": _obj(
        {
            "name": {**_STR, "description": "Optional in a PUT body; must be the path's name"},
            "split": _array(
                _obj({"target": {**_STR, "description": "model or model:version"},
                      "weight": {"type": "number", "exclusiveMinimum": True, "minimum": 0}},
                     ("target", "weight"), additionalProperties=False),
                minItems=1,
            ),
            "sticky": {**_STR, "pattern": "^header:.+", "description": "header:<name>: the same value, the same "
                       "target"},
            "shadow": _obj(
                {"target": _STR, "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                 "max_in_flight": {"type": "integer", "minimum": 1}},
                ("target", "fraction", "max_in_flight"), additionalProperties=False,
            ),
        },
        ("name", "split"),
        additionalProperties=False,
        description="A name clients call like a model, split by weight over targets, with an optional shadow",
    ),
    "Quantiles": {**_obj({q: {"type": "number"} for q in ("p50", "p90", "p99", "max")},
                         ("p50", "p90", "p99", "max")), "nullable": True},
    "Comparison": _obj(
        {
            "route": _STR,
            "window": _COUNT,
            "counts": ref("ComparisonCounts"),
            "argmax_agreement": ref("Agreement"),
            "history": {**_array(ref("ComparisonSlot")), "description": "Every pair's slots added up, oldest first"},
            "slot_s": {"type": "number", "description": "Seconds one history slot covers"},
            "pairs": _array(_obj(
                {"primary": _STR, "shadow": _STR, "since": {"type": "number"},
                 "window": _obj({"size": _COUNT, "filled": _COUNT}, ("size", "filled")),
                 "counts": ref("ComparisonCounts"), "argmax_agreement": ref("Agreement"),
                 "max_abs_diff": ref("Quantiles"), "mean_abs_diff": ref("Quantiles"),
                 "latency_diff_s": ref("Quantiles"), "history": _array(ref("ComparisonSlot"))},
                ("primary", "shadow", "since", "window", "counts", "argmax_agreement", "max_abs_diff",
                 "mean_abs_diff", "latency_diff_s", "history"),
            )),
        },
        ("route", "window", "counts", "argmax_agreement", "history", "slot_s", "pairs"),
        description="A route's shadow comparison: totals, and a window per (primary, shadow) pair",
    ),
    "ComparisonSlot": _obj(
        {"t": {"type": "number", "description": "The slot's start (epoch seconds)"},
         "compared": _COUNT, "failed": {**_COUNT, "description": "Failed, dropped or with a failed primary"},
         "agreement": {"type": "number", "nullable": True, "description": "Argmax-agreeing share of the rows"},
         "max_abs_diff": {"type": "number", "nullable": True, "description": "The worst max abs diff"},
         "latency_diff_mean_s": {"type": "number", "nullable": True, "description": "Shadow minus primary, mean"}},
        ("t", "compared", "failed", "agreement", "max_abs_diff", "latency_diff_mean_s"),
        description="What the shadow comparison saw in one slot of the last ten minutes",
    ),
    "ComparisonCounts": _obj({k: _COUNT for k in ("compared", "failed", "dropped", "primary_failed")},
                             ("compared", "failed", "dropped", "primary_failed")),
    "Agreement": _obj(
        {"rows": _COUNT, "rows_agree": _COUNT, "rate": {"type": "number", "nullable": True},
         "window_mean": {"type": "number", "nullable": True}},
        ("rows", "rows_agree", "rate"),
    ),
    "OpenApi": {"type": "object", "required": ["openapi", "paths"], "description": "This document"},
}
SCHEMAS["RouteBody"] = {**SCHEMAS["Route"], "required": ["split"], "description": "A route to add or replace"}

_PATH_DOCS = {
    "model": "A model's name, or a route's (percent-decoded)",
    "version": "A version: ASCII digits (anything else is an unknown version, 404)",
    "route": "A route's name",
    "region": "A shared memory region's name",
}
PARAMETERS: dict[str, Schema] = {
    name: {"name": name, "in": "path", "required": True, "description": text, "schema": _STR}
    for name, text in _PATH_DOCS.items()
}
PARAMETERS["deadline"] = {
    "name": "X-Request-Deadline-Ms", "in": "header", "required": False,
    "description": "The answer is due this many milliseconds after the gateway received the request "
    "(a decimal number above 0, at most a day; anything else is 400); one that cannot be met is refused "
    "at once (429, reason deadline)",
    "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 86_400_000},
}
PARAMETERS["requestId"] = {
    "name": "X-Request-Id", "in": "header", "required": False,
    "description": "The request's id, echoed in the reply's X-Request-Id (else the body's id, else a generated one): "
    "1-128 visible ASCII characters, anything else is 400",
    "schema": {"type": "string", "pattern": "^[!-~]{1,128}$"},
}
PARAMETERS["headerLength"] = {
    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
    "description": "Binary tensor extension: the length of the JSON header that starts the body; the tensors' "
    "bytes follow it. 0: a raw binary request, the whole body is the data of the model's only input",
    "schema": _COUNT,
}
PARAMETERS["contentEncoding"] = {
    "name": "Content-Encoding", "in": "header", "required": False,
    "description": "gzip or deflate (or identity); any other coding is 501", "schema": _STR,
}
PARAMETERS["acceptEncoding"] = {
    "name": "Accept-Encoding", "in": "header", "required": False,
    "description": "gzip or deflate: a reply of 1 KiB or more comes back compressed", "schema": _STR,
}

HEADERS: dict[str, Schema] = {
    "RetryAfter": {"description": "Seconds to wait before a retry", "required": True,
                   "schema": {"type": "integer", "minimum": 1}},
    "RequestId": {"description": "The request's id: the client's X-Request-Id, else the body's id, else a "
                  "generated one", "schema": {"type": "string", "pattern": "^[!-~]{1,128}$"}},
    "HeaderLength": {"description": "With an application/octet-stream reply: the length of the JSON header; the "
                     "binary outputs follow it, in order", "schema": _COUNT},
    "ContentEncoding": {"description": "gzip or deflate, when the request's Accept-Encoding asked for it",
                        "schema": {"type": "string", "enum": ["gzip", "deflate"]}},
    "WwwAuthenticate": {"description": "Bearer", "required": True, "schema": _STR},
}


def _error(description: str, headers: dict[str, Schema] | None = None) -> Schema:
    out: Schema = {"description": description, "content": _json(ref("Error"))}
    if headers:
        out["headers"] = headers
    return out


RESPONSES: dict[str, Schema] = {
    "BadRequest": _error("Malformed request, or input that does not match the model"),
    "Unauthenticated": _error("No token, or an unknown one (only with tokens configured, or mTLS without a client "
                              "certificate)", {"WWW-Authenticate": ref("WwwAuthenticate", "headers")}),
    "PermissionDenied": _error("The token lacks this endpoint's scope; or admin endpoints of a gateway without "
                               "tokens bound to a non-loopback address"),
    "NotFound": _error("Unknown model, version or route"),
    "PayloadTooLarge": _error("The body is larger than any valid request needs"),
    "TooManyRequests": _error("Shed without running: the reason says why; or too many failed authentications",
                              {"Retry-After": ref("RetryAfter", "headers")}),
    "Unsupported": _error("Not supported by onnxgate (the message names the extension or feature)"),
    "Unavailable": _error("The model is not ready (or unloaded), or the gateway is draining and cut the request"),
    "InferenceFailed": _error("ONNX Runtime failed on valid inputs"),
}

_INFER_REPLY_HEADERS = {"Inference-Header-Content-Length": ref("HeaderLength", "headers"),
                        "Content-Encoding": ref("ContentEncoding", "headers"),
                        "X-Request-Id": {**HEADERS["RequestId"], "required": True}}


_INFER_BODY: Schema = {
    "description": "A V2 JSON request; with Inference-Header-Content-Length, the JSON header followed by the "
    "inputs' binary data (binary_data_size each), or with 0 a raw binary request",
    "required": True,
    "content": {
        "application/json": {"schema": ref("InferRequest")},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


_MODEL = ("NotFound", "Unavailable")

# endpoint name -> the operation's description parts: "ok" (the 200 response), "body", "headers"
# (parameter names), "errors" (responses beyond those every operation of its scope has: 401, 403,
# 429 for guarded scopes, 503 for all: a request cut by the drain), "unavailable" (the body of its
# own 503), "reply_headers" (headers of every answer).
OPERATIONS: dict[str, dict[str, Any]] = {
    "health.live": {"ok": _ok(ref("Live"), "Live"), "unavailable": ref("Live")},
    "health.ready": {"ok": _ok(ref("Ready"), "Ready: the repository's models were loaded (one that failed answers "
                                             "503 on its own ready endpoint) and not draining"),
                     "unavailable": ref("Ready")},
    "server.metadata": {"ok": _ok(ref("ServerMetadata"))},
    "model.metadata": {"ok": _ok(ref("ModelMetadata")), "errors": _MODEL},
    "model.ready": {"ok": _ok(ref("ModelReady"), "Ready"), "errors": ("NotFound",), "unavailable": ref("ModelReady")},
    "model.config": {"ok": _ok(ref("ModelConfig")), "errors": _MODEL},
    "model.infer": {
        "ok": {
            "description": "The outputs: JSON, or with binary outputs the JSON header (its length in "
            "Inference-Header-Content-Length) followed by their bytes",
            "headers": _INFER_REPLY_HEADERS,
            "content": {"application/json": {"schema": ref("InferResponse")},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        "body": _INFER_BODY,
        "headers": ("deadline", "requestId", "headerLength", "contentEncoding", "acceptEncoding"),
        "errors": ("BadRequest", "NotFound", "PayloadTooLarge", "TooManyRequests", "Unsupported", "Unavailable",
                   "InferenceFailed"),
        # errors too, once the request is the front end's (not on a refused token, nor an invalid X-Request-Id)
        "reply_headers": {"X-Request-Id": ref("RequestId", "headers")},
    },
    "stats.all": {"ok": _ok(ref("Statistics"))},
    "stats.model": {"ok": _ok(ref("Statistics")), "errors": ("NotFound",)},
    "repository.index": {"ok": _ok(_array(ref("IndexRow"))), "body": _body(ref("IndexRequest")),
                         "errors": ("BadRequest", "PayloadTooLarge")},
    "repository.load": {"ok": _ok(None, "Loaded: the wanted versions are ready"), "body": _body(ref("LoadRequest")),
                        "errors": ("BadRequest", "NotFound", "PayloadTooLarge", "Unsupported")},
    "repository.unload": {"ok": _ok(None, "Unloaded (requests in flight finish first)"),
                          "body": _body(ref("UnloadRequest")),
                          "errors": ("BadRequest", "NotFound", "PayloadTooLarge", "Unsupported")},
    "routes.list": {"ok": _ok(_array(ref("Route")))},
    "routes.get": {"ok": _ok(ref("Route")), "errors": ("NotFound",)},
    "routes.put": {"ok": _ok(ref("Route"), "The route, as configured now"), "body": _body(ref("RouteBody"), True),
                   "headers": ("abortRollout",),
                   "errors": ("BadRequest", "Conflict", "PayloadTooLarge", "Unsupported")},
    "routes.delete": {"ok": _ok(None, "Deleted"), "headers": ("abortRollout",),
                      "errors": ("BadRequest", "NotFound", "Conflict", "Unsupported")},
    "routes.comparison": {"ok": _ok(ref("Comparison")), "errors": ("NotFound",)},
    "api.openapi": {"ok": _ok(ref("OpenApi"), "This document")},
}

# The rollout endpoints (openapi_rollouts): their schemas, a route's rollout section, the 409.
SCHEMAS.update(openapi_rollouts.SCHEMAS)
SCHEMAS["Route"]["properties"]["rollout"] = ref("RolloutConfig")  # RouteBody shares the properties
PARAMETERS.update(openapi_rollouts.PARAMETERS)
RESPONSES["Conflict"] = openapi_rollouts.CONFLICT
OPERATIONS.update(openapi_rollouts.OPERATIONS)

# The console (openapi_console): the models summary's schemas, the console's static files.
SCHEMAS.update(openapi_console.SCHEMAS)
PARAMETERS.update(openapi_console.PARAMETERS)
OPERATIONS.update(openapi_console.OPERATIONS)
