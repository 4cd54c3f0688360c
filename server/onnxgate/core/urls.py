"""URLs as the gateway may show them: without what authenticates (layer-1 vocabulary).

Every log line, error message and reason that names a configured URL (the model repository, the
MLflow tracking server, the sample log's collector, the drift webhook) shows it through
:func:`redact_url`, which keeps the scheme, host, port and path and drops the user info
(``user:password@``), the query (``?token=...``, SAS signatures) and the fragment. Text that may
quote a URL (an exception from a client library) goes through :func:`redact_text`.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"//[^/\s@'\"]+@")
_QUERY = re.compile(r"\?[^\s'\"]*")
REDACTED = "***"


def _without_userinfo(url: str) -> tuple[str, str]:
    """``url`` with everything from ``://`` to its last ``@`` cut, and what was cut: user info
    is taken to reach that far, so a secret with an unencoded ``/``, ``?`` or ``#`` in it (an
    object-store key) is cut whole, not parsed as a path, query or fragment."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url, ""
    userinfo, _, host = rest.rpartition("@")
    return f"{head}://{host}", userinfo


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (where credentials and tokens live)."""
    url, _ = _without_userinfo(url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable url>"
    if not parts.scheme and not parts.netloc:  # a file path, not a URL
        return url
    if netloc == parts.netloc and not parts.query and not parts.fragment and "?" not in url and "#" not in url:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every URL in it redacted, any other ``//user@`` and ``?query`` cut, and each of
    ``secrets`` replaced (for messages of libraries that quote a URL or a credential)."""
    text = functools.reduce(lambda t, s: t.replace(s, REDACTED), filter(None, secrets), text)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _QUERY.sub("?...", _USERINFO.sub("//", text))


def url_secrets(url: str) -> tuple[str, ...]:
    """The parts of ``url`` that :func:`redact_url` drops, to cut out of messages that quote them
    in pieces (the password alone, the query alone)."""
    rest, userinfo = _without_userinfo(url)
    try:
        parts = urlsplit(rest)
    except ValueError:
        return (url,)
    return tuple(s for s in (userinfo, userinfo.partition(":")[2], parts.query, parts.fragment) if len(s) >= 3)
