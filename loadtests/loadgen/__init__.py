"""Load generator for the Open Inference Protocol (KServe V2): gRPC unary, gRPC stream and HTTP.

Transports (chosen by the ``--url`` scheme):

* ``grpc://H:P`` -- ``ModelInfer`` unary calls over raw ``grpc.aio`` multi-callables fed with a
  pre-serialized request (no per-call protobuf work), or with ``--stream`` one or more
  ``ModelStreamInfer`` streams per process, requests tagged with a unique ``id`` and replies
  matched to them by that ``id``.
* ``http://H:P`` -- ``POST /v2/models/M/infer`` with the binary tensor extension (JSON header +
  raw bytes, ``Inference-Header-Content-Length``), over keep-alive connections. The default
  client is a lean ``asyncio.Protocol`` + ``httptools`` parser (``--http-client raw``); the
  aiohttp client is available for comparison (``--http-client aiohttp``).

Load models:

* **closed loop** (``--concurrency C``): C clients, each sends its next request when its
  previous one finished. Latency = completion - send.
* **open loop** (``--rate R``): requests arrive at a fixed rate (``--arrival constant``) or as a
  Poisson process (``--arrival poisson``), whether or not earlier ones have finished. Latency is
  measured from the **intended** send time, so a stalled server or client shows up as latency
  (no coordinated omission). ``send_lag_ms`` reports how late the client itself was.

A run has a warm-up (``--warmup`` seconds, excluded from every number) followed by the measured
window: ``--duration`` seconds, or exactly ``--requests`` requests. A request belongs to the
window when its (intended) send time does. Load comes from ``--processes`` worker processes,
each running one uvloop event loop; ``--cpus`` pins them.

Output: a table and a JSON document ``{"loadgen": 1, "runs": [RUN, ...]}`` where each RUN has

    url, transport, model, model_version, grpc_mode, http_client, mode ("closed"|"open"),
    concurrency, rate, arrival, batch_size, processes, cpus, warmup_s, duration_s,
    requests_target, elapsed_s, requests, successes, errors, errors_by_kind {kind: count},
    throughput_rps, rows_per_s, offered_rps,
    latency_ms {min, mean, p50, p90, p99, p999, max},
    send_lag_ms {mean, max}, client_cpu_s, client_cpu_cores,
    watched_cpu_cores {pid: cores} (``--watch-pid``), machine_busy_cores

``requests == successes + errors``; errors are keyed ``grpc:<STATUS>``, ``http:<status>``,
``stream:<message>``, ``timeout``, ``connect:<exception>``, ``client_overflow`` (open loop: more
than ``--max-inflight`` requests outstanding, the request was not sent) and ``invalid_response``
(``--validate`` only).

This package owns the load generator: ``__main__`` is its CLI (``python -m loadtests.loadgen``);
the parts live in ``payload`` (what to send), ``grpc_client`` / ``http_client`` (clients),
``worker`` (one worker process), ``runner`` (phases, worker processes, CPU accounting, merged
results) and ``report`` (percentiles, table). This module re-exports the API. It needs nothing
from ``loadtests.bench``.

Example::

    python -m loadtests.loadgen --url grpc://127.0.0.1:8001 --model mlp --concurrency 64 --duration 10
"""

from loadtests.loadgen.grpc_client import GRPC_INFER as GRPC_INFER
from loadtests.loadgen.grpc_client import GRPC_STREAM as GRPC_STREAM
from loadtests.loadgen.grpc_client import varint as varint
from loadtests.loadgen.payload import Payload, Target, TensorSpec, build_payload, resolve_inputs
from loadtests.loadgen.report import format_table, latency_summary
from loadtests.loadgen.runner import LoadGenerator, Phase, cpu_list, default_processes, run_load
from loadtests.loadgen.runner import machine_busy_s as machine_busy_s
from loadtests.loadgen.runner import process_cpu_s as process_cpu_s

__all__ = [
    "LoadGenerator",
    "Payload",
    "Phase",
    "Target",
    "TensorSpec",
    "build_payload",
    "cpu_list",
    "default_processes",
    "format_table",
    "latency_summary",
    "resolve_inputs",
    "run_load",
]
