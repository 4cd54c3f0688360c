"""Who may call an endpoint: tokens, their scopes, and the check of one call.

An endpoint declares one scope (``frontends/endpoints.py``): ``public`` (health: no token
needed), ``infer``, ``read`` or ``admin``; a ``read``-only endpoint of scope ``infer`` (model
metadata, config, readiness, server metadata) is also open to tokens with ``read``. A call
carries ``Authorization: Bearer <token>`` (HTTP) or the ``authorization`` metadata (gRPC).

- With tokens configured, every endpoint but the public ones needs a token with its scope:
  none or an unknown one -> :class:`Unauthenticated` (401 / UNAUTHENTICATED), a known one
  without the scope -> :class:`PermissionDenied` (403 / PERMISSION_DENIED). A peer that keeps
  failing is refused for a while (:mod:`.ratelimit`) with :class:`Overloaded`.
- Without tokens, bound to a loopback address: everything is open (development).
- Without tokens, bound elsewhere: admin endpoints are refused (403, saying how to configure a
  token); the rest stays open.

Tokens are kept as SHA-256 digests and compared in constant time (the presented token's digest
against every configured one); a token is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from onnxgate.core.security.config import SCOPES, SecurityConfig, TokenSpec
from onnxgate.core.security.ratelimit import FailureLimiter, limit_key, peer_address
from onnxgate.errors import Overloaded, PermissionDenied, Unauthenticated

log = logging.getLogger("onnxgate.security")

PUBLIC = "public"
ENDPOINT_SCOPES = (PUBLIC, *SCOPES)
_BEARER = "bearer "
_CLOSED_ADMIN = (
    "admin endpoints are closed: the gateway listens on {host} (not a loopback address) and has no "
    "tokens; configure security.tokens or security.tokens_file with a token that has the admin scope "
    "(see SECURITY.md)"
)


# What a scrape of the metrics port without its token is answered (401), on either metrics server.
METRICS_REFUSAL = "the metrics port needs its token: Authorization: Bearer <token>"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's name and scopes ("" and every scope when security is off)."""

    name: str
    scopes: frozenset[str]


OPEN = Principal("", frozenset(SCOPES))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def bearer_token(authorization: str | None) -> str:
    """The token of ``Authorization: Bearer <token>`` ("" when there is none: never a match).
    Only spaces and tabs around it are dropped (HTTP's whitespace), no other characters."""
    if not authorization or authorization[:7].lower() != _BEARER:
        return ""
    return authorization[7:].strip(" \t")


def allows(scopes: frozenset[str], scope: str, read_only: bool) -> bool:
    """Whether a token with ``scopes`` may call an endpoint of ``scope``."""
    return scope == PUBLIC or scope in scopes or (read_only and scope == "infer" and "read" in scopes)


class TokenTable:
    """The accepted tokens, by digest."""

    def __init__(self, tokens: Sequence[TokenSpec]) -> None:
        self._entries = [(bytes.fromhex(t.sha256), Principal(t.name, t.scopes)) for t in tokens]

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, or None; the time taken does not depend on which matched."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    def __len__(self) -> int:
        return len(self._entries)


class AccessPolicy:
    """Checks calls against endpoint scopes; one per gateway process."""

    def __init__(self, config: SecurityConfig, host: str, require_client_cert: bool = False) -> None:
        self.config = config
        self.host = host
        self.enabled = config.enabled
        self.open_admin = self.enabled or is_loopback(host)  # False: admin closed by default
        self.require_client_cert = require_client_cert
        self.tokens = TokenTable(config.all_tokens() if self.enabled else ())
        self.failures = FailureLimiter(config.auth_failures_per_minute)
        metrics = config.metrics_token_sha256
        self.metrics_tokens = TokenTable([TokenSpec("metrics", metrics, frozenset())] if metrics else [])

    def startup_warning(self) -> str | None:
        """What to warn about at start, if anything."""
        if not self.open_admin:
            return _CLOSED_ADMIN.format(host=self.host) + "; model metadata and inference are open to anyone"
        return None

    def guards(self, scope: str) -> bool:
        """Whether a call of this scope can ever be refused (False: no check is needed at all)."""
        if scope == PUBLIC:
            return False
        return self.enabled or self.require_client_cert or (scope == "admin" and not self.open_admin)

    def check(
        self, scope: str, read_only: bool, authorization: str | None, peer: str, client_cert: bool = True
    ) -> Principal:
        """The caller of an endpoint of ``scope``, or the error to answer it with."""
        if scope == PUBLIC:
            return OPEN
        if self.require_client_cert and not client_cert:
            raise Unauthenticated("a client certificate signed by the gateway's client CA is required")
        if not self.enabled:
            if scope == "admin" and not self.open_admin:
                raise PermissionDenied(_CLOSED_ADMIN.format(host=self.host))
            return OPEN
        address = limit_key(peer_address(peer))
        if wait := self.failures.blocked(address):
            raise Overloaded(
                "too many failed authentications from this address; retry later", retry_after_s=wait, reason="auth"
            )
        principal = self._authenticate(authorization)
        if principal is None:
            self.failures.failed(address)
            if authorization is None:
                raise Unauthenticated("this endpoint needs a token: send Authorization: Bearer <token>")
            raise Unauthenticated("the token is not valid")
        if not allows(principal.scopes, scope, read_only):
            denied = PermissionDenied(f"token '{principal.name}' lacks the '{scope}' scope this endpoint needs")
            denied.token_name = principal.name  # for the audit log
            raise denied
        return principal

    def _authenticate(self, authorization: str | None) -> Principal | None:
        token = bearer_token(authorization)
        return self.tokens.lookup(token) if token else None

    def metrics_allowed(self, authorization: str | None) -> bool:
        """Whether a scrape of the metrics port may proceed."""
        if not self.metrics_tokens:
            return True
        token = bearer_token(authorization)
        return bool(token) and self.metrics_tokens.lookup(token) is not None

    def reload_tokens(self) -> None:
        """Re-read the tokens file (blocking; SIGHUP). On error the old tokens stay, and it raises."""
        if self.enabled:
            self.tokens = TokenTable(self.config.all_tokens())
            log.info("security: %d token(s) loaded", len(self.tokens))
