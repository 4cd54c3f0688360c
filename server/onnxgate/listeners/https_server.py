"""The HTTP listener on TLS: :class:`~onnxgate.listeners.http_server.HttpServer` serving the
gateway's own ``ssl.SSLContext`` (:class:`~onnxgate.listeners.tls.ServerTls`), with the ASGI TLS
extension in every request's scope and a bound on the handshake. A plain listener is the
:class:`~onnxgate.listeners.http_server.HttpServer` itself and pays for none of this.

The handshake comes before the connection is made (asyncio calls ``connection_made`` once it is
done), so before the connection counts against ``http_max_connections`` and before its header
timeout starts. It is bounded by ``http_header_timeout_s`` instead, where uvicorn would leave
asyncio's 60 s.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from onnxgate.config import ServerConfig
from onnxgate.listeners.http_server import HttpServer, LimitedHttpProtocol
from onnxgate.listeners.tls import ServerTls

_HANDSHAKE_S = 60.0  # asyncio's default, when the header timeout is off


class TlsHttpProtocol(LimitedHttpProtocol):
    """:class:`LimitedHttpProtocol` on a TLS listener: every request's scope carries the ASGI TLS
    extension of its connection (``scope["extensions"]["tls"]``, see
    :func:`onnxgate.listeners.tls.asgi_tls_info`), computed once, when the connection is made."""

    def __init__(self, *args: Any, tls: ServerTls, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server_tls = tls
        self._tls_info: dict[str, Any] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls_info = self._server_tls.connection_info(ssl_object)
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": self._tls_info}  # type: ignore[typeddict-unknown-key]


class HttpsServer(HttpServer):
    """:class:`HttpServer` serving TLS only, with ``tls``'s context."""

    def __init__(self, app: Any, s: ServerConfig, tls: ServerTls) -> None:
        super().__init__(app, s, TlsHttpProtocol, tls=tls)
        self.config.load()  # now, so that uvicorn serves the gateway's context and builds none
        self.config.ssl = tls.http_context
        self._handshake_s = s.http_header_timeout_s or _HANDSHAKE_S

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup on the given sockets, with ``ssl_handshake_timeout``."""
        if not sockets:
            await super().startup(sockets)
            return
        await self.lifespan.startup()  # lifespan is off: nothing happens
        config, loop = self.config, asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
            )

        self.servers = [
            await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self._handshake_s,
            )
            for sock in sockets
        ]
        self.started = True
