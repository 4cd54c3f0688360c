"""``onnxgate routes list|get NAME|put NAME --file F|delete NAME`` against a running gateway.

The HTTP API (README "Routes"): ``GET /v2/routes`` (every route), ``GET /v2/routes/{name}``,
``PUT /v2/routes/{name}`` (body: the route, its ``name`` optional and equal to the path's; the
answer is the route as stored) and ``DELETE /v2/routes/{name}``. Reading needs the ``read``
scope, changing ``admin``. A route document, in the file ``put`` sends (YAML or JSON, ``-`` for
stdin)::

    split:
      - {target: fraud_a, weight: 90}      # target = model or model:version
      - {target: fraud_b:3, weight: 10}
    sticky: header:x-user-id
    shadow: {target: fraud_c, fraction: 0.25, max_in_flight: 64}

Output, exit codes and options as for ``onnxgate models`` (``admin``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import yaml

from onnxgate.admin import AdminError, Gateway, call, format_rows, gateway_of, report

_MAX_FILE_BYTES = 4 * 1024 * 1024  # what the gateway accepts as a route body


def _path(name: str) -> str:
    return f"/v2/routes/{quote(name, safe='')}"


def list_routes(gw: Gateway) -> list[dict]:
    return call(gw, "GET", "/v2/routes")


def get_route(gw: Gateway, name: str) -> dict:
    return call(gw, "GET", _path(name))


def put_route(gw: Gateway, name: str, doc: Mapping[str, Any]) -> dict:
    """Add or replace the route ``name``; the route as the gateway stored it."""
    return call(gw, "PUT", _path(name), dict(doc), "admin")


def delete_route(gw: Gateway, name: str) -> None:
    call(gw, "DELETE", _path(name), scope="admin")


def read_route_file(path: str) -> dict:
    """The route document in ``path`` (YAML or JSON; ``-`` = stdin); ``AdminError`` exit 2 if unusable."""
    try:
        if path == "-":
            text = sys.stdin.read(_MAX_FILE_BYTES + 1)
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(_MAX_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"cannot read the route file {path}: {getattr(exc, 'strerror', None) or exc}", 2) from None
    if len(text) > _MAX_FILE_BYTES:
        raise AdminError(f"the route file {path} is larger than {_MAX_FILE_BYTES} bytes", 2)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AdminError(f"the route file {path} is not YAML or JSON: {exc}", 2) from None
    if not isinstance(doc, Mapping):
        raise AdminError(f"the route file {path} must hold one route (a mapping with split, ...)", 2)
    return dict(doc)


def _split(route: Mapping[str, Any]) -> str:
    return ", ".join(f"{s.get('target')} ({_number(s.get('weight'))})" for s in route.get("split") or [])


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shadow(route: Mapping[str, Any]) -> str:
    shadow = route.get("shadow")
    if not shadow:
        return ""
    return f"{shadow.get('target')} {_number(shadow.get('fraction'))} (max {shadow.get('max_in_flight')} in flight)"


def format_routes(routes: Sequence[Mapping[str, Any]]) -> str:
    """Routes as an aligned table: name, split (target (weight), ...), sticky key, shadow."""
    rows = [(r.get("name", ""), _split(r), r.get("sticky", ""), _shadow(r)) for r in routes]
    return format_rows(("ROUTE", "SPLIT", "STICKY", "SHADOW"), rows)


def run_routes(args: argparse.Namespace) -> int:
    """Run one ``onnxgate routes`` command; returns the exit code."""
    command, as_json = args.action, getattr(args, "json", False)
    name = getattr(args, "name", None)
    try:
        gw = gateway_of(args)
        if command == "list":
            routes = list_routes(gw)
        elif command == "get":
            routes = [get_route(gw, name)]
        elif command == "put":
            routes = [put_route(gw, name, read_route_file(args.file))]
        else:
            delete_route(gw, name)
            print(json.dumps({"deleted": name}) if as_json else f"route '{name}' deleted")
            return 0
    except AdminError as exc:
        return report(exc, as_json)
    if as_json:
        print(json.dumps(routes if command == "list" else routes[0], indent=2))
    else:
        print(format_routes(routes))
    return 0
