"""Start a real onnxgate process on ephemeral loopback ports, for end-to-end tests."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loadtests.bench.procs import ServerProcess


class GatewayProcess(ServerProcess):
    """``python -m onnxgate serve`` on port 0; ports parsed from its log; stopped with SIGTERM."""

    def __init__(self, repository: Path | None = None, args: Sequence[str] = (), env: dict | None = None) -> None:
        self.repository = repository
        self.args = list(args)
        cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1"]
        cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
        if repository is not None:
            cmd += ["--model-repository", str(repository)]
        super().__init__([*cmd, *self.args], env=env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        super().start(timeout)
        return self

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def __enter__(self) -> GatewayProcess:
        return self.start()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
