"""Server subprocesses for the benchmark: the gateway and the echo servers, optionally pinned.

Both log ``listening: http H:P, grpc H:P, metrics H:P`` and then `` ready: `` on stderr (the same
idea as ``tests/support/gateway.py``'s ``GatewayProcess``, plus CPU pinning with ``taskset``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

_LISTENING = re.compile(r"listening: http \S+:(\d+), grpc \S+:(\d+), metrics \S+:(\d+)")


def taskset_prefix(cpus: Sequence[int] | None) -> list[str]:
    """``taskset -c LIST`` when ``cpus`` is given (and taskset exists)."""
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        raise RuntimeError("taskset is not installed (util-linux); run without pinning")
    return ["taskset", "-c", ",".join(map(str, cpus))]


class ServerProcess:
    """A server subprocess on ephemeral ports; stopped with SIGTERM."""

    def __init__(self, args: Sequence[str], cpus: Sequence[int] | None = None, env: dict | None = None) -> None:
        self.cmd = [*taskset_prefix(cpus), *args]
        self.env = {**os.environ, **(env or {})}
        self.cpus = list(cpus) if cpus else None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # taskset execs the command: same pid

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout) or not self.grpc_port:
            self.kill()
            raise RuntimeError(f"{self.cmd} did not become ready:\n{self.log}")
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

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def gateway(repository: Path, cpus: Sequence[int] | None = None, extra: Sequence[str] = ()) -> ServerProcess:
    """``onnxgate serve`` on ephemeral loopback ports, log level warning+ready lines."""
    args = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1", "--model-repository", str(repository)]
    args += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *extra]
    return ServerProcess(args, cpus)


def echo_servers(model: str, out_dim: int, cpus: Sequence[int] | None = None) -> ServerProcess:
    """The bare gRPC + HTTP echo servers answering like ``model`` does for one row."""
    args = [sys.executable, "-m", "loadtests.bench.echo_servers", "--model", model, "--out-dim", str(out_dim)]
    return ServerProcess(args, cpus, env={"PYTHONPATH": _pythonpath()})


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[2])  # the repository root
    current = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + current if current else "")
