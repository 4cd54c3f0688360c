"""What the HTTP front end's handlers answer: a status, a body, headers; and the ASGI types."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Params = dict[str, str]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

JSON = [(b"content-type", b"application/json")]
CONTROL_BODY_LIMIT = 4 * 1024 * 1024  # repository and route bodies: small JSON documents


class Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else JSON


def ok(body: bytes = b"") -> Reply:
    return Reply(200, body)


def failure(status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None, reason: str = "") -> Reply:
    body = {"error": message, "reason": reason} if reason else {"error": message}
    return Reply(status, orjson.dumps(body), JSON + (extra or []))
