"""The HTTP handlers of the operator console: its static files (``/console``, ``/console/{file}``),
the summary it shows (``GET /v2/models/summary``) and the live drift report it opens
(``GET /v2/drift/{model}/report``).

A mixin of :class:`~onnxgate.frontends.http_app.HttpApp`, which finds its handlers by endpoint
name. The static files hold no data and need no token: the page asks the documented API for
everything it shows, with the token the user enters. Only the files of :data:`FILES` are served
(read from the package once), so no path reaches the file system.

The drift report is HTML built from user-named models and features (every name escaped by the
core's renderer), served under a CSP of its own, :data:`REPORT_CSP`: no script, no fetch, only
inline images and the report's one stylesheet (allowed by its hash, :data:`REPORT_STYLE`), and
sandboxed. The page fetches it with the token and shows it in a sandboxed frame from a ``blob:``
URL, which takes the page's CSP: so that allows ``frame-src blob:`` and the same stylesheet.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import orjson

from onnxgate.frontends.http_reply import Params, Receive, Reply, Scope, failure, ok

if TYPE_CHECKING:
    from onnxgate.core.service import InferenceService

#: The CSP source of the drift report's stylesheet (``core/monitoring/drift_html.STYLE``, whose
#: ``style_hash()`` a test holds this to).
REPORT_STYLE = "'sha256-kr3KpiG1ti0uzGS2iin/KvTqg1TNu6RXf+KznzH7OKc='"
CSP = (
    f"default-src 'self'; script-src 'self'; style-src 'self' {REPORT_STYLE}; img-src 'self' data:; "
    "connect-src 'self'; frame-src blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
REPORT_CSP = (
    f"default-src 'none'; img-src data:; style-src {REPORT_STYLE}; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'; sandbox"
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
_REPORT_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-security-policy", REPORT_CSP.encode()),
    *((k, v) for k, v in _HARDENING if k not in (b"content-security-policy", b"cache-control")),
    (b"cache-control", b"no-store"),  # the data of one moment, with user data in it
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
    """``GET /console``, ``GET /console/{file}``, ``GET /v2/models/summary``, ``GET /v2/drift/{model}/report``."""

    service: InferenceService

    async def _console_index(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return static_reply("index.html")

    async def _console_file(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return static_reply(params["file"])

    async def _models_summary(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps(self.service.models_summary()))

    async def _drift_report(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        page = await self.service.drift_report(params["model"])  # rendered off the loop, one at a time
        return Reply(200, page.encode(), list(_REPORT_HEADERS))
