"""Per-version inference statistics, as the V2 statistics extension reports them.

Counts are exact: every accepted request that reaches a version is counted once as a success
or a failure, and every execution once in ``batch_stats`` under its batch size (in rows).
Updated only from the event loop, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# The durations of the statistics extension's ``inference_stats``, in its order.
INFERENCE_STAT_FIELDS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@dataclass(slots=True)
class Duration:
    """A count and the total nanoseconds spent."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)


@dataclass(slots=True)
class BatchStats:
    """Compute durations of the executions that ran a given batch size."""

    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ExecutionTiming:
    """Nanoseconds of one execution's phases, measured in the worker thread."""

    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(slots=True)
class VersionStats:
    """Statistics of one model version."""

    name: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(self, batch_rows: int, timing: ExecutionTiming) -> None:
        """One execution of ``batch_rows`` rows."""
        self.execution_count += 1
        b = self.batches.get(batch_rows)
        if b is None:
            b = self.batches[batch_rows] = BatchStats(batch_rows)
        b.compute_input.add(timing.input_ns)
        b.compute_infer.add(timing.infer_ns)
        b.compute_output.add(timing.output_ns)

    def record_request(self, rows: int, total_ns: int, timing: ExecutionTiming) -> None:
        """One request answered successfully after waiting and computing as ``timing`` says."""
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.success.add(total_ns)
        self.queue.add(timing.queue_ns)
        self.compute_input.add(timing.input_ns)
        self.compute_infer.add(timing.infer_ns)
        self.compute_output.add(timing.output_ns)

    def record_failure(self, total_ns: int) -> None:
        """One request that reached this version and failed."""
        self.last_inference_ms = int(time.time() * 1000)
        self.fail.add(total_ns)
