"""Every API call as an :class:`Op`: what to send over HTTP and over gRPC, and how to read the reply.

Transports only move bytes and map failures to exceptions; clients only pick endpoints. Replies
have the same Python shape on both transports: the V2 JSON documents as dicts (64-bit integers
as ``int``, as in the HTTP JSON), infer outputs as numpy arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from onnxgate_client import _codec
from onnxgate_client._errors import ServerError
from onnxgate_client.pb import grpc_service_pb2 as pb

T = TypeVar("T")


def _is_200(status: int) -> bool:
    return status == 200


@dataclass(frozen=True, slots=True)
class HttpCall(Generic[T]):
    """One HTTP exchange; ``accept`` says which statuses ``parse`` reads (others raise)."""

    method: str
    path: str
    parse: Callable[[int, Mapping[str, str], bytes], T]
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    accept: Callable[[int], bool] = _is_200


@dataclass(frozen=True, slots=True)
class GrpcCall(Generic[T]):
    """One unary gRPC call: the method name on ``GRPCInferenceService``, its request, a reader."""

    rpc: str
    request: Message
    parse: Callable[[Any], T]


class Op(Generic[T]):
    """A call as each transport makes it, built on first use (``None``: that transport cannot)."""

    __slots__ = ("_grpc", "_http", "make_grpc", "make_http", "name")

    def __init__(
        self,
        name: str,
        make_http: Callable[[], HttpCall[T]] | None,
        make_grpc: Callable[[], GrpcCall[T]] | None,
    ) -> None:
        self.name = name
        self.make_http = make_http
        self.make_grpc = make_grpc
        self._http: HttpCall[T] | None = None
        self._grpc: GrpcCall[T] | None = None

    def http(self) -> HttpCall[T]:
        if self._http is None:
            assert self.make_http is not None
            self._http = self.make_http()
        return self._http

    def grpc(self) -> GrpcCall[T]:
        if self._grpc is None:
            assert self.make_grpc is not None
            self._grpc = self.make_grpc()
        return self._grpc


# -- helpers --------------------------------------------------------------------------------

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def message_dict(message: Message) -> dict[str, Any]:
    """A message as the V2 JSON document: proto field names, defaults included, int64 as int."""
    doc = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _ints(message.DESCRIPTOR, doc)
    return doc


def _ints(descriptor: Any, doc: dict[str, Any]) -> None:
    for f in descriptor.fields:
        if f.name not in doc:
            continue
        value = doc[f.name]
        if f.type in _INT64:
            doc[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = f.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                for k, v in value.items():
                    if value_field.type in _INT64:
                        value[k] = int(v)
                    elif value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        _ints(value_field.message_type, v)
            elif isinstance(value, list):
                for item in value:
                    _ints(sub, item)
            elif isinstance(value, dict):
                _ints(sub, value)


def _json(status: int, headers: Mapping[str, str], body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError as exc:
        raise ServerError(f"reply is not JSON: {exc}") from None


def _none(*_: Any) -> None:
    return None


def _model_path(name: str, version: str | int | None) -> str:
    path = f"/v2/models/{quote(name, safe='')}"
    v = _codec.version_str(version)
    return f"{path}/versions/{quote(v, safe='')}" if v else path


def _post_json(doc: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


# -- health and metadata --------------------------------------------------------------------


def _any_status(status: int) -> bool:
    return True


def _not_ready_status(status: int) -> bool:
    # 503 (onnxgate) and 400 (Triton) mean "not ready"; 404 raises NotFound, as on gRPC.
    return status in (200, 400, 503)


def _status_200(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    return status == 200


def live() -> Op[bool]:
    return Op(
        "live",
        lambda: HttpCall("GET", "/v2/health/live", _status_200, accept=_any_status),
        lambda: GrpcCall("ServerLive", pb.ServerLiveRequest(), lambda r: bool(r.live)),
    )


def ready() -> Op[bool]:
    return Op(
        "ready",
        lambda: HttpCall("GET", "/v2/health/ready", _status_200, accept=_any_status),
        lambda: GrpcCall("ServerReady", pb.ServerReadyRequest(), lambda r: bool(r.ready)),
    )


def model_ready(name: str, version: str | int | None) -> Op[bool]:
    v = _codec.version_str(version)
    return Op(
        "model_ready",
        lambda: HttpCall("GET", _model_path(name, v) + "/ready", _status_200, accept=_not_ready_status),
        lambda: GrpcCall("ModelReady", pb.ModelReadyRequest(name=name, version=v), lambda r: bool(r.ready)),
    )


def server_metadata() -> Op[dict[str, Any]]:
    return Op(
        "server_metadata",
        lambda: HttpCall("GET", "/v2", _json),
        lambda: GrpcCall("ServerMetadata", pb.ServerMetadataRequest(), message_dict),
    )


def model_metadata(name: str, version: str | int | None) -> Op[dict[str, Any]]:
    v = _codec.version_str(version)
    return Op(
        "model_metadata",
        lambda: HttpCall("GET", _model_path(name, v), _json),
        lambda: GrpcCall("ModelMetadata", pb.ModelMetadataRequest(name=name, version=v), message_dict),
    )


def model_config(name: str, version: str | int | None) -> Op[dict[str, Any]]:
    v = _codec.version_str(version)
    return Op(
        "model_config",
        lambda: HttpCall("GET", _model_path(name, v) + "/config", _json),
        lambda: GrpcCall("ModelConfig", pb.ModelConfigRequest(name=name, version=v), lambda r: message_dict(r.config)),
    )


def statistics(name: str | None, version: str | int | None) -> Op[dict[str, Any]]:
    v = _codec.version_str(version)
    path = _model_path(name, v) + "/stats" if name else "/v2/models/stats"
    return Op(
        "statistics",
        lambda: HttpCall("GET", path, _json),
        lambda: GrpcCall("ModelStatistics", pb.ModelStatisticsRequest(name=name or "", version=v), message_dict),
    )


# -- repository -----------------------------------------------------------------------------


def _index_rows(r: pb.RepositoryIndexResponse) -> list[dict[str, Any]]:
    rows = []
    for m in r.models:
        row = {"name": m.name, "state": m.state}
        if m.version:
            row["version"] = m.version
        if m.reason:
            row["reason"] = m.reason
        rows.append(row)
    return rows


def repository_index(ready_only: bool = False) -> Op[list[dict[str, Any]]]:
    body, headers = _post_json({"ready": True} if ready_only else {})
    return Op(
        "repository_index",
        lambda: HttpCall("POST", "/v2/repository/index", _json, body, headers),
        lambda: GrpcCall("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only), _index_rows),
    )


def load_model(name: str, config: Mapping[str, Any] | str | None) -> Op[None]:
    """Load or reload ``name``; ``config`` (a dict or a JSON string) overrides its configuration."""
    config_json = json.dumps(config) if config is not None and not isinstance(config, str) else config
    body, headers = _post_json({"parameters": {"config": config_json}} if config_json is not None else {})

    def grpc_call() -> GrpcCall[None]:
        request = pb.RepositoryModelLoadRequest(model_name=name)
        if config_json is not None:
            request.parameters["config"].string_param = config_json
        return GrpcCall("RepositoryModelLoad", request, _none)

    path = f"/v2/repository/models/{quote(name, safe='')}/load"
    return Op("load_model", lambda: HttpCall("POST", path, _none, body, headers), grpc_call)


def unload_model(name: str) -> Op[None]:
    body, headers = _post_json({"parameters": {"unload_dependents": False}})

    def grpc_call() -> GrpcCall[None]:
        request = pb.RepositoryModelUnloadRequest(model_name=name)
        request.parameters["unload_dependents"].bool_param = False
        return GrpcCall("RepositoryModelUnload", request, _none)

    path = f"/v2/repository/models/{quote(name, safe='')}/unload"
    return Op("unload_model", lambda: HttpCall("POST", path, _none, body, headers), grpc_call)


# -- routes (HTTP only) ---------------------------------------------------------------------


def routes() -> Op[Any]:
    return Op("routes", lambda: HttpCall("GET", "/v2/routes", _json), None)


def route_comparison(name: str) -> Op[Any]:
    path = f"/v2/routes/{quote(name, safe='')}/comparison"
    return Op("route_comparison", lambda: HttpCall("GET", path, _json), None)


# -- inference ------------------------------------------------------------------------------


def _http_infer_reply(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, np.ndarray]:
    raw = headers.get("inference-header-content-length")
    try:
        header_length = int(raw) if raw is not None else None
    except ValueError:
        raise ServerError(f"Inference-Header-Content-Length is not an integer: {raw!r}") from None
    return _codec.http_outputs(body, header_length)


def infer(request: _codec.InferRequest) -> Op[dict[str, np.ndarray]]:
    def http_call() -> HttpCall[dict[str, np.ndarray]]:
        body, headers = _codec.http_request(request)
        path = _model_path(request.model, request.version) + "/infer"
        return HttpCall("POST", path, _http_infer_reply, body, headers)

    return Op("infer", http_call, lambda: GrpcCall("ModelInfer", _codec.grpc_request(request), _codec.grpc_outputs))
