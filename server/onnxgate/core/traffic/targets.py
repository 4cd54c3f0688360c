"""A route's target: a model, optionally at a fixed version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxgate.core.inference import parse_version
from onnxgate.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Target:
    """A model, optionally at a fixed version ("" = the highest ready)."""

    model: str
    version: str = ""

    @classmethod
    def parse(cls, text: Any, where: str) -> Target:
        if not isinstance(text, str) or not text or text.count(":") > 1:
            raise InvalidInput(f"{where}: target must be 'model' or 'model:version', got {text!r}")
        model, _, version = text.partition(":")
        if not model or (version and not ((number := parse_version(version)) is not None and number > 0)):
            raise InvalidInput(f"{where}: target must be 'model' or 'model:version', got {text!r}")
        return cls(model, version)

    def __str__(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model
