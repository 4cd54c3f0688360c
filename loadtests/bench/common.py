"""Benchmark: settings, constants and small formatting helpers shared by its other modules."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRANSPORTS: tuple[tuple[str, str], ...] = (("grpc", "unary"), ("grpc", "stream"), ("http", "raw"))
LABELS: tuple[str, ...] = ("grpc-unary", "grpc-stream", "http")
OVERHEAD_MODEL, PAYLOAD_MODEL, COMPUTE_MODEL = "gemm16", "mlp", "huge"
DISTURBED_CORES = 0.35  # other load in a run's window above which it is measured again, then flagged
OPEN_LOOP_FRACTION = 0.70  # open-loop runs offer this share of the closed-loop peak (gateway, overhead-bound)


@dataclass
class Plan:
    """How one model is measured when it differs from the run's defaults (``Settings.plan``)."""

    levels: list[int]
    labels: list[str]  # transports, as ``_label`` names them
    warmup_s: float
    duration_s: float
    repeats: int  # runs of the top concurrency level (the spread shows run-to-run stability)
    ort_batch_sizes: list[int]
    ort_seconds: float  # per batch size
    ort_min_runs: int  # per batch size and round

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Settings:
    mode: str
    levels: list[int]
    warmup_s: float
    duration_s: float
    ort_seconds: float
    batch_sizes: list[int]
    server_cpus: list[int] | None
    loadgen_cpus: list[int] | None
    processes: int
    out: Path
    profile: bool
    profile_seconds: float
    retries: int
    retry_budget_s: float  # total time re-measurements may add
    plans: dict[str, Plan] = field(default_factory=dict)  # models measured differently (COMPUTE_MODEL)

    def plan(self, model: str) -> Plan:
        """``model``'s plan: its own, or else ``default_plan``."""
        return self.plans.get(model) or self.default_plan()

    def default_plan(self) -> Plan:
        """Every transport at ``levels`` with the run's durations and batch sizes."""
        return Plan(
            levels=list(self.levels),
            labels=list(LABELS),
            warmup_s=self.warmup_s,
            duration_s=self.duration_s,
            repeats=1,
            ort_batch_sizes=list(self.batch_sizes),
            ort_seconds=self.ort_seconds,
            ort_min_runs=5,
        )

    @property
    def top(self) -> int:
        """The highest concurrency level: the "64 clients" of the targets by default."""
        return max(self.levels)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _label(transport: str, mode: str) -> str:
    return f"grpc-{mode}" if transport == "grpc" else "http"


def cpu_us_per_request(run: dict) -> float | None:
    """Server CPU-microseconds per answered request over the measured window (watched CPU / requests)."""
    cores, rps = run.get("server_cpu_cores"), run.get("throughput_rps")
    return cores / rps * 1e6 if cores is not None and rps else None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}ms"


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"
