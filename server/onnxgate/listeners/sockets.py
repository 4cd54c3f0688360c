"""What the HTTP and the gRPC listener share: the listening TCP socket, and the time that cut
requests get to answer after the drain's deadline."""

from __future__ import annotations

import socket

ANSWER_S = 0.5  # after the deadline: how long cut requests get to send their 503 / UNAVAILABLE


def listen(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket for uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
