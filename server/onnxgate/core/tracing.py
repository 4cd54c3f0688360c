"""OpenTelemetry tracing, when it is configured; nothing at all when it is not.

Off by default. It is on when the standard environment asks for an exporter:
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``; ``none`` turns it off) or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), unless
``OTEL_SDK_DISABLED=true``. Everything else is the SDK's own reading of the ``OTEL_*``
variables: the service name (``OTEL_SERVICE_NAME``, default ``onnxgate``) and resource
attributes, the sampler (``OTEL_TRACES_SAMPLER``/``_ARG``: e.g. ``parentbased_traceidratio``
with ``0.01``), the OTLP protocol (``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/protobuf``,
the default, or ``grpc``), headers, timeouts, and the batch processor's queue
(``OTEL_BSP_*``: spans are exported off the event loop, and dropped past its bound). Read here,
so that a mistake fails the start instead of being logged and replaced by a default: the
sampler and its ratio (an unknown sampler, or a ratio that is not a number in [0, 1], is an
error: the SDK would trace every request instead), and the propagators (``OTEL_PROPAGATORS``,
default W3C ``tracecontext,baggage``; ``b3``, ``b3multi`` or ``jaeger`` with their package,
e.g. ``pip install opentelemetry-propagator-b3``; ``none``): the front ends read the headers the
propagators name. It needs the ``onnxgate[otel]`` extra.

What is traced (README "Tracing"): one SERVER span per inference request, continuing the
caller's ``traceparent``; under it a ``queue`` and an ``execute`` span from the scheduler's
timings; one ``batch`` span per execution that served a sampled request, linked to every sampled
request in it; a ``shadow`` span for each mirrored call. An unsampled request costs one sampler
decision and nothing else: no child span, no link, no attribute. With the usual samplers that
decision is made here, before the SDK is asked for anything (its span creation and the
propagator's parsing cost ~5-30 us a request): a parent-based sampler with a ``traceparent``
whose sampled flag is off drops it at once; a root request under ``traceidratio`` (or
``parentbased_traceidratio``) draws its trace id here and is dropped when that id is over the
ratio's bound, as the SDK's sampler would; the id is handed to the SDK when it is kept, so its
sampler decides the same. Any other sampler decides through the SDK.

Scheduler timings are ``perf_counter_ns``; spans want the epoch: :meth:`Tracing.epoch_ns`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from onnxgate.errors import ConfigError

_log = logging.getLogger(__name__)
DEFAULT_SERVICE_NAME = "onnxgate"
OTLP_PROTOCOLS = ("http/protobuf", "grpc")


class TracingUnavailable(ConfigError):
    """Tracing was asked for, and cannot be set up (the extra is missing, a bad setting)."""


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (see the module docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return any(e.strip().lower() not in ("", "none") for e in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """The gateway's tracer. Spans it returns are the SDK's; callers treat them as opaque."""

    def __init__(self, provider: Any, propagator: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.propagate import get_global_textmap

        self.provider = provider
        self._tracer = provider.get_tracer("onnxgate")
        self._propagator = propagator if propagator is not None else get_global_textmap()
        #: the headers (metadata keys) the propagators read: what the front ends hand to request_span
        self.headers: tuple[str, ...] = tuple(sorted({f.lower() for f in self._propagator.fields}))
        self.raw_headers: tuple[bytes, ...] = tuple(h.encode("latin-1") for h in self.headers)
        # the traceparent's own flag may decide only when W3C trace context is what reads it
        self._w3c = "traceparent" in self.headers
        self._trace = trace
        self._link = trace.Link
        self._server = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        self._ids, self._drops_unsampled_parent, self._root_bound = _fast_sampling(provider)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Tracing | None:
        """The tracer the environment asks for, or None (off). Raises :class:`TracingUnavailable`."""
        if not wanted(env):
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise TracingUnavailable(
                f"tracing is configured (OTEL_* environment) but OpenTelemetry is not installed ({exc.name}): "
                "pip install 'onnxgate[otel]'"
            ) from None
        attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME}
        # the sampler: OTEL_TRACES_SAMPLER; trace ids: drawn here for root requests (see above)
        # shutdown_on_exit off: the drain shuts it down within its budget (shutdown); the SDK's
        # exit hook would wait out an unanswering collector (its export timeout, retries)
        sampler, propagator = _sampler(env), _propagator(env)
        provider = TracerProvider(
            sampler=sampler, resource=Resource.create(attributes), id_generator=_preset_ids(), shutdown_on_exit=False
        )
        for exporter in _exporters(env):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, propagator)

    def epoch_ns(self, perf_ns: int) -> int:
        """A ``perf_counter_ns`` time as epoch ns, what spans carry."""
        return perf_ns + self._offset_ns

    def request_span(self, name: str, carrier: Mapping[str, str] | None, start_perf_ns: int,
                     attributes: Mapping[str, Any]) -> Any:
        """A SERVER span for one request (continuing the trace ``carrier``, the request's
        propagation headers of :attr:`headers`, names), or None when it is not sampled: nothing
        more is then spent on it."""
        context = None
        if carrier:
            traceparent = carrier.get("traceparent") if self._w3c else None
            if traceparent is not None and carrier.keys() <= _W3C_KEYS:  # no other propagator's header
                if self._drops_unsampled_parent and _sampled_flag(traceparent) is False:
                    return None
                state = carrier.get("tracestate")
                if state is not None and not _valid_tracestate(state):
                    # the SDK would drop it too, with a log line per request quoting the client's text
                    carrier = {k: v for k, v in carrier.items() if k != "tracestate"}
            context = self._propagator.extract(carrier)
        elif self._root_bound is not None and self._ids is not None:
            trace_id = random.getrandbits(128)
            if not trace_id or trace_id & _TRACE_ID_LOW >= self._root_bound:
                return None
            self._ids.preset = trace_id
        span = self._tracer.start_span(
            name, context=context, kind=self._server, attributes=attributes, start_time=self.epoch_ns(start_perf_ns)
        )
        return span if span.is_recording() else None

    def child_span(self, parent: Any, name: str, attributes: Mapping[str, Any] | None = None,
                   start_perf_ns: int | None = None) -> Any:
        """An INTERNAL span under ``parent``, started now (or at ``start_perf_ns``); end it with
        :meth:`end`."""
        start = self.epoch_ns(start_perf_ns) if start_perf_ns is not None else None
        context = self._trace.set_span_in_context(parent)
        return self._tracer.start_span(name, context=context, attributes=attributes, start_time=start)

    def timed_span(self, parent: Any, name: str, start_perf_ns: int, end_perf_ns: int,
                   attributes: Mapping[str, Any] | None = None) -> None:
        """A finished INTERNAL span under ``parent`` for a time already measured."""
        span = self.child_span(parent, name, attributes, start_perf_ns)
        span.end(end_time=self.epoch_ns(end_perf_ns))

    def batch_span(self, parents: Sequence[Any], start_perf_ns: int, end_perf_ns: int,
                   attributes: Mapping[str, Any]) -> None:
        """One execution that served the sampled requests ``parents``: a span under the first,
        linked to every one of them (a batch has many parents; links say so)."""
        links = [self._link(p.get_span_context()) for p in parents]
        context = self._trace.set_span_in_context(parents[0])
        span = self._tracer.start_span(
            "batch", context=context, links=links, attributes=attributes, start_time=self.epoch_ns(start_perf_ns)
        )
        span.end(end_time=self.epoch_ns(end_perf_ns))

    def record_batch(self, parents: Sequence[Any], model: str, version: int, rows: int, requests: int,
                     start_perf_ns: int, end_perf_ns: int) -> None:
        """The ``batch`` span of one execution of ``model`` ``version`` that served the sampled
        requests of ``parents`` (linked to each); a failure is logged, never raised."""
        attributes = {"onnxgate.model": model, "onnxgate.version": str(version), "onnxgate.batch.rows": rows,
                      "onnxgate.batch.requests": requests}
        try:
            self.batch_span(parents, start_perf_ns, end_perf_ns, attributes)
        except Exception:  # tracing never fails a request
            _log.exception("batch span of %s version %s", model, version)

    def end(self, span: Any, attributes: Mapping[str, Any] | None = None, error: str | None = None,
            end_perf_ns: int | None = None) -> None:
        """End ``span`` with ``attributes``; ``error`` (a message) marks it failed."""
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=self.epoch_ns(end_perf_ns) if end_perf_ns is not None else None)

    @staticmethod
    def trace_id(span: Any) -> str:
        """The span's trace id as 32 hex digits (the access log's and sample log's ``trace_id``)."""
        return format(span.get_span_context().trace_id, "032x")

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Export what is still buffered and stop, waiting at most ``timeout_s`` (None: as long as
        the SDK takes); False when that was not enough: what is left is given up (the SDK's
        threads are daemons and do not hold the exit)."""
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        return not worker.is_alive()


_TRACE_ID_LOW = (1 << 64) - 1  # the bits TraceIdRatioBased compares with its bound


# W3C trace context, as the SDK's propagator matches it (lower-case hex; more fields after a newer version)
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")


# A W3C tracestate list member (key=value), as the SDK's TraceState accepts it; 32 members, 8192 bytes at most
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-\*\/]{0,255}|[a-z0-9][_0-9a-z\-\*\/]{0,240}@[a-z][_0-9a-z\-\*\/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


_W3C_KEYS = frozenset(("traceparent", "tracestate", "baggage"))
_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
             "parentbased_traceidratio")


def _sampler(env: Mapping[str, str]) -> Any:
    """The sampler ``OTEL_TRACES_SAMPLER``/``_ARG`` name (default ``parentbased_always_on``); a
    sampler installed as an ``opentelemetry_traces_sampler`` entry point is built with its arg."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    if name not in _SAMPLERS:
        factory = _entry_point("opentelemetry_traces_sampler", name)
        if factory is None:
            known = ', '.join(_SAMPLERS)
            raise TracingUnavailable(f"OTEL_TRACES_SAMPLER: unknown sampler {name!r}; use one of {known}")
        return factory(arg)
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        try:
            rate = 1.0 if arg is None or not arg.strip() else float(arg)
        except ValueError:
            rate = float("nan")
        if not 0.0 <= rate <= 1.0:
            raise TracingUnavailable(f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1 for {name}, got {arg!r}")
        root = sampling.TraceIdRatioBased(rate)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _propagator(env: Mapping[str, str]) -> Any:
    """The propagators ``OTEL_PROPAGATORS`` names (entry points, as the SDK loads them)."""
    from opentelemetry.propagators.composite import CompositePropagator

    names = [n.strip().lower() for n in env.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")]
    names = [n for n in names if n]
    if "none" in names:
        return CompositePropagator([])
    found = []
    for name in names:
        factory = _entry_point("opentelemetry_propagator", name)
        if factory is None:
            raise TracingUnavailable(
                f"OTEL_PROPAGATORS: propagator {name!r} is not installed (tracecontext and baggage come with "
                "onnxgate[otel]; b3, b3multi: pip install opentelemetry-propagator-b3; jaeger: "
                "opentelemetry-propagator-jaeger)"
            )
        found.append(factory())
    return CompositePropagator(found)


def _entry_point(group: str, name: str) -> Any:
    from importlib.metadata import entry_points

    for ep in entry_points(group=group, name=name):
        return ep.load()
    return None


def _valid_tracestate(header: str) -> bool:
    """Whether the SDK would keep ``header`` (it drops the whole of an invalid one, logging it)."""
    if len(header) > 8192:
        return False
    members = [m.strip(" \t") for m in header.split(",")]
    members = [m for m in members if m]
    return len(members) <= 32 and all(_TRACESTATE_MEMBER.fullmatch(m) for m in members)


def _sampled_flag(traceparent: str) -> bool | None:
    """The sampled flag of a W3C ``traceparent`` ("00-<32 hex>-<16 hex>-<2 hex>"), or None when it
    is not one the propagator would accept (it then decides, as for any malformed header)."""
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return bool(int(flags, 16) & 1)


def _preset_ids() -> Any:
    """The SDK's random id generator, that hands out a trace id drawn beforehand when there is one."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        preset: int | None = None

        def generate_trace_id(self) -> int:
            trace_id, self.preset = self.preset, None
            return trace_id if trace_id is not None else super().generate_trace_id()

    return PresetIds()


def _fast_sampling(provider: Any) -> tuple[Any, bool, int | None]:
    """(the preset id generator or None, whether an unsampled remote parent drops the request,
    the root ratio's bound or None): what :meth:`Tracing.request_span` may decide itself, for
    the samplers whose rule is known; None/False leave the decision to the SDK."""
    from opentelemetry.sdk.trace import sampling

    sampler = getattr(provider, "sampler", None)
    ids = getattr(provider, "id_generator", None)
    ids = ids if hasattr(ids, "preset") else None
    root = sampler
    drops = False
    if isinstance(sampler, sampling.ParentBased):
        drops = getattr(sampler, "_remote_parent_not_sampled", None) is sampling.ALWAYS_OFF
        root = getattr(sampler, "_root", None)
    if isinstance(root, sampling.TraceIdRatioBased):
        return ids, drops, root.bound
    if root is sampling.ALWAYS_OFF:
        return ids, drops, 0
    return ids, drops, None


def check_tracing(env: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`TracingUnavailable` when the environment asks for tracing that cannot be set
    up (each process sets up its own; this is the early check of a whole gateway's start)."""
    tracing = Tracing.from_env(env)
    if tracing is not None:
        tracing.shutdown(5.0)


def _exporters(env: Mapping[str, str]) -> list[Any]:
    names = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    out: list[Any] = []
    for name in names:
        if name in ("", "none"):
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            out.append(_otlp(env))
        else:
            raise TracingUnavailable(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, console or none")
    return out


def _otlp(env: Mapping[str, str]) -> Any:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip()
    if protocol not in OTLP_PROTOCOLS:
        raise TracingUnavailable(f"OTLP protocol {protocol!r} is not supported; use one of {', '.join(OTLP_PROTOCOLS)}")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingUnavailable(
            f"the OTLP {protocol} exporter is not installed ({exc.name}): pip install 'onnxgate[otel]'"
        ) from None
    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from the OTEL_* environment
