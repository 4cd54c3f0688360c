"""The ``security`` section of the gateway config: tokens and their scopes, the audit log::

    security:
      tokens:
        - {name: ops,     sha256: "<hex digest of the token>", scopes: [admin, read, infer]}
        - {name: web-app, sha256: "<hex>",                     scopes: [infer]}
      tokens_file: /etc/onnxgate/tokens.yaml   # optional, same shape, re-read on SIGHUP
      metrics_token_sha256: "<hex>"            # optional: the metrics port wants this token
      audit_log: /var/log/onnxgate/audit.jsonl # optional: admin actions as JSON lines ("" = the log)
      auth_failures_per_minute: 30             # per peer; beyond it, 429 / RESOURCE_EXHAUSTED

Only digests are configured (``printf %s "$TOKEN" | sha256sum``): the config file and the
tokens file never hold a token itself.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from onnxgate.errors import ConfigError

SCOPES = ("infer", "read", "admin")
_MAX_TOKENS_FILE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """One accepted token: a name for the logs, its SHA-256 digest, the scopes it grants."""

    name: str
    sha256: str  # lowercase hex
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    tokens: tuple[TokenSpec, ...] = ()
    tokens_file: str = ""
    metrics_token_sha256: str = ""
    audit_log: str = ""
    auth_failures_per_minute: int = 30

    @classmethod
    def from_dict(cls, d: Any) -> SecurityConfig:
        """Parse the section (the tokens file too); raises ``ConfigError``."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConfigError(f"section 'security' must be a mapping, got {type(d).__name__}")
        known = ("tokens", "tokens_file", "metrics_token_sha256", "audit_log", "auth_failures_per_minute")
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise ConfigError(f"unknown key(s) in security: {', '.join(unknown)}; known: {', '.join(known)}")
        for key in ("tokens_file", "metrics_token_sha256", "audit_log"):
            if not isinstance(d.get(key, ""), str):
                raise ConfigError(f"security.{key} must be a string")
        limit = d.get("auth_failures_per_minute", 30)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1_000_000:
            raise ConfigError(f"security.auth_failures_per_minute must be an integer of 1..1000000, got {limit!r}")
        metrics = d.get("metrics_token_sha256", "")
        if metrics:
            metrics = _digest(metrics, "security.metrics_token_sha256")
        config = cls(
            tokens=parse_tokens(d.get("tokens") or [], "security.tokens"),
            tokens_file=d.get("tokens_file", ""),
            metrics_token_sha256=metrics,
            audit_log=d.get("audit_log", ""),
            auth_failures_per_minute=limit,
        )
        config.all_tokens()  # the tokens file must exist and parse at start
        return config

    def all_tokens(self) -> tuple[TokenSpec, ...]:
        """The config's tokens and the tokens file's (read now: blocking); raises ``ConfigError``."""
        tokens = self.tokens + (read_tokens_file(self.tokens_file) if self.tokens_file else ())
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise ConfigError(f"security: a token name is used twice: {sorted(names)}")
        digests = [t.sha256 for t in tokens]
        if len(set(digests)) != len(digests):
            raise ConfigError("security: two tokens have the same digest")
        return tokens

    @property
    def enabled(self) -> bool:
        """Whether any token is configured (a tokens file counts even while it is empty)."""
        return bool(self.tokens or self.tokens_file)


def read_tokens_file(path: str) -> tuple[TokenSpec, ...]:
    """The tokens of a tokens file: ``tokens: [...]`` or the list itself (blocking)."""
    try:
        with Path(path).open("rb") as f:
            raw = f.read(_MAX_TOKENS_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read security.tokens_file {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_TOKENS_FILE_BYTES:
        raise ConfigError(f"security.tokens_file {path} is larger than {_MAX_TOKENS_FILE_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw.decode("utf-8")) or []
    except Exception as exc:
        raise ConfigError(f"security.tokens_file {path} is not valid YAML: {exc}") from None
    if isinstance(doc, Mapping):
        if set(doc) - {"tokens"}:
            raise ConfigError(f"security.tokens_file {path} may hold only 'tokens'")
        doc = doc.get("tokens") or []
    return parse_tokens(doc, f"security.tokens_file {path}")


def parse_tokens(docs: Any, where: str) -> tuple[TokenSpec, ...]:
    if not isinstance(docs, list):
        raise ConfigError(f"{where} must be a list of {{name, sha256, scopes}}")
    out = []
    for i, doc in enumerate(docs):
        at = f"{where}[{i}]"
        if not isinstance(doc, Mapping) or set(doc) - {"name", "sha256", "scopes"}:
            raise ConfigError(f"{at} must be a mapping with name, sha256 and scopes")
        name, scopes = doc.get("name"), doc.get("scopes")
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise ConfigError(f"{at}.name must be a short printable string")
        if not isinstance(scopes, list) or not scopes or not all(s in SCOPES for s in scopes):
            raise ConfigError(f"{at}.scopes must be a non-empty list of {', '.join(SCOPES)}")
        out.append(TokenSpec(name, _digest(doc.get("sha256"), f"{at}.sha256"), frozenset(scopes)))
    return tuple(out)


_EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # SHA-256 of ""


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value.lower()) <= set(string.hexdigits.lower()):
        raise ConfigError(f"{where} must be the 64 hex digits of a SHA-256 digest (printf %s TOKEN | sha256sum)")
    if value.lower() == _EMPTY_DIGEST:
        raise ConfigError(f"{where} is the digest of an empty token (was the token variable empty?)")
    return value.lower()
