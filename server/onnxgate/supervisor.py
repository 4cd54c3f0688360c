"""``onnxgate serve --workers N``: N gateway processes sharing the HTTP and gRPC ports.

The supervisor reserves the ports (SO_REUSEPORT, so port 0 works too), starts N workers that
each load their own sessions with ``cores // N`` threads and then listen on the same ports (the
kernel spreads connections between them), serves the Prometheus metrics of all workers together
(prometheus-client multiprocess mode) on the metrics port, and on SIGTERM/SIGINT forwards SIGTERM
so every worker drains, then exits 0. SIGHUP is forwarded (each worker runs its reloaders: routes,
tokens, TLS certificates); a worker not serving yet gets it once it is ready. With TLS each
worker builds its own contexts from the same files; the supervisor only checks them first, so
that a bad file exits 2 at once instead of failing every worker's start.

A worker that dies is restarted after a delay that starts at 0.5 s and doubles with each exit in
a row, up to 30 s; a worker that stayed up 60 s starts the sequence afresh. So a worker that
cannot start (say, routes naming a model the repository lacks) is retried ever more slowly
instead of in a tight loop, and comes up on the first try after the cause is fixed.

Workers die with the supervisor, however it ends: each holds the read end of a pipe whose write
end only the supervisor has, and drains when it reads end-of-file (:func:`watch_supervisor`).
The pipe works on every POSIX system and with threads, unlike ``PR_SET_PDEATHSIG`` set in a
``preexec_fn``.

Statistics: each worker shares a snapshot of its own in a directory the supervisor makes
(:mod:`onnxgate.core.serving.stats_share`), so the statistics extension answers for all workers.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from onnxgate.config import GatewayConfig
from onnxgate.core.security.access import METRICS_REFUSAL, AccessPolicy
from onnxgate.errors import ConfigError

log = logging.getLogger("onnxgate")

WORKER_ENV = "ONNXGATE_WORKER"  # "<index>:<count>:<ready dir>" in a worker's environment
LIFELINE_ENV = "ONNXGATE_SUPERVISOR_FD"  # the read end of the supervisor's pipe, in a worker
STATS_ENV = "ONNXGATE_WORKER_STATS"  # the directory where workers share statistics snapshots


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


def worker_stats_dir() -> Path | None:
    """The directory where this worker and its siblings share statistics; None outside a worker."""
    value = os.environ.get(STATS_ENV)
    return Path(value) if value else None


def watch_supervisor(on_gone: Callable[[], None]) -> Callable[[], None] | None:
    """In a worker, on the running loop: call ``on_gone`` once the supervisor has exited.

    The supervisor holds the only write end of the pipe whose read end the worker inherited, so
    the read end turns readable with end-of-file as soon as the supervisor is gone, killed or
    not. Returns a function that stops watching; ``None`` when this is not a worker."""
    value = os.environ.get(LIFELINE_ENV)
    if not value:
        return None
    fd = int(value)
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.error("supervisor gone: draining")
            on_gone()

    loop.add_reader(fd, readable)
    return lambda: loop.remove_reader(fd)


_METRICS_CONNECTIONS = 32  # scrapes served at once by the supervisor's metrics port
_METRICS_TIMEOUT_S = 10.0  # the longest a scrape's request may stall


def _serve_metrics(host: str, port: int, access: AccessPolicy) -> int:
    """All workers' metrics on one port (threads, off any event loop), behind the metrics token."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    slots = threading.BoundedSemaphore(_METRICS_CONNECTIONS)

    class Server(ThreadingMixIn, WSGIServer):
        """A thread per scrape, at most ``_METRICS_CONNECTIONS`` at once (more are closed)."""

        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def process_request(self, request: socket.socket, client_address: object) -> None:
            if not slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: socket.socket, client_address: object) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    class Quiet(WSGIRequestHandler):
        timeout = _METRICS_TIMEOUT_S  # a connection that stalls is closed, its thread freed

        def log_message(self, format: str, *args: object) -> None:  # a scrape is not news
            pass

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    app = make_wsgi_app(registry)

    def guarded(environ: dict, start_response: Callable) -> list[bytes]:
        if not access.metrics_allowed(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer")])
            return [orjson.dumps({"error": METRICS_REFUSAL})]
        return app(environ, start_response)

    server = make_server(host.strip("[]"), port, guarded, Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="onnxgate-metrics", daemon=True).start()
    return server.server_port


class Backoff:
    """Delays before restarting one worker: ``initial`` doubling with each exit, up to
    ``maximum``; an exit after ``stable_s`` or more of uptime starts again at ``initial``."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, stable_s: float = 60.0) -> None:
        self.initial, self.maximum, self.stable_s = initial, maximum, stable_s
        self._next = initial

    def after_exit(self, uptime: float) -> float:
        """The delay before the next start of a worker that exited after ``uptime`` seconds."""
        if uptime >= self.stable_s:
            self._next = self.initial
        delay = self._next
        self._next = min(self.maximum, delay * 2)
        return delay


@dataclass
class _Slot:
    """One worker index: its process (None while waiting to restart), when it started, and
    when it is due to start again."""

    backoff: Backoff
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    reload_due: bool = False  # a SIGHUP came while it was not serving: sent once it is ready


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(
        self, config: GatewayConfig, argv: Sequence[str], backoff: Callable[[], Backoff] = Backoff
    ) -> None:
        self.config = config
        self.argv = list(argv)
        self.count = config.server.workers
        self.slots = [_Slot(backoff()) for _ in range(self.count)]
        self._stopping = threading.Event()
        self._tmp = Path(tempfile.mkdtemp(prefix="onnxgate-workers-"))
        self.metrics_dir = self._tmp / "metrics"
        self.ready_dir = self._tmp / "ready"
        self.stats_dir = self._tmp / "stats"
        for d in (self.metrics_dir, self.ready_dir, self.stats_dir):
            d.mkdir()
        self._lifeline: tuple[int, int] | None = None  # (read end for the workers, write end)

    @property
    def workers(self) -> list[subprocess.Popen | None]:
        return [slot.proc for slot in self.slots]

    def _spawn(self, index: int, http_port: int, grpc_port: int) -> None:
        assert self._lifeline is not None
        read_end = self._lifeline[0]
        env = {
            **os.environ,
            WORKER_ENV: f"{index}:{self.count}:{self.ready_dir}",
            LIFELINE_ENV: str(read_end),
            STATS_ENV: str(self.stats_dir),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        cmd = [sys.executable, "-m", "onnxgate", "serve", *self.argv]
        cmd += ["--workers", "1", "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", "0"]
        slot = self.slots[index]
        # only the read end is inherited: the write end stays with us, so our exit is its EOF
        slot.proc = subprocess.Popen(cmd, env=env, pass_fds=(read_end,))
        slot.started = time.monotonic()
        slot.restart_at = None
        if slot.restarts:
            log.info("worker %d restarted as pid %d (restart %d)", index, slot.proc.pid, slot.restarts)

    def run(self) -> int:
        s = self.config.server
        if s.tls_cert_file:
            from onnxgate.listeners.tls import TlsFiles, read_material

            try:
                read_material(TlsFiles(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file))
            except ConfigError as exc:
                print(f"onnxgate: {exc.message}", file=sys.stderr)
                return 2
        # before anything is announced: a SIGTERM right after "listening" must stop us cleanly
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload())
        holds = [reserve(s.host, s.http_port), reserve(s.host, s.grpc_port)]
        http_port, grpc_port = (h.getsockname()[1] for h in holds)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        metrics_port = _serve_metrics(s.host, s.metrics_port, AccessPolicy(self.config.security, s.host))
        self._lifeline = os.pipe()
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
                self._spawn(i, http_port, grpc_port)
            announced = False
            while not self._stopping.wait(0.2):
                if not announced and len(list(self.ready_dir.iterdir())) >= self.count:
                    announced = True
                    for h in holds:
                        h.close()
                    log.info("ready: %d workers serving", self.count)
                self._restart_dead(http_port, grpc_port)
                self._reload(due_only=True)
            return self._stop()
        finally:
            # stopped: a signal now changes nothing (Python's exit would put back the default
            # action, which kills: a clean stop would exit -1 or -15 instead of 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            for h in holds:
                h.close()
            for fd in self._lifeline:
                os.close(fd)
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _restart_dead(self, http_port: int, grpc_port: int) -> None:
        """Note workers that exited, and start those whose backoff delay has passed."""
        from prometheus_client import multiprocess

        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            if self._stopping.is_set():  # SIGTERM meanwhile: no new worker to stop again
                return
            proc = slot.proc
            if proc is not None and proc.poll() is not None:
                delay = slot.backoff.after_exit(now - slot.started)
                slot.restarts += 1
                log.error(
                    "worker %d (pid %d) exited with %s; restarting it in %.1f s (restart %d)",
                    i, proc.pid, proc.returncode, delay, slot.restarts,
                )
                multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))
                (self.ready_dir / str(i)).unlink(missing_ok=True)
                slot.proc, slot.restart_at = None, now + delay
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(i, http_port, grpc_port)

    def _reload(self, due_only: bool = False) -> None:
        """SIGHUP: forwarded to every worker that serves; one that is starting (it may have read
        the files before they changed) or waiting to restart gets it once it is ready. Worker 0
        publishes the config file's routes to all (core.shared_table): a restarted one would otherwise
        take up the shared table and the reload would be lost. ``due_only``: deliver those due.
        Nothing once stopping: a draining worker has dropped its handler, and SIGHUP would kill it."""
        if self._stopping.is_set():
            return
        for i, slot in enumerate(self.slots):
            if due_only and not slot.reload_due:
                continue
            proc = slot.proc
            if proc is not None and proc.poll() is None and (self.ready_dir / str(i)).exists():
                slot.reload_due = False
                proc.send_signal(signal.SIGHUP)
            else:
                slot.reload_due = True

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
