"""What the HTTP and the gRPC listener share: the listening TCP socket, and the time that cut
requests get to answer after the drain's deadline."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

ANSWER_S = 0.5  # after the deadline: how long cut requests get to send their 503 / UNAVAILABLE


def listen(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket for uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {_address(host, port)}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_grpc(add_port: Callable[[str], int], host: str, port: int) -> int:
    """``add_port(address)`` (a grpc server's ``add_insecure_port`` or a secure one) with the
    failure said in one line, like a busy HTTP port (grpc raises a RuntimeError that says only
    "Failed to bind")."""
    address = _address(host, port)
    try:
        return add_port(address)
    except RuntimeError:
        message = f"cannot listen for gRPC on {address}: the address is in use or not available"
        raise OSError(errno.EADDRINUSE, message) from None
