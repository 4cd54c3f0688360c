"""The gateway's error tree. Core code raises these; front ends map them to wire codes.

::

    GatewayError
    ├── InvalidInput        the request is malformed or does not match the model
    │   └── PayloadTooLarge the request is larger than its model can accept
    ├── ModelNotFound       unknown model or version
    ├── Conflict            the change conflicts with the gateway's state (a route under a rollout)
    ├── Unauthenticated     no credentials, or credentials the gateway does not know
    ├── PermissionDenied    known credentials without the scope the endpoint needs
    ├── Unavailable         the model, version or server cannot serve now
    │   └── Draining        the server is shutting down
    ├── Overloaded          a bounded queue is full; retry later
    ├── Unsupported         a feature the gateway does not implement
    ├── ModelLoadError      a model (version) failed to load or to pass its checks
    ├── InferenceFailed     ONNX Runtime failed on valid inputs
    └── ConfigError         the gateway config file or flags are invalid

The mapping to HTTP statuses and gRPC codes lives in ``frontends/status.py`` only.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 2048  # a message echoes client input (names, shapes); it never grows past this


class GatewayError(Exception):
    """Base of every error the gateway reports to a caller.

    The message is cut to :data:`MAX_MESSAGE_CHARS`: it travels in a gRPC trailer (clients
    refuse metadata past 8 KiB by default) and in log lines, whatever the client sent."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 20] + f"... ({len(message)} chars)"
        super().__init__(message)
        self.message = message


class InvalidInput(GatewayError):
    """The request is malformed or does not match the model's inputs."""


class PayloadTooLarge(InvalidInput):
    """The request is larger than any valid request for its model (or the transport's limit)."""


class ModelNotFound(GatewayError):
    """The model or version does not exist."""

    @classmethod
    def unknown(cls, name: str, version: str = "", why: str = "") -> ModelNotFound:
        """Triton's wording, which clients match on (KServe ModelMesh, Triton's QA tests):
        ``Request for unknown model: 'm' is not found`` / ``... 'm' version 3 is not found``."""
        what = f"'{name}'" + (f" version {version}" if version else "")
        return cls(f"Request for unknown model: {what} is not found" + (f" ({why})" if why else ""))


class Conflict(GatewayError):
    """The change conflicts with the gateway's current state (a route a rollout controls, an
    action its rollout's phase does not allow)."""


class Unauthenticated(GatewayError):
    """The request carries no token (or client certificate) the gateway accepts."""


class PermissionDenied(GatewayError):
    """The caller is known but lacks the scope the endpoint needs (or admin is closed by default)."""


class Unavailable(GatewayError):
    """The model, version or server exists but cannot serve now."""


class Draining(Unavailable):
    """The server is shutting down and takes no new work."""


class Overloaded(GatewayError):
    """A bounded queue is full; the request was rejected without running."""

    def __init__(self, message: str, retry_after_s: float = 1.0, reason: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason  # the metric label: queue_full, timeout, deadline, priority, shadow_shed, ...


class Unsupported(GatewayError):
    """The request asks for something the gateway does not implement."""


class ModelLoadError(GatewayError):
    """A model failed to load: missing file, corrupt graph, bad or disagreeing config."""


class InferenceFailed(GatewayError):
    """ONNX Runtime failed while running valid inputs."""


class ConfigError(GatewayError):
    """The gateway config file or flags are invalid."""
