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


_INT_RANGE = (-(2**63), 2**64 - 1)  # what JSON encoders (orjson) write as integers


def unrepresentable(doc: Any) -> str | None:
    """Why ``doc`` (a YAML or JSON document) cannot be shown as JSON, or None: an integer past 64
    bits, text that is not Unicode (a lone surrogate, YAML's ``"\\ud800"``), bytes (``!!binary``).
    Each object is looked at once, so YAML's aliases cost nothing (a document can name one
    list a billion times over)."""
    seen: set[int] = set()
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return f"text that is not Unicode: {value!r}"
        elif isinstance(value, bool | float) or value is None:
            continue
        elif isinstance(value, int):
            if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
                return "an integer past 64 bits"
        elif isinstance(value, bytes | bytearray):
            return "bytes (!!binary)"
        elif isinstance(value, Mapping | list | tuple | set):
            if id(value) in seen:
                continue
            seen.add(id(value))
            stack.extend(value.keys() if isinstance(value, Mapping) else value)
            if isinstance(value, Mapping):
                stack.extend(value.values())
    return None
