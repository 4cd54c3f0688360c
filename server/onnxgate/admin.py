"""Operator commands against a running gateway, over its HTTP API.

``onnxgate models list|load|unload|rollback`` (here) and ``onnxgate routes list|get|put|delete``
(``admin_routes``) print a table, or JSON with ``--json``; they exit 0 on success, 1 when the
gateway refuses (its message is printed; for 401/403 a hint about the token follows), 2 when it
cannot be reached or the command cannot be sent (a token file that cannot be read, say).
Errors go to stderr (as ``{"error": ..., "hint": ...}`` with ``--json``), so stdout only ever
holds the result. ``--url`` may leave out the scheme (``127.0.0.1:8000``, as tritonclient
spells it).

Authentication: the token is read from ``--token-file PATH`` (the raw token; surrounding
whitespace is dropped) or else the ``ONNXGATE_TOKEN`` environment variable, never from the
command line (it would show in ``ps``), and is sent as ``Authorization: Bearer <token>``, never
to a host a redirect points at. ``https://`` URLs are checked against ``--ca-file`` (default:
the system's CAs); ``--cert-file``/``--key-file`` present a client certificate (mTLS).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

TOKEN_ENV = "ONNXGATE_TOKEN"
_MAX_TOKEN_FILE_BYTES = 64 * 1024


class AdminError(Exception):
    """The gateway refused the call or could not be reached; ``hint`` says what to try."""

    def __init__(self, message: str, exit_code: int, hint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.hint = hint
        self.status = status


def base_url(url: str) -> str:
    """``url`` with a scheme (http when it has none) and without a trailing slash."""
    url = url.strip()
    return (url if "://" in url else "http://" + url).rstrip("/")


def read_token(token_file: str | None) -> tuple[str, str]:
    """The token and where it came from: ``--token-file``, else ``$ONNXGATE_TOKEN``, else none."""
    if token_file:
        try:
            with open(token_file, "rb") as f:
                raw = f.read(_MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise AdminError(f"cannot read the token file {token_file}: {exc.strerror or exc}", 2) from None
        if len(raw) > _MAX_TOKEN_FILE_BYTES:
            raise AdminError(f"the token file {token_file} is larger than {_MAX_TOKEN_FILE_BYTES} bytes", 2)
        token, source = raw.decode("utf-8", "replace").strip(), f"--token-file {token_file}"
        if not token:
            raise AdminError(f"the token file {token_file} is empty", 2)
    else:
        token, source = os.environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):  # the token itself is never printed
        raise AdminError(f"the token from {source} may hold only printable ASCII characters without spaces", 2)
    return token, (source if token else "")


@dataclass(frozen=True)
class Gateway:
    """Where and how to call: the base URL, the token (kept out of ``repr``), the TLS context."""

    url: str
    token: str = field(default="", repr=False)
    token_source: str = ""  # "--token-file PATH" or "ONNXGATE_TOKEN"; "" = no token
    context: ssl.SSLContext | None = field(default=None, repr=False)
    timeout: float = 300.0


def connect(
    url: str,
    token_file: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> Gateway:
    """The gateway at ``url`` with the token and TLS files of the command line (``AdminError``: exit 2)."""
    url = base_url(url)
    token, source = read_token(token_file)
    context = None
    if ca_file or cert_file or key_file:
        if not url.startswith("https://"):
            raise AdminError("--ca-file, --cert-file and --key-file need an https:// --url", 2)
        if key_file and not cert_file:
            raise AdminError("--key-file needs --cert-file", 2)
        try:
            context = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise AdminError(f"cannot load the TLS files: {exc}", 2) from None
    return Gateway(url, token, source, context)


def _auth_hint(status: int, gw: Gateway, scope: str) -> str:
    if status == 401 and not gw.token:
        return f"the gateway wants a token: give --token-file PATH (a file holding it) or set {TOKEN_ENV}"
    if status == 401:
        return f"the gateway does not accept the token from {gw.token_source}"
    if not gw.token:
        return f"this needs a token with the '{scope}' scope: give --token-file PATH or set {TOKEN_ENV}"
    return f"the token from {gw.token_source} lacks the '{scope}' scope this command needs"


def call(gw: Gateway, method: str, path: str, body: Any = None, scope: str = "read") -> Any:
    """One JSON call; the parsed reply (``None`` when empty). ``scope`` is for the 403 hint."""
    data = json.dumps(body).encode() if body is not None else (b"" if method in ("POST", "PUT") else None)
    req = urllib.request.Request(gw.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if gw.token:
        req.add_unredirected_header("Authorization", f"Bearer {gw.token}")  # a redirect does not carry it
    try:
        with urllib.request.urlopen(req, timeout=gw.timeout, context=gw.context) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace") or exc.reason
        hint = _auth_hint(exc.code, gw, scope) if exc.code in (401, 403) else ""
        raise AdminError(f"{exc.code}: {message}", 1, hint, exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"cannot reach the gateway at {gw.url}: {getattr(exc, 'reason', exc)}", 2) from None
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:  # something answered, but not the gateway's API (a wrong port or path)
        raise AdminError(f"{gw.url} did not answer like an onnxgate gateway: {raw[:80]!r}", 2) from None


def format_rows(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned text table; the last column is not padded."""
    lines = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = ["  ".join([*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]]) for line in lines]
    return "\n".join(s.rstrip() for s in out)


def report(exc: AdminError, as_json: bool) -> int:
    """Print ``exc`` (and its hint) on stderr; its exit code."""
    if as_json:
        doc = {"error": str(exc), **({"hint": exc.hint} if exc.hint else {})}
        print(json.dumps(doc), file=sys.stderr)
    else:
        print(f"onnxgate: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"onnxgate: hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def gateway_of(args: argparse.Namespace) -> Gateway:
    """The ``Gateway`` of a ``models``/``routes`` command line."""
    return connect(
        getattr(args, "url", "http://127.0.0.1:8000"),
        getattr(args, "token_file", None),
        getattr(args, "ca_file", None),
        getattr(args, "cert_file", None),
        getattr(args, "key_file", None),
    )


# -- models ---------------------------------------------------------------------------------


def index(gw: Gateway) -> list[dict]:
    """The repository index: one row per model version."""
    return call(gw, "POST", "/v2/repository/index", {})


def load(gw: Gateway, name: str, version: int | None = None) -> None:
    """Load (or reload) a model; with ``version``, pin it to that version."""
    params: dict[str, Any] = {} if version is None else {"version": version}
    call(gw, "POST", f"/v2/repository/models/{quote(name, safe='')}/load", {"parameters": params}, "admin")


def unload(gw: Gateway, name: str) -> None:
    body = {"parameters": {"unload_dependents": False}}
    call(gw, "POST", f"/v2/repository/models/{quote(name, safe='')}/unload", body, "admin")


def rollback(gw: Gateway, name: str) -> None:
    """Pin the version that served before the current one."""
    call(gw, "POST", f"/v2/repository/models/{quote(name, safe='')}/load", {"parameters": {"rollback": True}}, "admin")


def format_table(rows: Sequence[dict]) -> str:
    """The index as an aligned text table."""
    cells = [(r["name"], r.get("version", ""), r.get("state", ""), r.get("reason", "")) for r in rows]
    return format_rows(("MODEL", "VERSION", "STATE", "REASON"), cells)


def run_models(args: argparse.Namespace) -> int:
    """Run one ``onnxgate models`` command; returns the exit code."""
    command, as_json = args.action, getattr(args, "json", False)
    name, version = getattr(args, "name", None), getattr(args, "version", None)
    try:
        gw = gateway_of(args)
        if command != "list":
            assert name is not None
            {
                "load": lambda: load(gw, name, version),
                "unload": lambda: unload(gw, name),
                "rollback": lambda: rollback(gw, name),
            }[command]()
        try:
            rows = index(gw)
        except AdminError as exc:
            if command == "list" or exc.status not in (401, 403):
                raise
            # done, but this token may change models without reading the index (admin without read)
            print(f"onnxgate: {command} {name}: done; the index is not shown: {exc}", file=sys.stderr)
            return 0
    except AdminError as exc:
        return report(exc, as_json)
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
    return 0
