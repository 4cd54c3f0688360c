"""``Client`` and ``AsyncClient``: one API over gRPC and HTTP, numpy in and out.

Both take one endpoint URL or several (``grpc://``, ``grpcs://``, ``http://``, ``https://``,
mixed if you like). Calls go round robin over the endpoints; a connection failure, 503 /
UNAVAILABLE or 429 / RESOURCE_EXHAUSTED moves the call to the next endpoint within the call's
deadline; other errors are raised at once (see ``onnxgate_client._errors``).

``timeout`` on a call is its total deadline in seconds across every retry; ``None`` (the
default) means the client's ``timeout``, and ``Client(..., timeout=None)`` means no deadline.
Streams (``stream_infer``) have no deadline unless given one: they last as long as their input.

Repository calls (``load_model``, ``unload_model``) and ``statistics`` go to *one* endpoint like
every call; make one client per replica to manage or watch each of them.

Authentication and TLS (see ``onnxgate_client._auth``): ``token=`` (default: the
``ONNXGATE_TOKEN`` environment variable) is sent as ``authorization: Bearer <token>`` on every
request over both transports; ``https://`` and ``grpcs://`` endpoints use TLS, checked against
``ca_file`` when given, presenting ``cert_file``/``key_file`` to a server that wants a client
certificate. 401 / UNAUTHENTICATED and 403 / PERMISSION_DENIED raise :class:`Unauthenticated`
and :class:`PermissionDenied`, never retried.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from onnxgate_client import _codec, _ops
from onnxgate_client._auth import Credentials
from onnxgate_client._grpc import AsyncGrpcTransport, GrpcTransport
from onnxgate_client._http import AsyncHttpTransport, HttpTransport
from onnxgate_client._pool import AsyncTransport, Balancer, SyncTransport, parse_url, run_async, run_sync
from onnxgate_client._stream import (
    Inputs,
    Result,
    StreamBook,
    ordered_map_async,
    ordered_map_sync,
    stream_async,
    stream_sync,
)

T = TypeVar("T")
Outputs = dict[str, np.ndarray]
Params = Mapping[str, _codec.Scalar]
DEFAULT_TIMEOUT = 60.0
DEFAULT_WINDOW = 64


PathLike = str | os.PathLike[str]


def _transports(
    url: str | Sequence[str],
    grpc_transport: Callable[[str, str, Credentials], Any],
    http_transport: Callable[..., Any],
    connect_timeout: float,
    **credentials: Any,
) -> tuple[list[Any], Credentials]:
    """One transport per endpoint URL, of the kind its scheme names, all with the same credentials."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("a client needs at least one endpoint URL")
    parsed = [parse_url(u) for u in urls]
    creds = Credentials([f"{scheme}://" for scheme, _ in parsed], **credentials)
    transports = []
    for scheme, target in parsed:
        if scheme.startswith("grpc"):
            transports.append(grpc_transport(scheme, target, creds))
        else:
            transports.append(http_transport(target, creds, connect_timeout=connect_timeout))
    return transports, creds


class Client:
    """A synchronous, thread-safe client for one or more onnxgate (or any V2) endpoints.

    ``Client("grpc://host:8001").infer("model", {"x": array}, outputs=["y"])`` -> ``{"y": array}``.
    It keeps one gRPC channel per gRPC endpoint and a pool of kept-alive connections per HTTP
    endpoint; use it as a context manager or call :meth:`close`.

    ``token`` is sent on every call (``None``: ``$ONNXGATE_TOKEN``; ``""``: none). For TLS
    endpoints, ``ca_file`` is the PEM CA to check the server against and ``cert_file`` /
    ``key_file`` a client certificate (mTLS), for ``https://`` and ``grpcs://`` alike.
    ``verify`` (HTTPS) is httpx's: ``True``, ``False``, an ``ssl.SSLContext`` or a CA path;
    ``root_certificates`` (PEM bytes) are for ``grpcs://``. ``connect_timeout`` caps the time
    one HTTP attempt may spend connecting before the next endpoint is tried.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        token: str | None = None,
        ca_file: PathLike | None = None,
        cert_file: PathLike | None = None,
        key_file: PathLike | None = None,
        verify: bool | str | ssl.SSLContext = True,
        root_certificates: bytes | None = None,
    ) -> None:
        transports, self._credentials = _transports(
            url,
            GrpcTransport,
            HttpTransport,
            connect_timeout,
            token=token,
            verify=verify,
            root_certificates=root_certificates,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
        self.timeout = timeout
        self._balancer: Balancer[SyncTransport] = Balancer(transports)

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self._balancer.endpoints]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.urls!r}, timeout={self.timeout!r}, {self._credentials!r})"

    def _run(self, op: _ops.Op[T], timeout: float | None) -> T:
        return run_sync(self._balancer, op, self.timeout if timeout is None else timeout)

    # -- health and metadata ------------------------------------------------------------------
    def live(self, timeout: float | None = None) -> bool:
        """Whether the server is live; raises when no endpoint answers."""
        return self._run(_ops.live(), timeout)

    def ready(self, timeout: float | None = None) -> bool:
        """Whether the server is ready (and not draining)."""
        return self._run(_ops.ready(), timeout)

    def model_ready(self, name: str, version: str | int | None = None, timeout: float | None = None) -> bool:
        """Whether the model (version) can serve now; :class:`NotFound` when it is unknown."""
        return self._run(_ops.model_ready(name, version), timeout)

    def server_metadata(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"name", "version", "extensions"}``."""
        return self._run(_ops.server_metadata(), timeout)

    def model_metadata(
        self, name: str, version: str | int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """``{"name", "versions", "platform", "inputs", "outputs"}``; tensors ``{"name", "datatype", "shape"}``."""
        return self._run(_ops.model_metadata(name, version), timeout)

    def model_config(self, name: str, version: str | int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The model's configuration as Triton's ModelConfig JSON."""
        return self._run(_ops.model_config(name, version), timeout)

    def statistics(
        self, name: str | None = None, version: str | int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """``{"model_stats": [...]}`` of every model, one model, or one version."""
        return self._run(_ops.statistics(name, version), timeout)

    # -- repository ---------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False, timeout: float | None = None) -> list[dict[str, Any]]:
        """One ``{"name", "version"?, "state", "reason"?}`` per model version."""
        return self._run(_ops.repository_index(ready_only), timeout)

    def load_model(
        self, name: str, config: Mapping[str, Any] | str | None = None, timeout: float | None = None
    ) -> None:
        """Load or reload ``name``; ``config`` (a dict or JSON text) overrides its configuration."""
        self._run(_ops.load_model(name, config), timeout)

    def unload_model(self, name: str, timeout: float | None = None) -> None:
        self._run(_ops.unload_model(name), timeout)

    # -- routes (HTTP endpoints only) ---------------------------------------------------------
    def routes(self, timeout: float | None = None) -> Any:
        """``GET /v2/routes`` as parsed JSON."""
        return self._run(_ops.routes(), timeout)

    def route_comparison(self, name: str, timeout: float | None = None) -> Any:
        """``GET /v2/routes/{name}/comparison`` as parsed JSON; :class:`NotFound` for an unknown route."""
        return self._run(_ops.route_comparison(name), timeout)

    # -- inference ----------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        timeout: float | None = None,
        *,
        parameters: Params | None = None,
    ) -> Outputs:
        """Run one request: ``{"x": array}`` in, ``{"y": array}`` out (every output when ``outputs`` is None)."""
        request = _codec.make_request(model, inputs, outputs, version, parameters)
        return self._run(_ops.infer(request), timeout)

    def stream_infer(
        self,
        model: str,
        inputs: Iterable[Inputs],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        timeout: float | None = None,
        parameters: Params | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[Result]:
        """One result per input dict, in input order, up to ``window`` requests in flight.

        Uses one ``ModelStreamInfer`` stream on a gRPC endpoint (failing over to the next one,
        see ``_stream``); a client with only HTTP endpoints runs concurrent infer calls instead.
        A failed request raises, or with ``return_exceptions`` its exception takes its place.
        """
        grpc_transports = [e.transport for e in self._balancer.order(lambda e: e.transport.kind == "grpc")]
        if not grpc_transports:
            return ordered_map_sync(
                lambda feeds: self.infer(model, feeds, outputs, version, parameters=parameters),
                inputs,
                window,
                return_exceptions,
            )
        book = StreamBook(model, version, outputs, parameters, window, return_exceptions)
        return stream_sync(grpc_transports, inputs, book, timeout)  # type: ignore[arg-type]

    def infer_many(
        self,
        model: str,
        inputs: Iterable[Inputs],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        **kwargs: Any,
    ) -> list[Result]:
        """``list(stream_infer(...))``."""
        return list(self.stream_infer(model, inputs, outputs, version, **kwargs))

    def close(self) -> None:
        for e in self._balancer.endpoints:
            e.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same methods, as coroutines.

    ``stream_infer`` returns an async iterator and also takes an async iterable of inputs.
    Channels and connection pools are created on first use and bound to that event loop; use
    ``async with AsyncClient(...)`` or ``await client.close()``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        token: str | None = None,
        ca_file: PathLike | None = None,
        cert_file: PathLike | None = None,
        key_file: PathLike | None = None,
        verify: bool | str | ssl.SSLContext = True,
        root_certificates: bytes | None = None,
    ) -> None:
        transports, self._credentials = _transports(
            url,
            AsyncGrpcTransport,
            AsyncHttpTransport,
            connect_timeout,
            token=token,
            verify=verify,
            root_certificates=root_certificates,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
        self.timeout = timeout
        self._balancer: Balancer[AsyncTransport] = Balancer(transports)

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self._balancer.endpoints]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.urls!r}, timeout={self.timeout!r}, {self._credentials!r})"

    async def _run(self, op: _ops.Op[T], timeout: float | None) -> T:
        return await run_async(self._balancer, op, self.timeout if timeout is None else timeout)

    async def live(self, timeout: float | None = None) -> bool:
        return await self._run(_ops.live(), timeout)

    async def ready(self, timeout: float | None = None) -> bool:
        return await self._run(_ops.ready(), timeout)

    async def model_ready(self, name: str, version: str | int | None = None, timeout: float | None = None) -> bool:
        return await self._run(_ops.model_ready(name, version), timeout)

    async def server_metadata(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._run(_ops.server_metadata(), timeout)

    async def model_metadata(
        self, name: str, version: str | int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self._run(_ops.model_metadata(name, version), timeout)

    async def model_config(
        self, name: str, version: str | int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self._run(_ops.model_config(name, version), timeout)

    async def statistics(
        self, name: str | None = None, version: str | int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self._run(_ops.statistics(name, version), timeout)

    async def repository_index(self, ready_only: bool = False, timeout: float | None = None) -> list[dict[str, Any]]:
        return await self._run(_ops.repository_index(ready_only), timeout)

    async def load_model(
        self, name: str, config: Mapping[str, Any] | str | None = None, timeout: float | None = None
    ) -> None:
        await self._run(_ops.load_model(name, config), timeout)

    async def unload_model(self, name: str, timeout: float | None = None) -> None:
        await self._run(_ops.unload_model(name), timeout)

    async def routes(self, timeout: float | None = None) -> Any:
        return await self._run(_ops.routes(), timeout)

    async def route_comparison(self, name: str, timeout: float | None = None) -> Any:
        return await self._run(_ops.route_comparison(name), timeout)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        timeout: float | None = None,
        *,
        parameters: Params | None = None,
    ) -> Outputs:
        request = _codec.make_request(model, inputs, outputs, version, parameters)
        return await self._run(_ops.infer(request), timeout)

    def stream_infer(
        self,
        model: str,
        inputs: Iterable[Inputs] | AsyncIterable[Inputs],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        timeout: float | None = None,
        parameters: Params | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Result]:
        """See :meth:`Client.stream_infer`; iterate with ``async for``."""
        grpc_transports = [e.transport for e in self._balancer.order(lambda e: e.transport.kind == "grpc")]
        if not grpc_transports:
            return ordered_map_async(
                lambda feeds: self.infer(model, feeds, outputs, version, parameters=parameters),
                inputs,
                window,
                return_exceptions,
            )
        book = StreamBook(model, version, outputs, parameters, window, return_exceptions)
        return stream_async(grpc_transports, inputs, book, timeout)  # type: ignore[arg-type]

    async def infer_many(
        self,
        model: str,
        inputs: Iterable[Inputs] | AsyncIterable[Inputs],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        **kwargs: Any,
    ) -> list[Result]:
        """All results of :meth:`stream_infer`, in input order."""
        return [r async for r in self.stream_infer(model, inputs, outputs, version, **kwargs)]

    async def close(self) -> None:
        for e in self._balancer.endpoints:
            await e.transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
