"""Shared pieces of the sample-log tests: a real HTTP collector on port 0, samples, config, a
tiny disk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from onnxgate.core.inference import InferInput, InferOutput, InferRequest, InferResponse
from onnxgate.core.monitoring.config import SampleLogConfig
from onnxgate.core.monitoring.records import Sample
from onnxgate.core.monitoring.sample_log import SampleLogger


class Collector:
    """A real HTTP server on 127.0.0.1:0 that keeps every POST; answers ``statuses`` in order, then 200."""

    def __init__(self, statuses: tuple[int, ...] = (), hold: threading.Event | None = None) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses)
        self.hold = hold
        self.lock = threading.Lock()
        self.arrived = 0  # POSTs received, answered or not (held)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.arrived += 1
                if outer.hold is not None:
                    outer.hold.wait(20)
                with outer.lock:
                    outer.posts.append((dict(self.headers), body))
                    status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"

    def __enter__(self) -> Collector:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def held(self) -> int:
        """POSTs received and not answered yet (held until ``hold`` is set)."""
        with self.lock:
            return self.arrived - len(self.posts)

    def wait_arrived(self, count: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.arrived >= count:
                    return True
            time.sleep(0.01)
        return False

    def events(self) -> list[dict]:
        with self.lock:
            return [e for _, body in self.posts for e in json.loads(body)]


def sample(
    i: int,
    *,
    model: str = "m",
    protocol: str = "http",
    error: Exception | None = None,
    rows: int = 2,
    noisy: bool = False,
) -> Sample:
    x = (np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + i) / 4
    if noisy:  # incompressible values
        x = np.random.default_rng(i).random((rows, 3), dtype=np.float32)
    words = np.array([f"w{i}-{r}-é" for r in range(rows)], dtype=object)
    headers = {"x-user-id": f"u{i}", "authorization": "secret"}
    request = InferRequest(
        model, "", [InferInput("x", "FP32", [rows, 3], x), InferInput("s", "BYTES", [rows], words)], id=f"r{i}"
    )
    request.protocol, request.headers = protocol, headers
    response = None
    if error is None:
        response = InferResponse(model, "1", [InferOutput("y", "INT64", [rows], np.arange(rows) + i)], id=f"r{i}")
    return Sample(
        request,
        response,
        error,
        "route-" + model,
        model,
        "1" if error is None else "",
        protocol,
        0.002,
        time=1714564800.0 + i,
    )


def cfg(sink: dict, **extra: object) -> SampleLogConfig:
    return SampleLogConfig.from_dict({"default": {"rate": 1.0}, "headers": ["X-User-Id"], "sink": sink, **extra})


def run(coro):
    return asyncio.run(coro)


async def write_all(logger: SampleLogger, samples: list[Sample], timeout: float = 20.0) -> list[bool]:
    logger.start()
    accepted = [logger.offer(s) for s in samples]
    await logger.close(timeout)
    return accepted


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


@contextlib.contextmanager
def tiny_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("256k", "1m") at ``mount``: a disk that fills up (the test is skipped
    without root and mount rights)."""
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
