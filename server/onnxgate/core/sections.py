"""Parsing one section of the gateway config file into its capability's frozen dataclass.

Each capability owns its section (``routes``, ``sample_log``, ``drift``, ``registry``) and parses
it with these helpers; ``onnxgate.config`` only composes the sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onnxgate.errors import ConfigError


def parse_fields(cls: type, d: Any, section: str, allowed: set[str] | None = None) -> dict[str, Any]:
    """Check a YAML mapping against a dataclass's defaults; the kwargs it gives, or ConfigError."""
    check(isinstance(d, Mapping), f"{section} must be a mapping, got {type(d).__name__}")
    defaults = cls()
    allowed = allowed if allowed is not None else set(cls.__dataclass_fields__)
    unknown = sorted(map(str, set(d) - allowed))
    check(not unknown, f"unknown key(s) in {section}: {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    out: dict[str, Any] = {}
    for key, value in d.items():
        default = getattr(defaults, key)
        expected = float if default is None else type(default)  # None defaults are optional floats
        if value is None and default is None:
            out[key] = None
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wrong = not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)
        check(not wrong, f"{section}.{key} must be {expected.__name__}, got {value!r}")
        out[key] = value
    return out


def check(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)
