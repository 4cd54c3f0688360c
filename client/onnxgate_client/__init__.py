"""Python client for onnxgate and any Open Inference Protocol (V2) server, numpy in and out.

::

    from onnxgate_client import Client

    with Client(["grpc://a:8001", "grpc://b:8001"], timeout=5.0, token=token) as client:
        out = client.infer("mlp", {"x": x}, outputs=["y"])          # {"y": ndarray}
        for result in client.stream_infer("mlp", ({"x": row} for row in rows)):
            ...

:class:`Client` (threads) and :class:`AsyncClient` (asyncio) share one API over gRPC and HTTP;
errors are one tree rooted at :class:`OnnxgateError` (see ``onnxgate_client._errors``). The
token (``token=``, default ``$ONNXGATE_TOKEN``) goes on every call; ``https://``/``grpcs://``
endpoints use TLS, with ``ca_file=``/``cert_file=``/``key_file=`` (see ``onnxgate_client._auth``).
It needs numpy, grpcio, protobuf and httpx, not ONNX Runtime. The generated gRPC stubs live in
``onnxgate_client.pb``.
"""

from onnxgate_client._client import AsyncClient, Client
from onnxgate_client._codec import datatype_of
from onnxgate_client._errors import (
    ConnectionFailed,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    OnnxgateError,
    Overloaded,
    PermissionDenied,
    RequestFailed,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unsupported,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionFailed",
    "DeadlineExceeded",
    "InvalidInput",
    "NotFound",
    "OnnxgateError",
    "Overloaded",
    "PermissionDenied",
    "RequestFailed",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
    "__version__",
    "datatype_of",
]
