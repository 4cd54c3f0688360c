"""Tokens and a gateway config with a ``security:`` section, for the client and CLI auth tests.

``write_security_config`` writes what an operator would: digests only (``printf %s "$TOKEN" |
sha256sum``), never a token. Each test gets fresh random tokens (``make_tokens``), so nothing a
test asserts depends on a token string written in the source.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# One token per kind of caller; the scopes are core/security/config.py's.
SCOPES: dict[str, tuple[str, ...]] = {
    "infer": ("infer",),
    "read": ("read",),
    "admin": ("admin",),
    "ops": ("admin", "read", "infer"),
}


def digest(token: str) -> str:
    """What the config holds for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def make_tokens(names: Sequence[str] = tuple(SCOPES)) -> dict[str, str]:
    """A fresh random token per name."""
    return {name: f"{name}-{secrets.token_urlsafe(24)}" for name in names}


def security_section(tokens: Mapping[str, str], scopes: Mapping[str, Sequence[str]] = SCOPES) -> dict[str, Any]:
    """``security:`` with ``tokens`` (name -> token) under their scopes, and a failure limit high
    enough that a test's deliberate 401s never turn into 429s (all tests share 127.0.0.1)."""
    return {
        "tokens": [{"name": n, "sha256": digest(t), "scopes": list(scopes[n])} for n, t in tokens.items()],
        "auth_failures_per_minute": 1_000_000,
    }


def write_security_config(
    directory: Path, tokens: Mapping[str, str], extra: Mapping[str, Any] | None = None
) -> Path:
    """A gateway config file in ``directory`` with the ``security`` section (plus ``extra`` sections)."""
    path = directory / "gateway.yaml"
    doc = {"security": security_section(tokens), **(extra or {})}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    text = path.read_text()
    assert not any(t in text for t in tokens.values()), "a config file must hold digests only"
    return path


def write_token_file(directory: Path, name: str, token: str) -> Path:
    """A token file as an operator would keep one: the token and a newline, readable by the owner only."""
    path = directory / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
