"""The ``sample_log:`` section of gateway.yaml, parsed into frozen dataclasses.

Kept apart from ``sample_log.py`` (the logger) and ``sinks.py`` (the writers) so the config
loader can import it without either. Errors are ``ConfigError`` naming the key.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from onnxgate.core.sections import check, parse_fields
from onnxgate.core.urls import redact_url

INCLUDE = ("inputs", "outputs", "shadow")
SINK_TYPES = ("jsonl", "parquet", "http", "none")


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """``sample_log.sink``: where records go (see ``sinks.py``)."""

    type: str = "jsonl"  # jsonl | parquet | http | none (sampled only for observers such as live drift)
    path: str = ""  # files: the directory
    rotate_mb: float = 64.0
    rotate_s: float = 300.0
    url: str = ""  # http: the collector
    batch_size: int = 100  # http: events per POST
    flush_s: float = 1.0  # http: the longest a partial batch waits
    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 0.5  # first retry delay, doubled each time up to backoff_max_s
    backoff_max_s: float = 10.0
    source: str = "/onnxgate"  # CloudEvents source attribute

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], section: str = "sample_log.sink") -> SinkConfig:
        check(isinstance(d, Mapping), f"{section} must be a mapping, got {type(d).__name__}")
        kind = d.get("type")
        check(kind in SINK_TYPES, f"{section}.type must be one of {', '.join(SINK_TYPES)}, got {kind!r}")
        files = {"path", "rotate_mb", "rotate_s"}
        http = set(cls.__dataclass_fields__) - files - {"type"}
        allowed = {"type"} | (files if kind in ("jsonl", "parquet") else http if kind == "http" else set())
        extra = sorted(map(str, set(d) - allowed))
        check(
            not extra, f"{section}: {', '.join(extra)} not used by type {kind}; its keys: {', '.join(sorted(allowed))}"
        )
        values = parse_fields(cls, d, section)
        c = cls(**values)
        for key in ("rotate_mb", "rotate_s", "batch_size", "timeout_s"):
            check(getattr(c, key) > 0, f"{section}.{key} must be positive, got {getattr(c, key)!r}")
        for key in ("retries", "flush_s", "backoff_s", "backoff_max_s"):
            check(getattr(c, key) >= 0, f"{section}.{key} must be >= 0, got {getattr(c, key)!r}")
        check(kind not in ("jsonl", "parquet") or bool(c.path), f"{section}.path is required for type {kind}")
        no_arrow = kind == "parquet" and importlib.util.find_spec("pyarrow") is None
        check(not no_arrow, f"{section}.type parquet needs pyarrow: pip install 'onnxgate[drift]'")
        check(
            kind != "http" or c.url.startswith(("http://", "https://")),
            f"{section}.url must be an http:// or https:// URL, got {redact_url(c.url)!r}",
        )
        return c


@dataclass(frozen=True, slots=True)
class SampleLogConfig:
    """The ``sample_log:`` section of gateway.yaml::

    sample_log:
      default: {rate: 0.01}              # share of requests recorded
      models: {fraud: {rate: 0.5}}       # per model or route name (a route's rate wins)
      include: [inputs, outputs, shadow] # what a record holds
      headers: [x-user-id]               # request headers / gRPC metadata copied into records
      sample_by: header:x-user-id        # or "random" (default): same header value, same decision
      hash_salt: ""                      # change it to sample a different set of users
      queue_size: 10000                  # samples waiting for the writer; beyond: dropped
      queue_max_mb: 256                  # memory samples waiting for the writer hold; beyond: dropped
      max_tensor_elements: 1000000       # larger tensors are logged with values: null
      sink: {type: parquet, path: ./sample-log, rotate_mb: 64, rotate_s: 300}
    """

    default_rate: float = 0.01
    rates: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    include: tuple[str, ...] = INCLUDE
    headers: tuple[str, ...] = ()
    sample_by: str = "random"  # "random" | "header:<name>" (lowercase)
    hash_salt: str = ""
    queue_size: int = 10000
    queue_max_mb: float = 256.0
    max_tensor_elements: int = 1_000_000
    sink: SinkConfig = field(default_factory=SinkConfig)

    @property
    def hash_header(self) -> str | None:
        """The header whose hash decides, or None for random sampling."""
        return self.sample_by.partition(":")[2] if self.sample_by != "random" else None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleLogConfig:
        """Parse the ``sample_log`` section; raises ``ConfigError``."""
        s = "sample_log"
        check(isinstance(d, Mapping), f"section '{s}' must be a mapping, got {type(d).__name__}")
        check("sink" in d, f"{s}.sink is required (type: parquet | jsonl | http | none)")
        nested = {"default", "models", "include", "headers", "sample_by", "sink"}
        known = set(cls.__dataclass_fields__) - {"default_rate", "rates"} | nested
        unknown = sorted(map(str, set(d) - known))
        check(not unknown, f"unknown key(s) in {s}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = parse_fields(cls, {k: v for k, v in d.items() if k not in nested}, s)
        values["default_rate"] = _rate(d.get("default", {"rate": cls().default_rate}), f"{s}.default")
        models = d.get("models") or {}
        check(isinstance(models, Mapping), f"{s}.models must be a mapping of model or route name to {{rate: ...}}")
        values["rates"] = MappingProxyType({str(k): _rate(v, f"{s}.models.{k}") for k, v in models.items()})
        values["include"] = _names(d.get("include", list(INCLUDE)), f"{s}.include", INCLUDE)
        values["headers"] = tuple(h.lower() for h in _names(d.get("headers", []), f"{s}.headers", None))
        sample_by = d.get("sample_by", "random")
        by_header = isinstance(sample_by, str) and sample_by.startswith("header:") and len(sample_by) > len("header:")
        check(
            sample_by == "random" or by_header, f"{s}.sample_by must be 'random' or 'header:<name>', got {sample_by!r}"
        )
        values["sample_by"] = sample_by.lower() if sample_by != "random" else sample_by
        values["sink"] = SinkConfig.from_dict(d["sink"], f"{s}.sink")
        c = cls(**values)
        check(c.queue_size >= 1, f"{s}.queue_size must be >= 1, got {c.queue_size}")
        check(c.queue_max_mb > 0, f"{s}.queue_max_mb must be positive, got {c.queue_max_mb}")
        check(c.max_tensor_elements >= 0, f"{s}.max_tensor_elements must be >= 0, got {c.max_tensor_elements}")
        return c


def _rate(spec: Any, where: str) -> float:
    check(isinstance(spec, Mapping) and set(spec) == {"rate"}, f"{where} must be {{rate: <0..1>}}, got {spec!r}")
    rate = spec["rate"]
    ok = isinstance(rate, int | float) and not isinstance(rate, bool) and 0.0 <= rate <= 1.0
    check(ok, f"{where}.rate must be a number from 0 to 1, got {rate!r}")
    return float(rate)


def _names(value: Any, where: str, choices: Sequence[str] | None) -> tuple[str, ...]:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    check(ok, f"{where} must be a list of names, got {value!r}")
    bad = [v for v in value if choices is not None and v not in choices]
    check(not bad, f"{where}: unknown {', '.join(bad)}; choose from {', '.join(choices or ())}")
    return tuple(dict.fromkeys(value))
