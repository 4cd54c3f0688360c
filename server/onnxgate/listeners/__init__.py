"""listeners: the sockets and servers in front of the front ends.

- :mod:`.http_server`: uvicorn (httptools) with the connection, header and body limits of
  :class:`~.http_server.LimitedHttpProtocol`, drained to one deadline (:class:`~.http_server.HttpServer`);
- :mod:`.grpc_server`: the grpc.aio server options (:func:`~.grpc_server.grpc_options`) and its drain
  (:func:`~.grpc_server.drain_grpc`), whose cut :class:`~.grpc_server.RpcCutter` answers UNAVAILABLE;
- :mod:`.tls`: TLS and mTLS for both (:class:`~.tls.ServerTls`: the HTTP context, the gRPC credentials,
  the SIGHUP reload, the ASGI TLS extension of a connection);
- :mod:`.https_server`: the HTTP listener on TLS (:class:`~.https_server.HttpsServer`), with the ASGI TLS
  extension in every scope and the handshake bounded by the header timeout;
- :mod:`.sockets`: the listening socket (:func:`~.sockets.listen`) and what both drains share.

It may import onnxgate.config, onnxgate.frontends.status and onnxgate.errors, not onnxgate.core
nor onnxgate.lifecycle (which opens and drains the listeners).
"""
