"""Every Prometheus metric of the gateway, on a registry that is passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Execution times, finer: the latency ratio of a rollout gate (candidate p99 / primary p99, against
# thresholds like 1.3) wants neighbouring edges closer than _LATENCY_BUCKETS' 2-2.5x. The same
# edges, and in each decade 1, 1.5, 2, 2.5, 3, 4, 5, 7.5 (at most 1.5x apart).
_EXEC_BUCKETS = tuple(
    sorted({*_LATENCY_BUCKETS, *(round(m * 10.0**e, 6) for e in range(-4, 1) for m in (1, 1.5, 2, 2.5, 3, 4, 5, 7.5))})
)
# Per-request shadow differences: the old decades, and 2 and 5 within them from 1e-3 to 1, so that
# thresholds like abs_diff_p99_max 0.05 fall on an edge (the share of requests above it is exact).
_ABS_DIFF_BUCKETS = (0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1, 10, 100)


class Metrics:
    """The gateway's metrics; one instance per gateway, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._request_children: dict[tuple[str, ...], Counter] = {}
        self._latency_children: dict[tuple[str, ...], Histogram] = {}
        self.requests = Counter(
            "onnxgate_requests",
            "Inference requests by model, version that answered, protocol and outcome.",
            ["model", "version", "protocol", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "onnxgate_request_duration_seconds",
            "Time from a decoded request to its response, including queueing.",
            ["model", "version", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_latency = Histogram(
            "onnxgate_compute_duration_seconds",
            "Time ONNX Runtime spent on one execution.",
            ["model", "version"],
            buckets=_EXEC_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "onnxgate_batch_rows",
            "Rows per executed batch.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.instance_busy = Counter(
            "onnxgate_instance_busy_seconds",
            "Time a version's instances spent executing batches (input, ONNX Runtime, output), "
            "summed over its instances: its rate over the instance count is their busy share.",
            ["model", "version"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "onnxgate_queue_wait_seconds",
            "Time a request waited in its version's queue before its batch started, by priority "
            "level (1 highest; shadow copies are 'shadow').",
            ["model", "version", "priority"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.deadline_misses = Counter(
            "onnxgate_deadline_misses",
            "Requests answered after their deadline (the caller's, or the model's default).",
            ["model", "version"],
            registry=r,
        )
        self.exec_fixed = Gauge(
            "onnxgate_exec_time_fixed_seconds",
            "The deadline scheduler's fitted execution time of a batch: its fixed part "
            "(a batch of n rows is predicted to take fixed + per_row * n).",
            ["model", "version"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.exec_per_row = Gauge(
            "onnxgate_exec_time_per_row_seconds",
            "The deadline scheduler's fitted execution time of a batch: its part per row.",
            ["model", "version"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.queue_depth = Gauge(
            "onnxgate_queue_depth",
            "Requests waiting in a version's queue.",
            ["model", "version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.queued_rows = Gauge(
            "onnxgate_queued_rows",
            "Rows waiting in a version's queue (requests are onnxgate_queue_depth): an autoscaling signal.",
            ["model", "version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.busy_ratio = Gauge(
            "onnxgate_instance_busy_ratio",
            "Share (0..1) of about the last 10 s that a version's instances spent executing, running "
            "executions included: an autoscaling signal (under --workers N, one series per worker: avg or max it).",
            ["model", "version"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.in_flight = Gauge(
            "onnxgate_requests_in_flight",
            "Inference requests being read, queued, run or answered now: an autoscaling signal (concurrency).",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rejected = Counter(
            "onnxgate_rejected_requests",
            "Requests shed without running, by reason: queue_full, queue_bytes, timeout, deadline "
            "(its deadline could not be met), priority (shed for a higher level), shadow_shed, decode_budget.",
            ["model", "reason"],
            registry=r,
        )
        self.model_state = Gauge(
            "onnxgate_model_ready",
            "1 when the model version is ready to serve, 0 otherwise.",
            ["model", "version"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.decode_bytes = Gauge(
            "onnxgate_decode_bytes",
            "Request bytes being read and decoded now, against the decode budget (server.decode_budget_bytes).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self._shadow_metrics(r)
        self.load_failures = Counter(
            "onnxgate_model_load_failures",
            "Model version loads that failed.",
            ["model"],
            registry=r,
        )

    def request_done(self, model: str, version: str, protocol: str, outcome: str, latency_s: float | None) -> None:
        """Count one answered request (and its latency); label children are cached."""
        key = (model, version, protocol, outcome)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(*key)
        counter.inc()
        if latency_s is not None:
            label = (model, version, protocol)
            hist = self._latency_children.get(label)
            if hist is None:
                hist = self._latency_children[label] = self.request_latency.labels(*label)
            hist.observe(latency_s)

    def _shadow_metrics(self, r: CollectorRegistry) -> None:
        pair = ["route", "primary", "shadow"]
        self.shadow_requests = Counter(
            "onnxgate_shadow_requests",
            "Shadow requests by outcome: compared, failed, dropped (over budget or shed).",
            [*pair, "outcome"],
            registry=r,
        )
        self.shadow_abs_diff = Histogram(
            "onnxgate_shadow_abs_diff",
            "Absolute difference of shadow and primary outputs per request (stat: max or mean over elements).",
            [*pair, "output", "stat"],
            buckets=_ABS_DIFF_BUCKETS,
            registry=r,
        )
        self.shadow_argmax_rows = Counter(
            "onnxgate_shadow_argmax_rows",
            "Rows of 2-D float outputs whose argmax agrees (agree=true) or not between shadow and primary.",
            [*pair, "output", "agree"],
            registry=r,
        )
        self.shadow_latency_diff = Histogram(
            "onnxgate_shadow_latency_diff_seconds",
            "Shadow latency minus primary latency.",
            pair,
            buckets=(-1, -0.1, -0.01, -0.001, 0, 0.001, 0.01, 0.1, 1, 10),
            registry=r,
        )

    def model_changed(self, model: str, version: int, state: str) -> None:
        """Follow a version's state change."""
        self.model_state.labels(model, str(version)).set(1 if state == "READY" else 0)
