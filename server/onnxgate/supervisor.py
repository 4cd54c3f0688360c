"""``onnxgate serve --workers N``: N gateway processes sharing the HTTP and gRPC ports.

The supervisor reserves the ports (SO_REUSEPORT, so port 0 works too), starts N workers that
each load their own sessions with ``cores // N`` threads and then listen on the same ports (the
kernel spreads connections between them), serves the Prometheus metrics of all workers together
(prometheus-client multiprocess mode) on the metrics port, restarts a worker that dies, and on
SIGTERM/SIGINT forwards SIGTERM so every worker drains, then exits 0. SIGHUP is forwarded.

Each worker answers the statistics extension for itself only.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from onnxgate.config import GatewayConfig

log = logging.getLogger("onnxgate")

WORKER_ENV = "ONNXGATE_WORKER"  # "<index>:<count>:<ready dir>" in a worker's environment


def reserve(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket holding ``port`` (0 = any) for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_info() -> tuple[int, int, Path] | None:
    """(index, count, ready dir) when this process is a worker of a supervisor."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, count, ready_dir = value.split(":", 2)
    return int(index), int(count), Path(ready_dir)


def _serve_metrics(host: str, port: int) -> int:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: GatewayConfig, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.count = config.server.workers
        self.workers: list[subprocess.Popen | None] = [None] * self.count
        self._stopping = threading.Event()
        self._tmp = Path(tempfile.mkdtemp(prefix="onnxgate-workers-"))
        self.metrics_dir = self._tmp / "metrics"
        self.ready_dir = self._tmp / "ready"
        self.metrics_dir.mkdir()
        self.ready_dir.mkdir()

    def _spawn(self, index: int, http_port: int, grpc_port: int) -> subprocess.Popen:
        env = {
            **os.environ,
            WORKER_ENV: f"{index}:{self.count}:{self.ready_dir}",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        cmd = [sys.executable, "-m", "onnxgate", "serve", *self.argv]
        cmd += ["--workers", "1", "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", "0"]
        return subprocess.Popen(cmd, env=env)

    def run(self) -> int:
        s = self.config.server
        # before anything is announced: a SIGTERM right after "listening" must stop us cleanly
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._forward(signal.SIGHUP))
        holds = [reserve(s.host, s.http_port), reserve(s.host, s.grpc_port)]
        http_port, grpc_port = (h.getsockname()[1] for h in holds)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        metrics_port = _serve_metrics(s.host, s.metrics_port)
        log.info(
            "listening: http %s:%d, grpc %s:%d, metrics %s:%d; %d workers",
            s.host,
            http_port,
            s.host,
            grpc_port,
            s.host,
            metrics_port,
            self.count,
        )
        try:
            for i in range(self.count):
                self.workers[i] = self._spawn(i, http_port, grpc_port)
            announced = False
            while not self._stopping.wait(0.2):
                if not announced and len(list(self.ready_dir.iterdir())) >= self.count:
                    announced = True
                    for h in holds:
                        h.close()
                    log.info("ready: %d workers serving", self.count)
                self._restart_dead(http_port, grpc_port)
            return self._stop()
        finally:
            for h in holds:
                h.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _restart_dead(self, http_port: int, grpc_port: int) -> None:
        from prometheus_client import multiprocess

        for i, proc in enumerate(self.workers):
            if proc is not None and proc.poll() is not None and not self._stopping.is_set():
                log.error("worker %d (pid %d) exited with %s; restarting it", i, proc.pid, proc.returncode)
                multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))
                (self.ready_dir / str(i)).unlink(missing_ok=True)
                if self._stopping.wait(0.5):  # SIGTERM meanwhile: no new worker to stop again
                    self.workers[i] = None
                    return
                self.workers[i] = self._spawn(i, http_port, grpc_port)

    def _forward(self, sig: int) -> None:
        for proc in self.workers:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)

    def _stop(self) -> int:
        """SIGTERM every worker and wait for its drain. A worker that had not reported ready yet
        listens on nothing (workers load before they listen), so SIGTERM ending it before its own
        handler is installed (exit status -SIGTERM) is a clean stop too."""
        log.info("stopping %d workers", self.count)
        ready = {i for i in range(self.count) if (self.ready_dir / str(i)).exists()}
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.drain_delay_s + self.config.server.drain_timeout_s + 10
        clean = True
        for i, proc in enumerate(self.workers):
            if proc is None:
                continue
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0 and not (code == -signal.SIGTERM and i not in ready):
                log.error("worker %d (pid %d) exited with %s while stopping", i, proc.pid, code)
                clean = False
        log.info("stopped")
        return 0 if clean else 1
