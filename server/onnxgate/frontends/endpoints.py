"""Every endpoint of the gateway, declared once: its HTTP routes, its gRPC methods, its scope.

The HTTP router (``http_app``), the scope check on both transports, the scope tests and the API
documents are all built from :data:`ENDPOINTS`, so no endpoint can exist without a scope: a
gRPC method of the V2 service that is not declared here is refused at start
(:func:`grpc_endpoints`), and the HTTP router serves only declared routes.

Scopes (``core/security/access.py``): ``public`` needs no token; ``infer``; ``read``, which also
opens the ``read_only`` endpoints of scope ``infer``; ``admin`` for every state change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from onnxgate.core.security.access import ENDPOINT_SCOPES, PUBLIC


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of the API."""

    name: str  # "model.infer": also the HTTP handler's name (``_model_infer``)
    scope: str  # public | infer | read | admin
    summary: str
    http: tuple[tuple[str, str], ...] = ()  # (method, path template with {model} {version} {route})
    grpc: tuple[str, ...] = ()  # GRPCInferenceService (or grpc.health.v1.Health) method names
    read_only: bool = True  # False: changes state or runs a model
    target: str = ""  # the path parameter naming what it acts on (the audit log's target)
    grpc_target: str = ""  # the request field holding the same
    implemented: bool = True  # False: answered 501 / UNIMPLEMENTED naming ``summary`` (declared for its scope)

    def __post_init__(self) -> None:
        assert self.scope in ENDPOINT_SCOPES, self.scope


def _versioned(method: str, suffix: str) -> tuple[tuple[str, str], ...]:
    """A model path and its versioned twin: /v2/models/{model}<suffix> and .../versions/{version}<suffix>."""
    return ((method, "/v2/models/{model}" + suffix), (method, "/v2/models/{model}/versions/{version}" + suffix))


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("health.live", PUBLIC, "Is the server live", (("GET", "/v2/health/live"),), ("ServerLive",)),
    Endpoint("health.ready", PUBLIC, "Is the server ready", (("GET", "/v2/health/ready"),), ("ServerReady",)),
    Endpoint("health.check", PUBLIC, "grpc.health.v1 Check: SERVING when ready", grpc=("Check",)),
    Endpoint("health.watch", PUBLIC, "grpc.health.v1 Watch (not supported; poll Check)", grpc=("Watch",),
             implemented=False),
    Endpoint("server.metadata", "infer", "Server name, version and extensions", (("GET", "/v2"),),
             ("ServerMetadata",)),
    # Public: it describes the API and holds no data of this gateway (no models, no routes).
    Endpoint("api.openapi", PUBLIC, "The OpenAPI document of this HTTP API", (("GET", "/v2/openapi.json"),)),
    Endpoint("model.metadata", "infer", "A model's inputs, outputs and versions", _versioned("GET", ""),
             ("ModelMetadata",), target="model", grpc_target="name"),
    Endpoint("model.ready", "infer", "Is a model (version) ready", _versioned("GET", "/ready"), ("ModelReady",),
             target="model", grpc_target="name"),
    Endpoint("model.config", "infer", "A model's completed config", _versioned("GET", "/config"), ("ModelConfig",),
             target="model", grpc_target="name"),
    Endpoint("model.infer", "infer", "Run inference", _versioned("POST", "/infer"), ("ModelInfer",),
             read_only=False, target="model"),
    Endpoint("model.stream_infer", "infer", "Run inference on a bidirectional stream", grpc=("ModelStreamInfer",),
             read_only=False),
    Endpoint("stats.all", "read", "Statistics of every model", (("GET", "/v2/models/stats"),),
             ("ModelStatistics",)),
    Endpoint("stats.model", "read", "Statistics of a model (version)", _versioned("GET", "/stats"), target="model"),
    Endpoint("repository.index", "read", "The repository index", (("POST", "/v2/repository/index"),),
             ("RepositoryIndex",)),
    Endpoint("repository.load", "admin", "Load or reload a model (config override, pin, rollback)",
             (("POST", "/v2/repository/models/{model}/load"),), ("RepositoryModelLoad",), read_only=False,
             target="model", grpc_target="model_name"),
    Endpoint("repository.unload", "admin", "Unload a model", (("POST", "/v2/repository/models/{model}/unload"),),
             ("RepositoryModelUnload",), read_only=False, target="model", grpc_target="model_name"),
    Endpoint("routes.list", "read", "Every route", (("GET", "/v2/routes"),)),
    Endpoint("routes.get", "read", "One route", (("GET", "/v2/routes/{route}"),), target="route"),
    Endpoint("routes.put", "admin", "Add or replace a route", (("PUT", "/v2/routes/{route}"),), read_only=False,
             target="route"),
    Endpoint("routes.delete", "admin", "Delete a route", (("DELETE", "/v2/routes/{route}"),), read_only=False,
             target="route"),
    Endpoint("routes.comparison", "read", "A route's shadow comparison", (("GET", "/v2/routes/{route}/comparison"),),
             target="route"),
    Endpoint("routes.rollout", "read", "A route's rollout: phase, step, gates with their bounds, decisions",
             (("GET", "/v2/routes/{route}/rollout"),), target="route"),
    Endpoint("routes.rollout_action", "admin", "Pause, resume, promote or abort a route's rollout",
             (("POST", "/v2/routes/{route}/rollout/{action}"),), read_only=False, target="route"),
    Endpoint("models.summary", "read", "Every model and version: state, traffic and latency over the last minute",
             (("GET", "/v2/models/summary"),)),
    Endpoint("drift.report", "read", "The HTML drift report of a model's live window against its reference",
             (("GET", "/v2/drift/{model}/report"),), target="model"),
    # Public: the console's static files hold no data; the page asks the API for it with the user's token.
    Endpoint("console.index", PUBLIC, "The operator console (a static page)", (("GET", "/console"),)),
    Endpoint("console.file", PUBLIC, "A static file of the operator console", (("GET", "/console/{file}"),)),
    Endpoint("unsupported.shared_memory_status", "read", "the shared memory extension",
             tuple(("GET", f"/v2/{kind}sharedmemory{path}/status") for kind in ("system", "cuda")
                   for path in ("", "/region/{region}")),
             ("SystemSharedMemoryStatus", "CudaSharedMemoryStatus"), implemented=False),
    Endpoint("unsupported.shared_memory_register", "admin", "the shared memory extension",
             tuple(("POST", f"/v2/{kind}sharedmemory{path}") for kind in ("system", "cuda")
                   for path in ("/region/{region}/register", "/region/{region}/unregister", "/unregister")),
             ("SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryRegister",
              "CudaSharedMemoryUnregister"), read_only=False, implemented=False),
    Endpoint("unsupported.trace", "admin", "the trace extension",
             tuple((m, p) for p in ("/v2/trace/setting", "/v2/models/{model}/trace/setting") for m in ("GET", "POST")),
             ("TraceSetting",), read_only=False, implemented=False),
    Endpoint("unsupported.logging", "admin", "the logging extension",
             (("GET", "/v2/logging"), ("POST", "/v2/logging")), ("LogSettings",), read_only=False, implemented=False),
)

BY_NAME = {e.name: e for e in ENDPOINTS}

# Tensor parameters of the shared memory extension, which onnxgate does not support: a request
# that uses them is answered 501 / UNIMPLEMENTED (an ignored output region would leave the
# client reading stale memory).
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def uses_shared_memory(parameters: object) -> bool:
    """Whether a tensor's parameters (a dict, or a protobuf map) ask for shared memory."""
    return bool(parameters) and any(k in parameters for k in SHARED_MEMORY_PARAMETERS)  # type: ignore[operator]


def grpc_endpoints(methods: Iterable[str]) -> dict[str, Endpoint]:
    """The endpoint of each gRPC method; a method without one is an error (it would have no scope)."""
    by_method = {m: e for e in ENDPOINTS for m in e.grpc}
    missing = [m for m in methods if m not in by_method]
    if missing:
        raise LookupError(f"gRPC methods without an endpoint (and so without a scope): {missing}")
    return by_method


class HttpRouter:
    """Matches a request path to its endpoint: segments compared to each template of that length."""

    def __init__(self, endpoints: Iterable[Endpoint] = ENDPOINTS) -> None:
        # {segment count: [(template segments, {method: endpoint})]}: few templates per length
        self._by_length: dict[int, list[tuple[tuple[str, ...], dict[str, Endpoint]]]] = {}
        index: dict[tuple[str, ...], dict[str, Endpoint]] = {}
        for endpoint in endpoints:
            for method, path in endpoint.http:
                segments = tuple(path.strip("/").split("/"))
                methods = index.setdefault(segments, {})
                assert method not in methods, f"{method} {path} is declared twice"
                methods[method] = endpoint
        # literal templates before parameterized ones: /v2/models/stats is not model "stats"
        for segments, methods in sorted(index.items(), key=lambda kv: sum(s.startswith("{") for s in kv[0])):
            self._by_length.setdefault(len(segments), []).append((segments, methods))

    def match(self, parts: list[str]) -> tuple[dict[str, Endpoint], dict[str, str]] | None:
        """The methods served at the path ``parts`` (unquoted segments) and its parameters."""
        for template, methods in self._by_length.get(len(parts), ()):
            params: dict[str, str] = {}
            for want, got in zip(template, parts, strict=True):
                if want[0] == "{":
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, params
        return None
