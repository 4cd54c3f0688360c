"""Start a real onnxgate process on ephemeral loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_LISTENING = re.compile(r"listening: http \S+:(\d+), grpc \S+:(\d+), metrics \S+:(\d+)")


class GatewayProcess:
    """``python -m onnxgate serve`` on port 0; ports parsed from its log; stopped with SIGTERM."""

    def __init__(self, repository: Path | None = None, args: Sequence[str] = (), env: dict | None = None) -> None:
        self.repository = repository
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1"]
        cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
        if self.repository is not None:
            cmd += ["--model-repository", str(self.repository)]
        cmd += self.args
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout) or not self.http_port:
            self.kill()
            raise RuntimeError(f"gateway did not become ready:\n{self.log}")
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := _LISTENING.search(line):
                self.http_port, self.grpc_port, self.metrics_port = map(int, m.groups())
            if " ready: " in line:
                self._ready.set()
        self._ready.set()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
