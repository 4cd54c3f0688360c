"""A TCP relay on 127.0.0.1 to a gateway's port, for tests that need to see or shape the bytes
between a real client and the gateway: it counts the connections it accepted, and can make the
client-to-gateway direction lag (a network's latency on what is sent in a window)."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class TcpRelay:
    """Relays every connection made to :attr:`port` to ``127.0.0.1:upstream``."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self.lag, self.lag_until = 0.0, 0.0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def lag_for(self, seconds: float, lag: float) -> None:
        """Bytes a client sends in the next ``seconds`` reach the gateway ``lag`` s later; later
        bytes without delay, in order."""
        self.lag, self.lag_until = lag, time.monotonic() + seconds

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, upstream]
            chunks: queue.Queue = queue.Queue()  # what the client sent, each with when it is due
            threading.Thread(target=self._read, args=(client, chunks), daemon=True).start()
            threading.Thread(target=_release, args=(chunks, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def _read(self, source: socket.socket, chunks: queue.Queue) -> None:
        for data in _chunks(source):
            now = time.monotonic()
            chunks.put((now + self.lag if now < self.lag_until else 0.0, data))
        chunks.put((0.0, b""))


def _chunks(source: socket.socket):
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            yield data


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """The direction that never lags: ``source``'s bytes to ``sink`` as they come, then its EOF."""
    with contextlib.suppress(OSError):
        for data in _chunks(source):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _release(chunks: queue.Queue, sink: socket.socket) -> None:
    """Send each chunk once it is due; at the end, half-close ``sink`` (the other side's EOF)."""
    with contextlib.suppress(OSError):
        while True:
            due, data = chunks.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                break
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
