"""The protocol-neutral inference service: what both front ends call.

It answers health, metadata, config, statistics and repository calls, and runs inference:
look up the version, validate, hand the feeds to the version's scheduler, shape the answer.
It knows nothing of gRPC or HTTP.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from onnxgate import __version__
from onnxgate.core.admission import DecodeBudget, Hold
from onnxgate.core.exchange import Exchange, Exchanges, outcome
from onnxgate.core.inference import (  # the metadata records are the service's answers (front ends import them here)
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorMetadata,
    timeout_us,
)
from onnxgate.core.metrics import Metrics
from onnxgate.core.model_control import ModelControl
from onnxgate.core.monitoring.access_log import AccessLogger
from onnxgate.core.monitoring.drift import DriftMonitor
from onnxgate.core.monitoring.records import Sample, ShadowResult
from onnxgate.core.monitoring.sample_log import SampleLogger
from onnxgate.core.monitoring.summary import SummaryWindow
from onnxgate.core.serving.manager import IndexRow, ModelManager, VersionEntry
from onnxgate.core.serving.memory import held_nbytes
from onnxgate.core.serving.outputs import classification, make_output
from onnxgate.core.serving.stats import VersionStats
from onnxgate.core.serving.stats_share import SharedStats
from onnxgate.core.tracing import Tracing
from onnxgate.core.traffic.control import TrafficControl
from onnxgate.core.traffic.rollouts import Rollouts, RolloutsConfig
from onnxgate.core.traffic.routes import Route, RouteTable, Target
from onnxgate.core.traffic.shadow import Report, ShadowRunner
from onnxgate.errors import (
    GatewayError,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from onnxgate_client.pb import model_config_pb2 as mc

EXTENSIONS = (
    "classification",
    "binary_tensor_data",
    "parameters",
    "model_configuration",
    "model_repository",
    "statistics",
)

DEFAULT_DECODE_BUDGET = 512 * 1024 * 1024  # bytes all requests may be reading and decoding at once
UNKNOWN_MODEL_LABEL = ""  # the metrics' model label of requests for names the repository lacks

class InferenceService:
    """The core's one entry point for front ends."""

    def __init__(
        self, manager: ModelManager, metrics: Metrics, decode_budget_bytes: int = DEFAULT_DECODE_BUDGET
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.decode_budget = DecodeBudget(decode_budget_bytes)
        metrics.decode_bytes.set_function(lambda: self.decode_budget.used)  # read at scrape time only
        self.live = True
        self.ready = False
        self.draining = False
        self.control = ModelControl(manager)  # load, unload, pin, rollback
        self.shared_stats: SharedStats | None = None  # under --workers N: the other workers' counts
        self.traffic = TrafficControl(
            metrics, lambda: {n: list(e.versions) for n, e in self.manager.models.items()}, self.control.check_shared
        )
        self.sample_headers = False  # set when the sample log copies or hashes headers
        self._summary = SummaryWindow(metrics)  # models_summary's snapshots
        self.sample_log: SampleLogger | None = None
        self.drift: DriftMonitor | None = None  # live drift (drift.models), attached by the lifecycle
        self.exchanges = Exchanges(metrics)
        manager.shadowed_by = lambda name: name if name in self.routes.routes else None

    # -- health and metadata ---------------------------------------------------------------
    def server_metadata(self) -> dict:
        return {"name": "onnxgate", "version": __version__, "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether the model (version) can serve now; unknown models raise ModelNotFound.
        A route is ready when its primary target is."""
        if route := self._route(name, version):
            name, version = route.primary.model, route.primary.version
        try:
            self.manager.get(name, version)
        except Unavailable:
            return False
        return self.ready and not self.draining

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """A model's metadata; a route shows its primary target's under the route's name."""
        asked = name
        if route := self._route(name, version):
            name, version = route.primary.model, route.primary.version
        ver = self.manager.get(name, version)
        model = ver.model
        assert model is not None
        return ModelMetadata(
            name=asked,
            versions=[str(v.version) for v in self.manager.models[name].ready_versions()],
            platform=model.config.platform,
            inputs=[TensorMetadata(t.name, t.dtype.v2, t.shape(model.batched)) for t in model.inputs.values()],
            outputs=[TensorMetadata(t.name, t.dtype.v2, t.shape(model.batched)) for t in model.outputs.values()],
        )

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        """A model's completed config; a route shows its primary target's under the route's name."""
        if route := self._route(name, version):
            model = self.manager.get(route.primary.model, route.primary.version).model
            assert model is not None
            config = mc.ModelConfig()
            config.CopyFrom(model.config)
            config.name = name
            return config
        model = self.manager.get(name, version).model
        assert model is not None
        return model.config

    def statistics(self, name: str = "", version: str = "") -> list[VersionStats]:
        """Statistics of one version, all versions of a model, or everything; under
        ``--workers N``, this worker's with every other worker's added."""
        own = self._own_statistics(name, version)
        return own if self.shared_stats is None else self.shared_stats.merged(own)

    def _own_statistics(self, name: str, version: str) -> list[VersionStats]:
        if not name:
            return self.manager.all_stats()
        entry = self.manager.models.get(name)
        if entry is None:
            raise ModelNotFound.unknown(name)
        if version:
            return [s for s in [self.manager.get(name, version).stats] if s is not None]
        return [v.stats for _, v in sorted(entry.versions.items()) if v.stats is not None and v.state == "READY"]

    def models_summary(self) -> dict:
        """Every model and version with its traffic over about the last minute (see
        :mod:`onnxgate.core.monitoring.summary`)."""
        return self._summary.answer(self.manager.models, self.statistics(), self.ready, self.draining,
                             self.sample_log is not None, self.drift.thresholds() if self.drift else None)

    async def drift_report(self, model: str) -> str:
        """The HTML drift report of ``model``'s live window (rendered off the loop, one at a time:
        :meth:`DriftMonitor.report`); ``Unavailable`` without drift configured."""
        if self.drift is None:
            raise Unavailable("live drift is not configured (drift.models in the config)")
        return await self.drift.report(model)

    def repository_index(self, ready_only: bool = False) -> list[IndexRow]:
        return self.manager.index(ready_only)

    async def load_model(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """(Re)load ``name`` per the repository load API's parameters (:meth:`ModelControl.load`)."""
        await self.control.load(name, params)

    async def unload_model(self, name: str) -> None:
        await self.control.unload(name)

    def attach_observers(self, tracing: Tracing | None, access_log: AccessLogger | None) -> None:
        """Trace requests with ``tracing`` and log them to ``access_log`` (either may be None: off)."""
        self.exchanges = Exchanges(self.metrics, tracing, access_log)
        self.manager.tracing = tracing

    def begin(self, protocol: str, target: str, client_id: str | None, trace_headers: Mapping[str, str] | None,
              peer: Any = None, span_name: str = "") -> Exchange:
        """An inference request has arrived: see :meth:`Exchanges.begin`."""
        return self.exchanges.begin(protocol, target, client_id, trace_headers, peer, span_name)

    @property
    def tracing(self) -> Tracing | None:
        return self.exchanges.tracing

    @property
    def trace_headers(self) -> tuple[str, ...] | None:
        """The request headers (metadata keys) tracing reads, or None when tracing is off."""
        tracing = self.exchanges.tracing
        return tracing.headers if tracing is not None else None

    @property
    def logs_access(self) -> bool:
        """Whether requests are access-logged (front ends then pass the peer to :meth:`begin`)."""
        return self.exchanges.access_log is not None

    # -- routes (core.traffic.control) --------------------------------------------------------
    @property
    def routes(self) -> RouteTable:
        """The routes as they serve now."""
        return self.traffic.table

    @property
    def rollouts(self) -> Rollouts:
        return self.traffic.rollouts

    @property
    def shadows(self) -> ShadowRunner:
        return self.traffic.shadows

    def _route(self, name: str, version: str) -> Route | None:
        route = self.traffic.table.get(name)
        if route is not None and version:
            raise ModelNotFound(f"'{name}' is a route; routes have no versions")
        return route

    def set_routes(self, routes: Iterable[Route], what: str = "") -> None:
        """Replace the whole route table (see :meth:`TrafficControl.set`)."""
        self.traffic.set(routes, what)

    def configure_rollouts(self, config: RolloutsConfig, *notify: Callable[[Any, dict], None], **share: Any) -> None:
        self.traffic.configure_rollouts(config, *notify, **share)

    async def put_route(self, doc: Mapping[str, Any], abort_rollout: bool = False) -> Route:
        return await self.traffic.put(doc, abort_rollout)

    async def delete_route(self, name: str, abort_rollout: bool = False) -> None:
        await self.traffic.delete(name, abort_rollout)

    def route(self, name: str) -> Route:
        return self.traffic.route(name)

    def configured_routes(self) -> tuple[Route, ...]:
        return self.traffic.configured

    async def rollout(self, name: str) -> dict:
        return await self.traffic.rollout(name)

    async def rollout_action(self, name: str, action: str, reason: str = "", full: bool = False) -> dict:
        return await self.traffic.rollout_action(name, action, reason, full)

    def comparison(self, name: str) -> dict:
        return self.traffic.comparison(name)

    @property
    def wants_headers(self) -> bool:
        """Whether requests must carry their headers / metadata (sticky routes, sample log)."""
        return self.traffic.sticky or self.sample_headers

    def attach_sample_log(self, sampler: SampleLogger | None) -> None:
        """Hand sampled requests (and mirrored answers) to ``sampler``."""
        self.sample_log = sampler
        self.shadows.report = _shadow_logger(sampler) if sampler is not None else None
        cfg = sampler.config if sampler is not None else None
        self.sample_headers = bool(cfg and (cfg.headers or cfg.hash_header))

    # -- inference ---------------------------------------------------------------------------
    def request_bound(self, name: str, version: str, protocol: str) -> tuple[str, int | None]:
        """Before a request is read: its metrics label (the model or route asked for) and the
        most tensor elements a valid request for it carries (None: unbounded but for the
        transport's limit; a route: see :meth:`_route_bound`). Unknown or unready names raise
        (counted) here, so no body is read for them."""
        try:
            if route := self._route(name, version):
                return name, self._route_bound(route)
            model = self.manager.get(name, version).model
        except GatewayError as exc:
            self.count_refusal(name, "", protocol, exc)
            raise
        assert model is not None
        return name, model.max_request_elements

    def _route_bound(self, route: Route) -> int | None:
        """A route takes what its largest ready split target takes (the split is chosen once the
        request is decoded); Unavailable only when no split target is ready."""
        bounds: list[int | None] = []
        error: GatewayError | None = None
        for target, weight in route.split:
            if weight <= 0:
                continue
            try:
                model = self.manager.get(target.model, target.version).model
            except GatewayError as exc:
                error = exc
                continue
            assert model is not None
            bounds.append(model.max_request_elements)
        if not bounds:
            raise error or Unavailable(f"route '{route.name}' has no ready target")
        return None if None in bounds else max(bounds)  # type: ignore[type-var]

    def decoding(self, label: str, nbytes: int, protocol: str) -> Hold:
        """``with service.decoding(model, n, protocol):`` around reading and decoding ``n`` bytes
        of one request: a share of the gateway's decode budget (refused at once, and counted,
        when it is spent); ``hold.grow(n)`` as more arrives."""
        return self.decode_budget.hold(nbytes, lambda exc: self.count_refusal(label, "", protocol, exc))

    def count_refusal(self, name: str, version: str, protocol: str, exc: GatewayError) -> None:
        """Count a request refused or failed. Label values only ever come from the repository's
        models and the routes: a name the gateway does not serve is counted under model="" (one
        series, whatever clients send)."""
        known = name in self.manager.models or name in self.routes.routes
        label = name if known else UNKNOWN_MODEL_LABEL
        self.metrics.request_done(label, version, protocol, outcome(exc), None)
        if isinstance(exc, Overloaded):
            self.metrics.rejected.labels(label, exc.reason).inc()

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request; raises a :class:`GatewayError` subclass on any failure.

        A route name picks a split target (and maybe mirrors to its shadow); the response's
        ``model_name`` and ``model_version`` say which target answered. Sampled requests are
        handed to the sample logger, with the shadow's answer when mirrored."""
        route = self._route(request.model_name, request.model_version) if self.routes.routes else None
        if (ex := request.exchange) is not None:
            request.request_id = ex.identify(request.id)
            if route is not None:
                ex.route = route.name
        sampler = self.sample_log
        if route is None:
            sampled = sampler is not None and sampler.should_sample(request.model_name, request.headers)
            if not sampled:
                return await self._infer(request, request.model_name, request.model_version, span=_span(ex))
            target, route_name = Target(request.model_name, request.model_version), request.model_name
        else:
            target, route_name = self.routes.choose(route, request.headers), route.name
            sampled = sampler is not None and sampler.should_sample(target.model, request.headers, route.name)
        mirror = None
        if route is not None and self.routes.mirror(route):
            self._inherit_deadline(request, target)
            mirror = self.shadows.start(route, target, request, self._shadow)
        watch = None
        if route is not None and route.rollout is not None:
            watch = self.traffic.watch(route, target, request, self._shadow,
                                       lambda: self._inherit_deadline(request, target))
        started = time.perf_counter()
        try:
            response = await self._infer(request, target.model, target.version, span=_span(ex))
        except BaseException as exc:
            if watch is not None:
                watch.failed(exc)
            if mirror is not None:
                mirror.primary_failed()
            if sampled and isinstance(exc, GatewayError):
                latency = time.perf_counter() - started
                sampler.offer(
                    Sample(request, None, exc, route_name, target.model, target.version, request.protocol, latency)
                )
            raise
        latency = time.perf_counter() - started
        if watch is not None:
            watch.done(response, latency)
        sample = None
        if sampled:
            sample = Sample(
                request, response, None, route_name, response.model_name, response.model_version,
                request.protocol, latency,
            )
        if mirror is not None:
            if sample is not None:  # let go of the primary's batch now, not once the shadow is in
                with contextlib.suppress(Exception):  # never fails the primary; offer tries again, and counts
                    sample.compact()
            mirror.primary_done(response, latency, sample)  # logged with the shadow's answer
        elif sample is not None:
            sampler.offer(sample)
        return response

    def _inherit_deadline(self, request: InferRequest, target: Target) -> None:
        """A mirrored request's shadow copy has the primary's deadline: the caller's, else the
        primary model's default, fixed now on the request for both."""
        if request.deadline_ns:
            return
        with contextlib.suppress(GatewayError):  # the primary's own lookup reports it
            scheduler = self.manager.get(target.model, target.version).scheduler
            if scheduler is not None and (default := scheduler.policy.default_deadline_ns):
                request.deadline_ns = time.perf_counter_ns() + default

    async def _shadow(self, request: InferRequest, target: Target) -> InferResponse:
        mirrored = InferRequest(
            target.model, target.version, request.inputs, [], request.id, request.parameters, "shadow",
            request.headers, request.deadline_ns, request.request_id,
        )
        parent, tracing = _span(request.exchange), self.tracing
        if parent is None or tracing is None:
            return await self._infer(mirrored, target.model, target.version, shadow=True)
        attributes = {"onnxgate.model": target.model, "onnxgate.route": request.model_name}
        span = tracing.child_span(parent, "shadow", attributes)
        try:
            response = await self._infer(mirrored, target.model, target.version, shadow=True, span=span)
        except BaseException as exc:
            tracing.end(span, error=getattr(exc, "message", None) or type(exc).__name__)
            raise
        tracing.end(span, {"onnxgate.version": response.model_version})
        return response

    async def _infer(
        self, request: InferRequest, name: str, version_asked: str, shadow: bool = False, span: Any = None
    ) -> InferResponse:
        """Run one request on one model (version); ``span``, when the request is traced, gets
        ``queue`` and ``execute`` spans under it, and the batch span links to it."""
        start = time.perf_counter_ns()
        protocol = request.protocol
        ver: VersionEntry | None = None
        try:
            ver = self.manager.get(name, version_asked)
            model, stats, scheduler = ver.model, ver.stats, ver.scheduler
            assert model is not None and stats is not None and scheduler is not None
            feeds, rows = model.validate(request.inputs)
            wanted = model.check_outputs([o.name for o in request.outputs])
            classify = classification(request, model)
            # What the queue holds: each tensor's bytes (views of one body add up to the body);
            # BYTES tensors with their strings.
            nbytes = sum(held_nbytes(a) if a.dtype.hasobject else a.nbytes for a in feeds.values())
            submitted = time.perf_counter_ns()
            results, timing = await scheduler.submit(
                feeds, rows, wanted, timeout_us(request), shadow, nbytes, request.deadline_ns,
                request.parameters.get("priority"), span,
            )
            outputs = [make_output(model, n, arr, classify.get(n, 0)) for n, arr in zip(wanted, results, strict=True)]
        except GatewayError as exc:
            elapsed = time.perf_counter_ns() - start
            version = str(ver.version) if ver is not None else ""
            if ver is not None and ver.stats is not None:
                ver.stats.record_failure(elapsed)
            self.count_refusal(name, version, protocol, exc)
            raise
        elapsed = time.perf_counter_ns() - start
        stats.record_request(rows, elapsed, timing)
        version = str(ver.version)
        compute_ns = timing.input_ns + timing.infer_ns + timing.output_ns
        if not shadow and (ex := request.exchange) is not None:
            ex.served(version, rows, timing.queue_ns, compute_ns)
        if span is not None and (tracing := self.tracing) is not None:
            started = submitted + timing.queue_ns
            tracing.timed_span(span, "queue", submitted, started)
            tracing.timed_span(span, "execute", started, started + compute_ns, {"onnxgate.version": version})
        self.metrics.request_done(name, version, protocol, "success", elapsed / 1e9)
        return InferResponse(name, version, outputs, id=request.id, provenance=model.provenance, compute_ns=compute_ns)


def _span(exchange: Exchange | None) -> Any:
    return exchange.span if exchange is not None else None


def _shadow_logger(sampler: SampleLogger) -> Report:
    """The shadow runner's report: the primary's sample, logged with the shadow's answer."""

    def report(sample: Sample, target: str, answer: InferResponse | None, error: BaseException | None,
               comparison: Mapping[str, Any] | None) -> None:
        sample.shadow = ShadowResult(target, answer, error)
        sample.comparison = comparison
        sampler.offer(sample)

    return report
