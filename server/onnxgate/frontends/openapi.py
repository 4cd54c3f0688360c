"""The OpenAPI 3 document of the HTTP API, built from the endpoint table.

Paths, methods, scopes and summaries come from :data:`endpoints.ENDPOINTS`, the bodies and
answers of each endpoint from :mod:`openapi_schemas`, so the document and the router cannot
disagree: every HTTP route of the table is an operation here (``operationId`` the endpoint's
name), and building the document fails for an endpoint no schema describes. Served at
``GET /v2/openapi.json`` (:func:`document_bytes`, built once).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import orjson

from onnxgate import __version__
from onnxgate.core.security.access import PUBLIC
from onnxgate.frontends.endpoints import ENDPOINTS, Endpoint
from onnxgate.frontends.openapi_schemas import HEADERS, OPERATIONS, PARAMETERS, RESPONSES, SCHEMAS, ref

OPENAPI_VERSION = "3.0.3"
SECURITY_SCHEME = "bearerToken"

_DESCRIPTION = """\
The Open Inference Protocol (KServe V2) REST API of onnxgate, with its repository, routes and
shadow comparison endpoints.

**Tokens.** With tokens configured, every operation that lists the bearer scheme needs
`Authorization: Bearer <token>` whose scope (`x-onnxgate-scope`: infer, read, admin) covers it;
a gateway without tokens bound to a loopback address is open. Health and this document never
need one.

**Errors** are `{"error": "..."}`; a request shed without running (429) also has `"reason"`
and a `Retry-After` header. Beyond what each operation lists: a method a path does not serve is
405 (with `Allow`), an unknown path 404, a request head too large 431, a head or body too slow
408, and a connection past the gateway's cap 503 with `Retry-After`; a bug is 500.
"""


def _path_parameters(path: str) -> list[dict[str, str]]:
    return [ref(name, "parameters") for name in re.findall(r"{(\w+)}", path)]


def operation_id(endpoint: Endpoint, index: int) -> str:
    """The endpoint's name for its first route; ``<name>.<method>_<literal segments>`` for the others
    (an operationId is unique in a document; the versioned twin of a model path, for one)."""
    if index == 0:
        return endpoint.name
    method, path = endpoint.http[index]
    literals = [s for s in path.strip("/").split("/")[1:] if not s.startswith("{")]
    return f"{endpoint.name}.{method.lower()}_{'_'.join(literals)}"


def _responses(endpoint: Endpoint, spec: dict[str, Any]) -> dict[str, Any]:
    statuses: dict[str, Any] = {}
    if endpoint.implemented:
        statuses["200"] = spec["ok"]
    errors = list(spec.get("errors", ()))
    if not endpoint.implemented:
        errors.append("Unsupported")
    if endpoint.scope != PUBLIC:
        errors += ["Unauthenticated", "PermissionDenied", "TooManyRequests"]
    for name in errors:
        statuses[_STATUS[name]] = ref(name, "responses")
    if "unavailable" in spec:  # health and readiness answer 503 with their own body, or a drain cut's error
        body = {"anyOf": [spec["unavailable"], ref("Error")]}
        statuses["503"] = {"description": "Not live / not ready", "content": {"application/json": {"schema": body}}}
    else:
        statuses["503"] = ref("Unavailable", "responses")
    if extra := spec.get("reply_headers"):  # inline copies of the shared responses, with these headers
        for status, response in statuses.items():
            if "$ref" in response:
                response = RESPONSES[response["$ref"].rsplit("/", 1)[1]]
            statuses[status] = {**response, "headers": {**extra, **response.get("headers", {})}}
    return dict(sorted(statuses.items()))


_STATUS = {"BadRequest": "400", "Unauthenticated": "401", "PermissionDenied": "403", "NotFound": "404",
           "Conflict": "409", "PayloadTooLarge": "413", "TooManyRequests": "429", "InferenceFailed": "500",
           "Unsupported": "501",
           "Unavailable": "503"}


def undescribed(endpoints: Iterable[Endpoint] = ENDPOINTS) -> list[str]:
    """The implemented endpoints with HTTP routes that :data:`OPERATIONS` does not describe."""
    return [e.name for e in endpoints if e.http and e.implemented and e.name not in OPERATIONS]


def document(endpoints: Iterable[Endpoint] = ENDPOINTS) -> dict[str, Any]:
    """The OpenAPI document of the HTTP routes of ``endpoints``; LookupError naming the
    implemented endpoints that have no schema."""
    endpoints = list(endpoints)
    if missing := undescribed(endpoints):
        raise LookupError(f"HTTP endpoints without an OpenAPI description (openapi_schemas.OPERATIONS): {missing}")
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        spec = OPERATIONS.get(endpoint.name, {})
        for index, (method, path) in enumerate(endpoint.http):
            op: dict[str, Any] = {
                "operationId": operation_id(endpoint, index),
                "summary": endpoint.summary if endpoint.implemented else f"Not supported: {endpoint.summary} (501)",
                "tags": [endpoint.name.split(".")[0]],
                "x-onnxgate-endpoint": endpoint.name,
                "x-onnxgate-scope": endpoint.scope,
                "security": [] if endpoint.scope == PUBLIC else [{SECURITY_SCHEME: []}],
            }
            params = _path_parameters(path) + [ref(h, "parameters") for h in spec.get("headers", ())]
            if params:
                op["parameters"] = params
            if "body" in spec:
                op["requestBody"] = spec["body"]
            op["responses"] = _responses(endpoint, spec)
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "onnxgate HTTP API", "version": __version__, "description": _DESCRIPTION},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "responses": RESPONSES,
            "securitySchemes": {SECURITY_SCHEME: {"type": "http", "scheme": "bearer",
                                                  "description": "A token of the gateway's security config"}},
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as served: JSON, serialized once."""
    return orjson.dumps(document())
