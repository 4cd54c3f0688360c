"""The HTTP handlers of the operator console: its static files (``/console``, ``/console/{file}``)
and the summary it shows (``GET /v2/models/summary``).

A mixin of :class:`~onnxgate.frontends.http_app.HttpApp`, which finds its handlers by endpoint
name. The static files hold no data and need no token: the page asks the documented API for
everything it shows, with the token the user enters. Only the files of :data:`FILES` are served
(read from the package once), so no path reaches the file system.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import orjson

from onnxgate.frontends.http_reply import Params, Receive, Reply, Scope, failure, ok

if TYPE_CHECKING:
    from onnxgate.core.service import InferenceService

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
#: The console's files and their content types; nothing else under /console is served.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HARDENING = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),
]
_cache: dict[str, Reply] = {}


def static_reply(name: str) -> Reply:
    """The reply for the console file ``name``: the file with its type and the hardening headers,
    or 404 (with the same headers) for any name not in :data:`FILES`."""
    reply = _cache.get(name)
    if reply is not None:
        return reply
    if name not in FILES:
        refused = failure(404, "no such console file")
        return Reply(404, refused.body, refused.headers + _HARDENING)
    body = resources.files("onnxgate.frontends").joinpath("console_static", name).read_bytes()
    reply = _cache[name] = Reply(200, body, [(b"content-type", FILES[name].encode()), *_HARDENING])
    return reply


class ConsoleHandlers:
    """``GET /console``, ``GET /console/{file}``, ``GET /v2/models/summary``."""

    service: InferenceService

    async def _console_index(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return static_reply("index.html")

    async def _console_file(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return static_reply(params["file"])

    async def _models_summary(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps(self.service.models_summary()))
