"""Gateway configuration: one YAML file (``--config``), parsed once into frozen dataclasses.

The file has a section per capability; every CLI flag of ``onnxgate serve`` can also be set
under ``server:`` (same name, underscores for dashes), and the CLI wins::

    server:
      model_repository: ./models
      http_port: 8000
      grpc_port: 8001
      metrics_port: 8002
      drain_timeout_s: 30
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onnxgate.core.monitoring.access_log import AccessLogConfig
from onnxgate.core.monitoring.config import SampleLogConfig
from onnxgate.core.monitoring.drift import DriftConfig
from onnxgate.core.registry.config import RegistryConfig
from onnxgate.core.sections import unrepresentable
from onnxgate.core.security.config import SecurityConfig
from onnxgate.core.serving.batch_policy import SCHEDULERS
from onnxgate.core.traffic.rollouts import RolloutsConfig
from onnxgate.core.traffic.routes import Route, parse_routes
from onnxgate.errors import ConfigError, InvalidInput

SECTIONS = ("server", "routes", "rollouts", "sample_log", "access_log", "drift", "registry", "security")


# Limits where 0 means "off" (the keepalive pair: gRPC's defaults, 2 h and 20 s; the client-ping
# pair: what gRPC makes of 0, any interval and no strikes).
_OFF_WHEN_ZERO = (
    "http_header_timeout_s",
    "http_body_timeout_s",
    "http_keep_alive_timeout_s",
    "http_max_connections",
    "grpc_max_concurrent_streams",
    "grpc_keepalive_time_s",
    "grpc_keepalive_timeout_s",
    "grpc_max_connection_idle_s",
    "grpc_max_connection_age_s",
    "grpc_max_connection_age_grace_s",
    "grpc_min_client_ping_interval_s",
    "grpc_max_ping_strikes",
)
_MAX_LIMIT = 2_000_000  # seconds (23 days) or a count; gRPC takes milliseconds as a 32-bit int


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Listeners, limits and the model repository."""

    model_repository: str = ""  # empty = the bundled demo repository
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_level: str = "info"
    drain_delay_s: float = 0.0  # readiness false, still serving, before listeners close
    drain_timeout_s: float = 30.0  # the whole drain after the delay: in-flight work, then closing files
    grpc_max_message_bytes: int = 256 * 1024 * 1024
    http_max_body_bytes: int = 256 * 1024 * 1024
    default_max_batch_size: int = 256
    cpu_threads: int = 0  # intra-op threads per session; 0 = available cores
    model_control_mode: str = "none"  # none | poll | explicit
    repository_poll_secs: float = 15.0
    load_model: tuple[str, ...] = ()  # explicit mode: models loaded at start ("*" = all)
    workers: int = 1  # processes sharing the ports (SO_REUSEPORT)
    listen_after_load: bool = False  # open the listeners only once the repository has loaded
    # Request memory (README "Limits and failure behaviour"): beyond either, 429 / RESOURCE_EXHAUSTED.
    decode_budget_bytes: int = 512 * 1024 * 1024  # request bytes being read and decoded at once, gateway-wide
    max_queued_bytes_per_model: int = 256 * 1024 * 1024  # tensors queued per version (shadows too); 0 = off
    # README "Deadlines and priorities": deadline = earliest deadline first, predictive admission,
    # late drops, adaptive delay; fifo = the scheduler off (priority levels still apply).
    scheduler: str = "deadline"
    # Connection limits (README "Limits and failure behaviour"). For the timeouts and the
    # connection/stream/age caps, 0 turns the limit off.
    http_max_header_bytes: int = 32 * 1024  # request line + headers; beyond: 431
    http_header_timeout_s: float = 10.0  # the whole head must arrive within this (slowloris): 408
    http_body_timeout_s: float = 30.0  # longest pause between two reads of a body: 408
    http_keep_alive_timeout_s: float = 75.0  # idle keep-alive connections close after this
    http_max_connections: int = 1024  # connections served at once, per listener; beyond: 503
    http_backlog: int = 2048  # the kernel's queue of connections not yet accepted
    # Calls at once per connection. Beyond it grpc refuses streams a client opened before it saw the
    # limit (RST_STREAM REFUSED_STREAM: UNAVAILABLE): at 100, one busy channel got ~15% of its calls
    # refused in tests/robustness/test_overload.py, so the default only stops a connection hoarding streams.
    grpc_max_concurrent_streams: int = 1000
    grpc_max_metadata_bytes: int = 32 * 1024  # request metadata; beyond: RESOURCE_EXHAUSTED
    grpc_keepalive_time_s: float = 60.0  # ping a connection with calls open that went quiet this long
    grpc_keepalive_timeout_s: float = 20.0  # and close it when the ping is not answered in this (0: gRPC's)
    grpc_max_connection_idle_s: float = 300.0  # close (GOAWAY) a connection without calls after this
    grpc_max_connection_age_s: float = 300.0  # GOAWAY after this (+-10% jitter): clients rebalance
    # Calls open at the age GOAWAY get this long; 0 = until they end (a long ModelStreamInfer
    # stream is not cut every few minutes; new calls still move to a new connection).
    grpc_max_connection_age_grace_s: float = 0.0
    grpc_min_client_ping_interval_s: float = 10.0  # client pings closer together without data are strikes
    grpc_max_ping_strikes: int = 2  # strikes before the connection is closed (GOAWAY too_many_pings)
    # TLS on the HTTP and gRPC ports (SECURITY.md): both files or neither; re-read on SIGHUP.
    tls_cert_file: str = ""  # PEM certificate chain
    tls_key_file: str = ""  # PEM private key
    tls_client_ca_file: str = ""  # PEM CA bundle: client certificates are verified and required (mTLS)

    def __post_init__(self) -> None:
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ConfigError(
                f"server.model_control_mode must be none, poll or explicit, got {self.model_control_mode!r}"
            )
        if self.repository_poll_secs <= 0:
            raise ConfigError(f"server.repository_poll_secs must be > 0, got {self.repository_poll_secs}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"server.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.workers < 1:
            raise ConfigError(f"server.workers must be >= 1, got {self.workers}")
        if self.load_model and self.model_control_mode != "explicit":
            raise ConfigError("server.load_model (--load-model) needs model_control_mode explicit")
        for port in ("http_port", "grpc_port", "metrics_port"):
            value = getattr(self, port)
            if not 0 <= value <= 65535:
                raise ConfigError(f"server.{port} must be 0..65535, got {value}")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(
                f"server.log_level must be one of critical/error/warning/info/debug, got {self.log_level!r}"
            )
        for name in ("grpc_max_message_bytes", "http_max_body_bytes", "default_max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be positive, got {getattr(self, name)}")
        if self.drain_timeout_s < 0 or self.drain_delay_s < 0:
            raise ConfigError("server.drain_timeout_s and server.drain_delay_s must be >= 0")
        for name in ("http_max_header_bytes", "http_backlog", "grpc_max_metadata_bytes", "decode_budget_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be positive, got {getattr(self, name)}")
        if self.max_queued_bytes_per_model < 0:
            raise ConfigError(
                f"server.max_queued_bytes_per_model must be >= 0 (0 = off), got {self.max_queued_bytes_per_model}"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("server.tls_cert_file and server.tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("server.tls_client_ca_file (mTLS) needs server.tls_cert_file and tls_key_file")
        for name in _OFF_WHEN_ZERO:
            value = getattr(self, name)
            if value < 0 or value > _MAX_LIMIT:
                raise ConfigError(f"server.{name} must be 0 (off) .. {_MAX_LIMIT}, got {value}")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole gateway configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    routes: tuple[Route, ...] = ()
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    sample_log: SampleLogConfig | None = None
    access_log: AccessLogConfig | None = None  # None: no access log
    drift: DriftConfig = field(default_factory=DriftConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    path: str = ""  # the file it was read from ("" = none), for SIGHUP re-reads


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - set(known)))  # YAML keys may be ints, dates, null
    if unknown:
        raise ConfigError(f"unknown key(s) in '{section}': {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        default = known[key].default
        expected = type(default) if default is not dataclasses.MISSING else None
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is float and value != value:  # .nan passes every range check after this
            raise ConfigError(f"{section}.{key} must be a number, got {value!r}")
        if expected is tuple and isinstance(value, list | str):
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{section}.{key} must be a list of strings, got {value!r}")
        if (expected is not None and not isinstance(value, expected)) or (
            isinstance(value, bool) and expected is not bool
        ):
            raise ConfigError(f"{section}.{key} must be {expected.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> GatewayConfig:
    """Read the YAML file (if any), apply CLI ``overrides`` to ``server``, and validate."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        try:
            doc = yaml.safe_load(text) or {}
        except RecursionError:
            raise ConfigError(f"config file {path} is not valid YAML: nested too deeply") from None
        except Exception as exc:  # not only YAMLError: PyYAML's constructors raise ValueError for
            # 2001-13-45, AttributeError for "!!timestamp x", for text they cannot build
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        if (problem := unrepresentable(doc)) is not None:  # shown and shared as JSON (the API, the workers)
            raise ConfigError(f"config file {path} holds a value JSON cannot represent, {problem}: integers "
                              "must fit in 64 bits and text must be Unicode")
    unknown = sorted(map(str, set(doc) - set(SECTIONS)))
    if unknown:
        raise ConfigError(f"unknown section(s) in config file: {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    section = doc.get("server") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"section 'server' must be a mapping, got {type(section).__name__}")
    server = dict(section)
    server.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        routes = parse_routes(doc.get("routes"))
    except InvalidInput as exc:
        raise ConfigError(f"routes: {exc.message}") from None
    sample_log = SampleLogConfig.from_dict(doc["sample_log"]) if doc.get("sample_log") is not None else None
    drift = DriftConfig.from_dict(doc.get("drift") or {})
    if drift.models and sample_log is None:
        raise ConfigError(
            "drift needs a sample_log section (live drift sees sampled requests; "
            "use sink: {type: none} to sample for drift only)"
        )
    return GatewayConfig(
        server=_build(ServerConfig, "server", server),
        routes=routes,
        rollouts=RolloutsConfig.from_dict(doc.get("rollouts")),
        sample_log=sample_log,
        access_log=AccessLogConfig.from_dict(doc["access_log"]) if doc.get("access_log") is not None else None,
        drift=drift,
        registry=RegistryConfig.from_dict(doc.get("registry")),
        security=SecurityConfig.from_dict(doc.get("security")),
        path=str(path) if path is not None else "",
    )


def load_routes(path: str | Path) -> tuple[Route, ...]:
    """Only the ``routes`` section of a config file (for SIGHUP re-reads)."""
    return load(path).routes
