"""Operator commands against a running gateway, over its HTTP repository API.

``onnxgate models list|load|unload|rollback`` print a table, or JSON with ``--json``; they exit
0 on success, 1 when the gateway refuses (its message is printed), 2 when it cannot be reached.
Errors go to stderr (as ``{"error": ...}`` with ``--json``), so stdout only ever holds the
result. ``--url`` may leave out the scheme (``127.0.0.1:8000``, as tritonclient spells it).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote


class AdminError(Exception):
    """The gateway refused the call or could not be reached."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def base_url(url: str) -> str:
    """``url`` with a scheme (http when it has none) and without a trailing slash."""
    url = url.strip()
    return (url if "://" in url else "http://" + url).rstrip("/")


def _call(url: str, path: str, body: dict | None = None, timeout: float = 300.0) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(base_url(url) + path, data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace") or exc.reason
        raise AdminError(f"{exc.code}: {message}", 1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"cannot reach the gateway at {url}: {getattr(exc, 'reason', exc)}", 2) from None
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:  # something answered, but not the repository API (a wrong port or path)
        raise AdminError(f"{url} did not answer like an onnxgate gateway: {raw[:80]!r}", 2) from None


def index(url: str) -> list[dict]:
    """The repository index: one row per model version."""
    return _call(url, "/v2/repository/index", {})


def load(url: str, name: str, version: int | None = None) -> None:
    """Load (or reload) a model; with ``version``, pin it to that version."""
    params: dict[str, Any] = {} if version is None else {"version": version}
    _call(url, f"/v2/repository/models/{quote(name, safe='')}/load", {"parameters": params})


def unload(url: str, name: str) -> None:
    _call(url, f"/v2/repository/models/{quote(name, safe='')}/unload", {"parameters": {"unload_dependents": False}})


def rollback(url: str, name: str) -> None:
    """Pin the version that served before the current one."""
    _call(url, f"/v2/repository/models/{quote(name, safe='')}/load", {"parameters": {"rollback": True}})


def format_table(rows: Sequence[dict]) -> str:
    """The index as an aligned text table."""
    header = ("MODEL", "VERSION", "STATE", "REASON")
    lines = [header] + [(r["name"], r.get("version", ""), r.get("state", ""), r.get("reason", "")) for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(3)]
    out = []
    for line in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line[:3], widths, strict=True)) + "  " + str(line[3]))
    return "\n".join(s.rstrip() for s in out)


def run(command: str, url: str, name: str | None, version: int | None, as_json: bool) -> int:
    """Run one ``onnxgate models`` command; returns the exit code."""
    try:
        if command != "list":
            assert name is not None
            {
                "load": lambda: load(url, name, version),
                "unload": lambda: unload(url, name),
                "rollback": lambda: rollback(url, name),
            }[command]()
        rows = index(url)
    except AdminError as exc:
        if as_json:
            print(json.dumps({"error": str(exc)}), file=sys.stderr)
        else:
            print(f"onnxgate: {exc}", file=sys.stderr)
        return exc.exit_code
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
    return 0
