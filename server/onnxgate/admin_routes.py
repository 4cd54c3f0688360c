"""``onnxgate routes list|get NAME|put NAME --file F|delete NAME|rollout NAME [ACTION]`` against a
running gateway.

The HTTP API (README "Routes"): ``GET /v2/routes`` (every route), ``GET /v2/routes/{name}``,
``PUT /v2/routes/{name}`` (body: the route, its ``name`` optional and equal to the path's; the
answer is the route as stored) and ``DELETE /v2/routes/{name}``; both answer 409 for a route
under a running rollout unless ``--abort-rollout`` (``?abort_rollout=true``) aborts it first.
Reading needs the ``read`` scope, changing ``admin``. A route document, in the file ``put``
sends (YAML or JSON, ``-`` for stdin)::

    split:
      - {target: fraud_a, weight: 90}      # target = model or model:version
      - {target: fraud_b:3, weight: 10}
    sticky: header:x-user-id
    shadow: {target: fraud_c, fraction: 0.25, max_in_flight: 64}

A route's rollout (README "Rollouts"): ``rollout NAME`` shows ``GET /v2/routes/{name}/rollout``
(phase, step, weight, the gates with their bounds, the last decisions); ``rollout NAME
pause|resume|promote|abort [--reason TEXT] [--full]`` posts ``POST
/v2/routes/{name}/rollout/{action}`` (``admin``; ``--full``: promote to 100 % at once) and prints
the decision. A route without a rollout is 404, an action its phase does not allow 409.

Output, exit codes and options as for ``onnxgate models`` (``admin``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import yaml

from onnxgate.admin import AdminError, Gateway, call, format_rows, gateway_of, report

_MAX_FILE_BYTES = 4 * 1024 * 1024  # what the gateway accepts as a route body
ROLLOUT_ACTIONS = ("pause", "resume", "promote", "abort")
HISTORY_SHOWN = 5  # decisions the rollout view lists (--json has all the gateway keeps)


def _path(name: str, abort_rollout: bool = False) -> str:
    return f"/v2/routes/{quote(name, safe='')}" + ("?abort_rollout=true" if abort_rollout else "")


def list_routes(gw: Gateway) -> list[dict]:
    return call(gw, "GET", "/v2/routes")


def get_route(gw: Gateway, name: str) -> dict:
    return call(gw, "GET", _path(name))


def put_route(gw: Gateway, name: str, doc: Mapping[str, Any], abort_rollout: bool = False) -> dict:
    """Add or replace the route ``name``; the route as the gateway stored it. ``abort_rollout``:
    abort the route's running rollout first (otherwise that is a 409)."""
    return call(gw, "PUT", _path(name, abort_rollout), dict(doc), "admin")


def delete_route(gw: Gateway, name: str, abort_rollout: bool = False) -> None:
    call(gw, "DELETE", _path(name, abort_rollout), scope="admin")


def get_rollout(gw: Gateway, name: str) -> dict:
    """The route's rollout now (``GET /v2/routes/{name}/rollout``)."""
    return call(gw, "GET", _path(name) + "/rollout")


def rollout_action(gw: Gateway, name: str, action: str, reason: str = "", full: bool = False) -> dict:
    """``pause``, ``resume``, ``promote`` (``full``: to 100 %) or ``abort`` the route's rollout; the decision."""
    body: dict[str, Any] = {}
    if reason:
        body["reason"] = reason
    if full:
        body["full"] = True
    return call(gw, "POST", f"{_path(name)}/rollout/{quote(action, safe='')}", body, "admin")


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


# -- rollouts ----------------------------------------------------------------------------------


def _step(steps: Sequence[Any], index: Any) -> str:
    """``step 1 (5 %)`` or ``step 0 (shadow)``."""
    if not isinstance(index, int) or not 0 <= index < len(steps):
        return f"step {index}"
    step = steps[index]
    return f"step {index} ({step if step == 'shadow' else f'{step} %'})"


def _value(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _seconds(x: Any) -> str:
    return f"{x:.1f} s" if isinstance(x, int | float) else "-"


def _time(t: Any) -> str:
    if not isinstance(t, int | float):
        return str(t)
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_MINIMUM_GATES = ("agreement",)  # gates whose threshold is a minimum (the others are maxima)
_UNITS = {"agreement": "rows", "abs_diff_p99": "comparisons", "error_rate": "requests", "latency_p99_ratio": "pairs"}


def format_gates(gates: Sequence[Mapping[str, Any]]) -> str:
    """The gates as a table: value (point estimate), bound (the one-sided bound on the side that
    must pass), threshold (with its direction), verdict and the samples judged."""
    rows = []
    for g in gates:
        name = g.get("name", "")
        direction = ">=" if name in _MINIMUM_GATES else "<="
        samples = f"{g.get('samples', 0)} {_UNITS.get(name, 'samples')}"
        rows.append((name, _value(g.get("value")), _value(g.get("bound")), f"{direction} {_value(g.get('threshold'))}",
                     g.get("verdict", ""), samples))
    return format_rows(("GATE", "VALUE", "BOUND", "THRESHOLD", "VERDICT", "SAMPLES"), rows)


def format_decisions(history: Sequence[Mapping[str, Any]]) -> str:
    """Decisions as a table: time (UTC), decision, steps (from -> to), weight after, by whom, reason."""
    rows = [(_time(h.get("time")), h.get("decision", "") + (" (alert)" if h.get("alert") else ""),
             f"{h.get('from_step')} -> {h.get('to_step')}", f"{h.get('weight')} %", h.get("by", ""),
             h.get("reason", "")) for h in history]
    return format_rows(("TIME", "DECISION", "STEPS", "WEIGHT", "BY", "REASON"), rows)


def format_rollout(doc: Mapping[str, Any]) -> str:
    """``GET /v2/routes/{name}/rollout`` for people: a summary, the gates, the last decisions."""
    steps = doc.get("steps") or []
    pct = f"{_value(doc.get('confidence', 0) * 100)} %" if isinstance(doc.get("confidence"), int | float) else "-"
    lines = [
        f"route '{doc.get('route')}': candidate '{doc.get('candidate')}', {doc.get('phase')} at "
        f"{_step(steps, doc.get('step_index'))} of [{', '.join(map(str, steps))}]",
        f"candidate weight {doc.get('candidate_weight')} %, mirroring {'on' if doc.get('mirroring') else 'off'}",
        f"this step: {_seconds(doc.get('elapsed_s'))} (min_dwell_s {_value(doc.get('min_dwell_s'))}, max_step_s "
        f"{_value(doc.get('max_step_s'))}), {doc.get('comparisons')} of {doc.get('min_comparisons')} comparisons, "
        f"candidate {doc.get('candidate_requests')} requests / {doc.get('candidate_errors')} errors",
    ]
    if doc.get("reason"):
        lines.append(f"reason: {doc['reason']}")
    gates = doc.get("gates") or []
    lines += ["", f"gates (one-sided {pct} bounds):" if gates else "gates: none"]
    if gates:
        lines.append(format_gates(gates))
    history = doc.get("history") or []
    shown = history[-HISTORY_SHOWN:]
    earlier = f" (the last {len(shown)} of {len(history)}; --json has all)" if len(history) > len(shown) else ""
    lines += ["", f"decisions{earlier}:" if history else "decisions: none yet"]
    if history:
        lines.append(format_decisions(shown))
    return "\n".join(lines)


def format_decision(route: str, d: Mapping[str, Any]) -> str:
    """One decision as a sentence."""
    return (f"rollout of route '{route}': {d.get('decision')}, step {d.get('from_step')} -> {d.get('to_step')}, "
            f"candidate weight {d.get('weight')} %, now {d.get('phase')}: {d.get('reason')}")


def _conflict_hint(exc: AdminError, name: str, command: str) -> AdminError:
    """A 409 on put/delete: how to get past the route's rollout."""
    if exc.status == 409 and command in ("put", "delete") and not exc.hint:
        exc.hint = (f"route '{name}' is under a rollout: abort it (onnxgate routes rollout {name} abort) "
                    f"or add --abort-rollout to {command} anyway")
    return exc


def _run_rollout(gw: Gateway, args: argparse.Namespace, as_json: bool) -> int:
    name, action = args.name, getattr(args, "rollout_action", None)
    reason, full = getattr(args, "reason", None), getattr(args, "full", False)
    if action is None:
        if reason is not None or full:
            raise AdminError("--reason and --full go with an action (pause, resume, promote, abort)", 2)
        doc = get_rollout(gw, name)
        print(json.dumps(doc, indent=2) if as_json else format_rollout(doc))
        return 0
    if full and action != "promote":
        raise AdminError("--full goes with promote only (promote to 100 % at once)", 2)
    decision = rollout_action(gw, name, action, reason or "", full)
    print(json.dumps(decision, indent=2) if as_json else format_decision(name, decision))
    return 0


def run_routes(args: argparse.Namespace) -> int:
    """Run one ``onnxgate routes`` command; returns the exit code."""
    command, as_json = args.action, getattr(args, "json", False)
    name = getattr(args, "name", None)
    abort_rollout = getattr(args, "abort_rollout", False)
    try:
        gw = gateway_of(args)
        if command == "rollout":
            return _run_rollout(gw, args, as_json)
        if command == "list":
            routes = list_routes(gw)
        elif command == "get":
            routes = [get_route(gw, name)]
        elif command == "put":
            routes = [put_route(gw, name, read_route_file(args.file), abort_rollout)]
        else:
            delete_route(gw, name, abort_rollout)
            print(json.dumps({"deleted": name}) if as_json else f"route '{name}' deleted")
            return 0
    except AdminError as exc:
        return report(_conflict_hint(exc, name, command), as_json)
    if as_json:
        print(json.dumps(routes if command == "list" else routes[0], indent=2))
    else:
        print(format_routes(routes))
    return 0
