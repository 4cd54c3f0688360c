"""Benchmark: settings, constants and small formatting helpers shared by its other modules."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

TRANSPORTS: tuple[tuple[str, str], ...] = (("grpc", "unary"), ("grpc", "stream"), ("http", "raw"))
OVERHEAD_MODEL, COMPUTE_MODEL = "gemm16", "big"
DISTURBED_CORES = 0.35  # other load in a run's window above which it is measured again, then flagged


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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _label(transport: str, mode: str) -> str:
    return f"grpc-{mode}" if transport == "grpc" else "http"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}ms"


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"
