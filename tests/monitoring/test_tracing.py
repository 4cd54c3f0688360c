"""OpenTelemetry tracing through a real gateway, exported over OTLP/HTTP to a collector the test
runs: the caller's trace is continued on both transports, each request has its queue and execute
spans, the batch span links every sampled request it served, a shadow call is a span of its own,
and an unsampled request exports nothing."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.core import tracing
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

X = np.arange(8, dtype=np.float32).reshape(2, 4)


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, with its attributes as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with collector._lock:
                    for resource in request.resource_spans:
                        service = _attributes(resource.resource.attributes).get("service.name")
                        for scope in resource.scope_spans:
                            collector.spans += [_span(s, service) for s in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list[dict]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        self.server.shutdown()


def _attributes(kvs) -> dict:
    out = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


def _span(s, service: str | None) -> dict:
    return {
        "name": s.name,
        "trace_id": s.trace_id.hex(),
        "span_id": s.span_id.hex(),
        "parent": s.parent_span_id.hex(),
        "kind": s.kind,
        "start": s.start_time_unix_nano,
        "end": s.end_time_unix_nano,
        "attributes": _attributes(s.attributes),
        "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
        "status": s.status.code,
        "service": service,
    }


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, collector: Collector):
    root = tmp_path_factory.mktemp("tracing")
    repo = root / "repo"
    modelzoo.build_scaled(repo, "primary", scale=2.0)
    modelzoo.build_scaled(repo, "candidate", scale=3.0)
    config = root / "gateway.yaml"
    config.write_text(
        """
routes:
  - name: scoring
    split: [{target: primary, weight: 1}]
    shadow: {target: candidate, fraction: 1.0}
access_log: {path: "%s"}
""" % (root / "access.jsonl"),
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        # only what the caller sampled: a request without a sampled traceparent exports nothing
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with GatewayProcess(repo, ["--config", str(config)], env=env) as g:
        g.root = root  # type: ignore[attr-defined]
        yield g


def _traceparent(n: int, sampled: bool = True) -> tuple[str, str, str]:
    trace_id = f"{n:032x}"
    parent = f"{n + 1:016x}"
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}", trace_id, parent


def _by_name(spans: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in spans:
        out.setdefault(s["name"], []).append(s)
    return out


def _http_infer(gw: GatewayProcess, model: str, headers: dict) -> dict:
    client = httpclient.InferenceServerClient(gw.http_url)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer(model, [inp], headers=headers).get_response()


def test_http_request_continues_the_callers_trace_with_queue_execute_and_batch(gw, collector):
    traceparent, trace_id, parent = _traceparent(0xABC1)
    _http_infer(gw, "primary", {"traceparent": traceparent, "tracestate": "vendor=1", "X-Request-Id": "traced-1"})
    assert wait_until(lambda: {"queue", "execute", "batch"} <= set(_by_name(collector.trace(trace_id))), timeout=15)
    spans = _by_name(collector.trace(trace_id))
    (server,) = spans["POST /v2/models/{model}/infer"]
    assert server["parent"] == parent and server["kind"] == 2  # SPAN_KIND_SERVER
    assert server["service"] == "gateway-under-test"
    a = server["attributes"]
    assert a["onnxgate.model"] == "primary" and a["onnxgate.version"] == "1" and a["onnxgate.protocol"] == "http"
    assert a["onnxgate.request_id"] == "traced-1" and a["http.response.status_code"] == 200
    assert a["onnxgate.rows"] == 2 and a["http.route"] == "/v2/models/{model}/infer"
    (queue,), (execute,), (batch,) = spans["queue"], spans["execute"], spans["batch"]
    assert queue["parent"] == execute["parent"] == server["span_id"]
    assert server["start"] <= queue["start"] <= queue["end"] <= execute["start"] <= execute["end"] <= server["end"]
    assert (trace_id, server["span_id"]) in batch["links"]
    assert batch["attributes"]["onnxgate.batch.rows"] >= 2
    # the access log names the same trace
    lines = (gw.root / "access.jsonl").read_text()  # type: ignore[attr-defined]
    assert f'"request_id":"traced-1","trace_id":"{trace_id}"' in lines


def test_grpc_request_continues_the_trace_from_metadata_and_failures_are_marked(gw, collector):
    traceparent, trace_id, parent = _traceparent(0xABC3)
    channel = grpc.insecure_channel(gw.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="primary", id="g-1")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(X.ravel().tolist())
    stub.ModelInfer(request, metadata=(("traceparent", traceparent),))
    assert wait_until(lambda: "execute" in _by_name(collector.trace(trace_id)), timeout=15)
    (server,) = _by_name(collector.trace(trace_id))["inference.GRPCInferenceService/ModelInfer"]
    assert server["parent"] == parent
    a = server["attributes"]
    assert a["rpc.system"] == "grpc" and a["rpc.grpc.status_code"] == 0 and a["onnxgate.request_id"] == "g-1"
    # a request the model cannot run (wrong shape): INVALID_ARGUMENT, the caller's fault, not the span's error
    traceparent, trace_id, _ = _traceparent(0xABC5)
    bad = pb.ModelInferRequest(model_name="primary")
    bad.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(bad, metadata=(("traceparent", traceparent),))
    assert wait_until(lambda: bool(collector.trace(trace_id)), timeout=15)
    (server,) = collector.trace(trace_id)
    assert server["attributes"]["rpc.grpc.status_code"] == 3 and server["status"] == 0  # INVALID_ARGUMENT; UNSET
    assert server["attributes"]["onnxgate.outcome"] == "invalid_input"
    channel.close()


def test_a_shadow_call_is_a_span_of_its_own(gw, collector):
    traceparent, trace_id, _ = _traceparent(0xABC7)
    response = _http_infer(gw, "scoring", {"traceparent": traceparent})
    assert response["model_name"] == "primary"
    assert wait_until(lambda: len(_by_name(collector.trace(trace_id)).get("execute", [])) == 2, timeout=15)
    spans = _by_name(collector.trace(trace_id))
    (server,), (shadow,) = spans["POST /v2/models/{model}/infer"], spans["shadow"]
    assert server["attributes"]["onnxgate.route"] == "scoring"
    assert shadow["parent"] == server["span_id"]
    assert shadow["attributes"]["onnxgate.model"] == "candidate" and shadow["attributes"]["onnxgate.version"] == "1"
    assert {e["parent"] for e in spans["execute"]} == {server["span_id"], shadow["span_id"]}


def test_an_unsampled_request_exports_nothing(gw, collector):
    unsampled, trace_id, _ = _traceparent(0xABC9, sampled=False)
    _http_infer(gw, "primary", {"traceparent": unsampled})
    _http_infer(gw, "primary", {})  # no parent: the ratio sampler (0) decides
    # a sampled request sent after them is exported; by then the others would have been too
    sampled, marker, _ = _traceparent(0xABCB)
    _http_infer(gw, "primary", {"traceparent": sampled})
    assert wait_until(lambda: "batch" in _by_name(collector.trace(marker)), timeout=15)
    assert collector.trace(trace_id) == []
    known = {f"{n:032x}" for n in (0xABC1, 0xABC3, 0xABC5, 0xABC7, 0xABCB)}
    assert {s["trace_id"] for s in collector.spans} <= known


# -- the environment -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_on_only_when_the_environment_asks(env, on):
    assert tracing.wanted(env) is on


def test_a_bad_setting_fails_the_start_with_a_clear_message(tmp_path: Path):
    with pytest.raises(tracing.TracingUnavailable, match="zipkin"):
        tracing.check_tracing({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(tracing.TracingUnavailable, match="http/json"):
        tracing.check_tracing({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary")
    gw = GatewayProcess(repo, env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(RuntimeError):
        gw.start(timeout=30)
    assert gw.proc is not None and gw.proc.wait(30) == 2


# -- the sampling decisions made before the SDK is asked -------------------------------------------
def _in_memory(sampler) -> tuple[tracing.Tracing, object]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, id_generator=tracing._preset_ids())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracing.Tracing(provider), exporter


@pytest.mark.parametrize(
    ("header", "flag"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03", True),
        ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-future", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra", None),  # version 00 has 4 parts
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", None),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-00", None),
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-00", None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-00", None),
        ("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-00", None),  # upper case: not W3C
        ("garbage", None),
    ],
)
def test_the_sampled_flag_is_read_as_the_propagator_reads_the_header(header, flag):
    assert tracing._sampled_flag(header) is flag


def test_root_requests_are_sampled_as_the_sdk_sampler_would_by_their_trace_id():
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = TraceIdRatioBased(0.25)
    tr, exporter = _in_memory(ParentBased(ratio))
    kept = [tr.request_span("s", None, 0, {}) for _ in range(4000)]
    for span in kept:
        if span is not None:
            span.end()
    spans = exporter.get_finished_spans()
    assert 700 < len(spans) < 1300  # ~25% of 4000
    assert all(s.context.trace_id & tracing._TRACE_ID_LOW < ratio.bound for s in spans)
    assert len({s.context.trace_id for s in spans}) == len(spans)


def test_a_parents_sampled_flag_decides_under_a_parent_based_sampler():
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    tr, exporter = _in_memory(ParentBased(ALWAYS_OFF))
    sampled, trace_id, parent = _traceparent(0xF00D)
    span = tr.request_span("s", {"traceparent": sampled}, 0, {})
    assert span is not None
    span.end()
    assert tr.request_span("s", {"traceparent": _traceparent(0xF00F, sampled=False)[0]}, 0, {}) is None
    assert tr.request_span("s", None, 0, {}) is None  # a root under ALWAYS_OFF
    (only,) = exporter.get_finished_spans()
    assert format(only.context.trace_id, "032x") == trace_id and format(only.parent.span_id, "016x") == parent


# -- the settings read at the start: propagators and the sampler -------------------------------------
@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1%"}, "'1%'"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "'1.5'"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"}, "'nan'"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "'sometimes'"),
        ({"OTEL_PROPAGATORS": "tracecontext,xray-ish"}, "'xray-ish'"),
    ],
)
def test_a_setting_the_sdk_would_replace_by_a_default_fails_the_start(env, match):
    # the SDK logs a bad ratio and samples every request instead; an unknown propagator, at import
    with pytest.raises(tracing.TracingUnavailable, match=match):
        tracing.check_tracing({"OTEL_TRACES_EXPORTER": "console", **env})


def test_the_sampler_is_the_one_the_environment_names():
    from opentelemetry.sdk.trace import sampling

    ratio = tracing._sampler({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    assert isinstance(ratio, sampling.ParentBased) and ratio._root.rate == 0.01  # type: ignore[attr-defined]
    assert tracing._sampler({"OTEL_TRACES_SAMPLER": "always_off"}) is sampling.ALWAYS_OFF
    assert isinstance(tracing._sampler({}), sampling.ParentBased)  # the SDK's default, parentbased_always_on


@pytest.fixture(scope="module")
def b3_gw(tmp_path_factory: pytest.TempPathFactory, collector: Collector):
    repo = tmp_path_factory.mktemp("b3") / "repo"
    modelzoo.build_scaled(repo, "primary", scale=2.0)
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_SERVICE_NAME": "b3-gateway",
        "OTEL_PROPAGATORS": "b3multi",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with GatewayProcess(repo, env=env) as g:
        yield g


def test_the_propagators_the_environment_names_are_the_ones_read_on_both_transports(b3_gw, collector):
    trace_id, parent = f"{0xB3B3:032x}", f"{0xB3B4:016x}"
    b3 = {"X-B3-TraceId": trace_id, "X-B3-SpanId": parent, "X-B3-Sampled": "1"}
    _http_infer(b3_gw, "primary", b3)
    assert wait_until(lambda: "POST /v2/models/{model}/infer" in _by_name(collector.trace(trace_id)), timeout=15)
    (server,) = _by_name(collector.trace(trace_id))["POST /v2/models/{model}/infer"]
    assert server["parent"] == parent and server["service"] == "b3-gateway"

    grpc_trace, grpc_parent = f"{0xB3C3:032x}", f"{0xB3C4:016x}"
    with grpc.insecure_channel(b3_gw.grpc_url) as channel:
        request = pb.ModelInferRequest(model_name="primary")
        request.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(X.ravel().tolist())
        metadata = (("x-b3-traceid", grpc_trace), ("x-b3-spanid", grpc_parent), ("x-b3-sampled", "1"))
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata)
        # W3C trace context is not one of the propagators here: its traceparent starts no continuation
        w3c, w3c_trace, _ = _traceparent(0xB3D3)
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=(("traceparent", w3c),))
    assert wait_until(lambda: bool(collector.trace(grpc_trace)), timeout=15)
    (server,) = _by_name(collector.trace(grpc_trace))["inference.GRPCInferenceService/ModelInfer"]
    assert server["parent"] == grpc_parent
    grpc_servers = lambda: [  # noqa: E731
        s for s in list(collector.spans)
        if s["service"] == "b3-gateway" and s["name"] == "inference.GRPCInferenceService/ModelInfer"
    ]
    assert wait_until(lambda: len(grpc_servers()) == 2, timeout=15)
    assert collector.trace(w3c_trace) == []
