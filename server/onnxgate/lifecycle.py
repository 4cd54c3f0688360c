"""Composition root: build the core, start the front ends on one loop, own signals, drain.

Start: TLS files checked (when configured) -> listeners open (live, not ready) -> the repository
loads -> ready.
SIGHUP: :attr:`Gateway.reloaders` run in order (routes, then TLS certificates); each failure is
logged and the others still run.
Stop (SIGTERM/SIGINT): readiness false -> optional delay while still serving -> then one budget,
``drain_timeout_s``, for all that follows: listeners stop accepting and in-flight requests
finish until the deadline, what is left is answered 503 / UNAVAILABLE; shadows, the sample log
(always closed, so its files are renamed), drift and the versions each get what remains of the
budget -> sessions are released.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, make_asgi_app

from onnxgate import config as config_mod
from onnxgate.config import GatewayConfig
from onnxgate.core.metrics import Metrics
from onnxgate.core.monitoring.access_log import AccessLogger
from onnxgate.core.monitoring.drift import DriftMonitor
from onnxgate.core.monitoring.sample_log import SampleLogger
from onnxgate.core.registry.config import open_repository
from onnxgate.core.registry.object_store import redact_url
from onnxgate.core.registry.rollout_actions import RolloutRegistryActions
from onnxgate.core.security.access import AccessPolicy
from onnxgate.core.security.audit import AuditLog
from onnxgate.core.service import InferenceService
from onnxgate.core.serving.control_share import ModelControlShare
from onnxgate.core.serving.manager import ModelManager
from onnxgate.core.serving.model import LoadOptions
from onnxgate.core.serving.poller import RepositoryPoller
from onnxgate.core.serving.sessions import available_cores
from onnxgate.core.serving.stats_share import SharedStats
from onnxgate.core.shared_table import SharedTable
from onnxgate.core.tracing import Tracing
from onnxgate.core.traffic.rollout_share import RolloutShare
from onnxgate.core.traffic.rollout_webhook import RolloutWebhooks
from onnxgate.errors import GatewayError
from onnxgate.frontends import grpc_service
from onnxgate.frontends.grpc_access import GrpcAccess
from onnxgate.frontends.http_app import HttpApp, guarded_metrics
from onnxgate.listeners.grpc_server import RpcCutter, drain_grpc, grpc_options
from onnxgate.listeners.http_server import HttpServer
from onnxgate.listeners.https_server import HttpsServer
from onnxgate.listeners.sockets import bind_grpc, listen
from onnxgate.listeners.tls import ServerTls
from onnxgate.supervisor import watch_supervisor, worker_info, worker_stats_dir

log = logging.getLogger("onnxgate")

# A closing step that overruns the budget it was given by more than this is abandoned, so that
# one stuck step can hold neither the exit nor the steps after it (the sample log's among them).
_OVERRUN_S = 1.0


def demo_repository() -> Path:
    """The bundled demo model repository."""
    return Path(str(resources.files("onnxgate.demo") / "models"))


class Gateway:
    """One gateway process: core, gRPC and HTTP front ends, metrics endpoint."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        s = config.server
        self.repository_location = s.model_repository or str(demo_repository())
        self.worker = worker_info()
        self.metrics = Metrics(registry)
        self.manager = ModelManager(
            open_repository(self.repository_location, config.registry),
            LoadOptions(
                default_max_batch_size=s.default_max_batch_size,
                cpu_threads=s.cpu_threads,
                cpu_budget=max(1, available_cores() // self.worker[1]) if self.worker else 0,
                max_queue_bytes=s.max_queued_bytes_per_model,
                scheduler=s.scheduler,
            ),
            metrics=self.metrics,
        )
        self.service = InferenceService(self.manager, self.metrics, s.decode_budget_bytes)
        self.service.control.mode = s.model_control_mode
        self.service.control.shared = self.worker is None  # a worker would change itself alone
        stats_dir = worker_stats_dir() if self.worker is not None else None
        self.shared_stats = SharedStats(stats_dir, self.manager.all_stats) if stats_dir is not None else None
        self.service.shared_stats = self.shared_stats
        self.drift = DriftMonitor(config.drift, self.metrics.registry) if config.drift.models else None
        self.sample_log = (
            SampleLogger(config.sample_log, self.metrics.registry, observers=[self.drift.observe] if self.drift else ())
            if config.sample_log is not None
            else None
        )
        self.service.attach_sample_log(self.sample_log)
        self.service.drift = self.drift  # GET /v2/drift/{model}/report, the thresholds in the summary
        self.tracing = Tracing.from_env()  # OTEL_* environment; None: off (raises when asked and impossible)
        self.access_log = AccessLogger(config.access_log, self.metrics.registry) if config.access_log else None
        self.service.attach_observers(self.tracing, self.access_log)
        self.webhooks = RolloutWebhooks(self.metrics.registry)
        self.registry_actions = None  # MLflow: a rollout's end moves an alias or tags a version
        if hasattr(self.manager.repository, "set_alias"):
            self.registry_actions = RolloutRegistryActions(self.manager.repository, self._serving_version,
                                                           self.metrics.registry)
        share: dict[str, Any] = {}
        if self.worker is not None and stats_dir is not None:  # worker 0 judges, on every worker's evidence
            state_dir = Path(config.rollouts.state_dir) if config.rollouts.state_dir else stats_dir / "rollouts"
            share = {"share": RolloutShare(state_dir / "shared", leader=self.worker[0] == 0),
                     "state_dir": str(state_dir)}
        self.service.configure_rollouts(
            config.rollouts, self.webhooks.notify, *([self.registry_actions.notify] if self.registry_actions else []),
            **share,
        )
        self._rollout_task: asyncio.Task | None = None
        self._route_task: asyncio.Task | None = None  # --workers N: following the shared route table
        self._model_task: asyncio.Task | None = None  # --workers N: following the shared model control state
        self.poller = RepositoryPoller(self.manager, s.repository_poll_secs) if s.model_control_mode == "poll" else None
        self.access = AccessPolicy(config.security, s.host, require_client_cert=bool(s.tls_client_ca_file))
        self.audit = AuditLog(config.security.audit_log)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._rpcs = RpcCutter()
        self._http: list[tuple[HttpServer, asyncio.Task]] = []
        self._stop = asyncio.Event()
        self.tls: ServerTls | None = None  # loaded by start() when tls_cert_file is set
        # What SIGHUP runs, in order: sync, or returning an awaitable that is awaited. A failure is
        # logged and the rest still run. Do file I/O off the loop (asyncio.to_thread).
        self.reloaders: list[Callable[[], Awaitable[object] | object]] = [self.reload_routes, self.reload_tokens]
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Open every listener, then load the repository; ready once the load has finished.

        A worker of ``--workers N`` (and ``--listen-after-load``) loads first and listens after,
        so that no connection reaches a gateway whose models are still loading."""
        if self.config.server.tls_cert_file:  # bad files fail the start before anything else
            self.tls = await asyncio.to_thread(ServerTls.load, self.config.server)
            self.reloaders.append(self.tls.reload)
        if self.drift is not None:
            await self.drift.start()
        if self.sample_log is not None:
            self.sample_log.start()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.start)  # opens its file: a bad path fails the start
        if self.shared_stats is not None:
            self.shared_stats.start()
        if self.worker is None and not self.config.server.listen_after_load:
            await self._listen()
            await self._load()
        else:
            await self._load()
            await self._listen()
        self.service.ready = True
        # What start-up made (modules, sessions, configs) lives as long as the process: frozen,
        # out of the collector's sight. And a young generation of 10 000 objects, not 700: with
        # 64 requests in flight, every young collection walked their live objects again; at
        # gemm16, C=64, HTTP, that was 6 % of the gateway's CPU, and is 0.6 % now (4 500 young
        # collections in 12 s became 130). Cyclic garbage waits a little longer to be freed.
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        rows = self.manager.index()
        ready = sum(r.state == "READY" for r in rows)
        if self.worker is None:
            log.info("ready: %d of %d model versions serving", ready, len(rows))
        else:
            index, _, ready_dir = self.worker
            log.info("worker %d serving %d of %d model versions", index, ready, len(rows))
            (ready_dir / str(index)).touch()

    async def _listen(self) -> None:
        s = self.config.server
        self._grpc = grpc.aio.server(options=grpc_options(s, self.worker is not None))
        grpc_service.add_to_server(self._grpc, self.service, self._rpcs.wrap, GrpcAccess(self.access, self.audit))
        if self.tls is None:
            self.grpc_port = bind_grpc(self._grpc.add_insecure_port, s.host, s.grpc_port)
        else:
            credentials = self.tls.grpc_credentials()
            self.grpc_port = bind_grpc(lambda a: self._grpc.add_secure_port(a, credentials), s.host, s.grpc_port)
        await self._grpc.start()
        app = HttpApp(self.service, s.http_max_body_bytes, self.access, self.audit)
        self.http_port = await self._serve_http(app, s.http_port, self.tls)
        if self.worker is None:  # workers' metrics are served by the supervisor
            metrics_app = guarded_metrics(make_asgi_app(self.metrics.registry), self.access)
            self.metrics_port = await self._serve_http(metrics_app, s.metrics_port)
        if (warning := self.access.startup_warning()) and self.worker is None:
            log.warning("security: %s", warning)
        if self.worker is None:
            log.info(
                "listening: http %s:%d, grpc %s:%d, metrics %s:%d; loading %s",
                s.host,
                self.http_port,
                s.host,
                self.grpc_port,
                s.host,
                self.metrics_port,
                redact_url(self.repository_location),
            )
        else:
            log.info("worker %d accepting on http %d, grpc %d", self.worker[0], self.http_port, self.grpc_port)

    def _serving_version(self, model: str, version: str) -> int | None:
        try:
            return self.manager.get(model, version).version
        except GatewayError:
            return None

    async def _load(self) -> None:
        s = self.config.server
        if s.model_control_mode == "explicit" and "*" not in s.load_model:
            await self.manager.load_all(s.load_model)
        else:
            await self.manager.load_all()
        await asyncio.to_thread(self.service.rollouts.load_states)  # a saved rollout wins over the split
        self.service.set_routes(self.config.routes)  # validated against the repository's models
        stats_dir = worker_stats_dir() if self.worker is not None else None
        if self.worker is not None and stats_dir is not None and s.model_control_mode != "none":
            # loads, unloads, pins and rollbacks reach every worker, whichever took them (control_share);
            # after the routes: a route to a version the others unloaded answers 404 / 503, as there
            index, count, _ = self.worker
            share = ModelControlShare(self.manager, SharedTable(stats_dir / "models", index, count),
                                      prune=s.model_control_mode == "poll")
            await share.start()
            self.service.control.share = share
            self._model_task = asyncio.get_running_loop().create_task(share.follow())
        if self.worker is not None and stats_dir is not None:
            # every worker serves one table, whichever worker a route change reaches (core.shared_table)
            index, count, _ = self.worker
            await self.service.traffic.share_routes(SharedTable(stats_dir / "routes", index, count))
            self._route_task = asyncio.get_running_loop().create_task(self.service.traffic.follow())
        # always: a route PUT may add a rollout later (a judgement without rollouts does nothing)
        self._rollout_task = asyncio.get_running_loop().create_task(self.service.rollouts.run())
        if self.poller is not None:
            await self.poller.prime()
            self.poller.start()

    async def _serve_http(self, app, port: int, tls: ServerTls | None = None) -> int:
        s = self.config.server
        sock = listen(s.host, port, s.http_backlog, reuse_port=self.worker is not None)
        server = HttpServer(app, s) if tls is None else HttpsServer(app, s, tls)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        self._http.append((server, task))
        return sock.getsockname()[1]

    def request_reload(self) -> None:
        """SIGHUP: run :attr:`reloaders` in a task (one reload at a time, in signal order)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """Run every reloader in order; a failure is logged and does not stop the others."""
        async with self._reload_lock:
            for reloader in list(self.reloaders):
                try:
                    result = reloader()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("SIGHUP: %s failed", getattr(reloader, "__qualname__", reloader))

    async def reload_routes(self) -> None:
        """Re-read the routes from the config file (in a thread); on any error keep the old ones."""
        if not self.config.path:
            if self.tls is None:
                log.warning("SIGHUP: no --config file to re-read routes from")
            return
        try:
            if self.worker is not None and self.worker[0] != 0:
                return  # worker 0 publishes the file's routes to every worker (core.shared_table)
            routes = await asyncio.to_thread(config_mod.load_routes, self.config.path)
            await self.service.traffic.change(lambda _: routes, "SIGHUP")  # refused under an active rollout
        except GatewayError as exc:
            log.error("SIGHUP: routes not changed: %s", exc.message)
            return
        log.info("SIGHUP: routes reloaded: %s", sorted(self.service.routes.routes))

    async def reload_tokens(self) -> None:
        """SIGHUP: re-read the tokens file; on any error keep the old tokens."""
        try:
            await asyncio.to_thread(self.access.reload_tokens)
        except GatewayError as exc:
            log.error("SIGHUP: tokens not changed: %s", exc.message)

    def request_stop(self) -> None:
        """Begin the drain (signal handlers call this)."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """The drain sequence; returns when everything is closed.

        After the delay, ``drain_timeout_s`` is the budget of the whole rest: one deadline, and
        each step gets only what remains of it (the closing steps are still called with 0 left)."""
        s = self.config.server
        # Readiness turns false first; requests are still served (a load balancer needs a
        # moment to notice) until the listeners close, and in-flight ones finish after that.
        self.service.draining = True
        log.info("draining: readiness false")
        if self.poller is not None:
            await self.poller.stop()
        if s.drain_delay_s:
            await asyncio.sleep(s.drain_delay_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.drain_timeout_s
        await self._stop_listeners(deadline)
        for task in (self._rollout_task, self._route_task, self._model_task):
            if task is not None:
                task.cancel()
        steps: list[tuple[str, Callable[[float], Awaitable[object]]]] = [("shadows", self.service.shadows.close)]
        if self.service.rollouts:  # after the shadows: their last comparisons are judged and saved
            rollouts = self.service.rollouts
            steps.append(("rollouts", lambda _: rollouts.close()))
            steps.append(("rollout webhooks", self.webhooks.close))
            if self.registry_actions is not None:
                steps.append(("rollout registry actions", self.registry_actions.close))
        if self.sample_log is not None:
            steps.append(("sample log", self.sample_log.close))
        if self.drift is not None:
            drift = self.drift
            steps.append(("drift", lambda _: drift.close()))
        if self.shared_stats is not None:  # its last snapshot, before the versions (and their counts) go
            shared_stats = self.shared_stats
            steps.append(("statistics snapshot", lambda _: shared_stats.close()))
        steps.append(("model versions", self.manager.close))
        if self.access_log is not None:  # after the versions: the last answers are logged too
            access_log = self.access_log
            steps.append(("access log", lambda budget: asyncio.to_thread(access_log.close, budget)))
        if self.tracing is not None:
            tracing = self.tracing
            steps.append(("tracing", lambda budget: asyncio.to_thread(tracing.shutdown, budget)))
        close = getattr(self.manager.repository, "close", None)
        if close is not None:
            steps.append(("repository", lambda _: asyncio.to_thread(close)))
        for name, step in steps:
            budget = max(0.0, deadline - loop.time())
            log.info("drain: closing %s with %.2fs of the drain budget left", name, budget)
            try:
                await asyncio.wait_for(step(budget), budget + _OVERRUN_S)
            except TimeoutError:
                log.error("drain: closing %s overran its %.2fs by %.1fs; left unfinished", name, budget, _OVERRUN_S)
            except Exception:
                log.exception("drain: closing %s failed", name)
        self.service.decode_budget.close()
        await asyncio.to_thread(self.audit.close, max(0.0, deadline - loop.time()))
        self.service.live = False
        log.info("stopped")

    async def _stop_listeners(self, deadline: float) -> None:
        """Stop accepting; in-flight requests run until ``deadline``, then are answered 503 /
        UNAVAILABLE (by the listeners, see :mod:`onnxgate.listeners`)."""
        for server, _ in self._http:
            server.drain(deadline)
        waits = [task for _, task in self._http]
        if self._grpc is not None:
            waits.append(asyncio.ensure_future(drain_grpc(self._grpc, self._rpcs, deadline)))
        if not waits:
            return
        loop = asyncio.get_running_loop()
        done, late = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()) + 2 * _OVERRUN_S)
        for task in late:
            log.error("drain: a listener did not stop %.1fs after the deadline; cancelled", 2 * _OVERRUN_S)
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("drain: a listener failed to stop", exc_info=task.exception())

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        unwatch = watch_supervisor(self.request_stop) if self.worker is not None else None  # drain if orphaned
        try:
            await self.start()
            await self.wait_stopped()
        finally:
            if unwatch is not None:
                unwatch()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
