"""Load generator: the parent -- phases, worker processes, CPU accounting and merged results."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtests.loadgen.payload import Target, build_payload, resolve_inputs
from loadtests.loadgen.report import latency_summary
from loadtests.loadgen.worker import _worker_main

_START_LEAD_S = 0.25  # time the workers get to receive a phase before it starts


@dataclass
class Phase:
    """One measured run: closed loop (``concurrency``) or open loop (``rate``)."""

    concurrency: int = 0
    rate: float = 0.0
    arrival: str = "constant"  # open loop: "constant" | "poisson"
    duration_s: float | None = 10.0  # measured window; None when ``requests`` is given
    requests: int | None = None  # exact number of measured requests instead of a duration
    warmup_s: float = 2.0
    max_inflight: int = 10_000  # open loop, per process

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.requests is not None:
            self.duration_s = None
            if self.requests < 1:
                raise ValueError("requests must be >= 1")
        elif not self.duration_s or self.duration_s <= 0:
            raise ValueError("give a positive duration or a request count")
        if self.arrival not in ("constant", "poisson"):
            raise ValueError("arrival must be constant or poisson")
        if self.warmup_s < 0:
            raise ValueError("warmup must be >= 0")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency > 0 else "open"


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds of a process (all its threads), or of its thread ``tid``; None
    when it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent busy (not idle or iowait) since boot."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(values[:8]) - values[3] - values[4]) / _CLK_TCK


class _CpuWatch(threading.Thread):
    """Samples the CPU time of some processes and of the whole machine over the measured window."""

    def __init__(self, pids: Sequence[int], measure_ns: int, end_ns: int) -> None:
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.measure_ns, self.end_ns = measure_ns, end_ns
        self.finish = threading.Event()
        self.result: dict[str, Any] = {}

    def _snapshot(self) -> tuple[float, float | None, list[float | None]]:
        return time.monotonic(), machine_busy_s(), [process_cpu_s(p) for p in self.pids]

    def run(self) -> None:
        wait = (self.measure_ns - time.monotonic_ns()) / 1e9
        if wait > 0 and self.finish.wait(wait):
            return
        t0, m0, p0 = self._snapshot()
        if self.end_ns:
            self.finish.wait(max(0.0, (self.end_ns - time.monotonic_ns()) / 1e9))
        else:
            self.finish.wait()
        t1, m1, p1 = self._snapshot()
        wall = max(1e-9, t1 - t0)
        self.result = {
            "machine_busy_cores": (m1 - m0) / wall if m0 is not None and m1 is not None else None,
            "watched_cpu_cores": {
                str(pid): (b - a) / wall if a is not None and b is not None else None
                for pid, a, b in zip(self.pids, p0, p1, strict=True)
            },
        }

    def stop(self) -> dict[str, Any]:
        self.finish.set()
        self.join(5)
        return self.result


def default_processes(cpus: Sequence[int] | None = None) -> int:
    """One worker process per CPU the workers may run on (at most 4)."""
    count = len(cpus) if cpus else len(os.sched_getaffinity(0))
    return max(1, min(4, count))


def cpu_list(text: str) -> list[int]:
    """CPU numbers from a command-line list such as ``1``, ``0,2`` or ``2-3``."""
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.append(int(part))
    return cpus


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class LoadGenerator:
    """Worker processes kept across phases (connections stay open between runs).

    >>> with LoadGenerator(Target("grpc://127.0.0.1:8001", "mlp")) as gen:  # doctest: +SKIP
    ...     result = gen.run(Phase(concurrency=64, duration_s=10))
    """

    def __init__(self, target: Target, processes: int | None = None, cpus: Sequence[int] | None = None) -> None:
        self.target = target
        self.cpus = list(cpus) if cpus else None
        self.processes = processes or default_processes(self.cpus)
        self.inputs = resolve_inputs(target)
        self.payload = build_payload(target, self.inputs)
        ctx = mp.get_context("spawn")
        self._workers: list[tuple[Any, Any]] = []
        try:
            for _ in range(self.processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, target, self.payload, self.cpus), daemon=True)
                proc.start()
                child.close()
                self._workers.append((proc, parent))
            self.pids = [self._receive(proc, conn, 120, "ready") for proc, conn in self._workers]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _receive(proc: Any, conn: Any, timeout: float, expect: str) -> Any:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"load generator worker {proc.pid} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"load generator worker {proc.pid} did not answer within {timeout:.0f} s")
        kind, value = conn.recv()
        if kind != expect:
            raise RuntimeError(f"load generator worker {proc.pid}: {value}")
        return value

    def run(self, phase: Phase, watch_pids: Sequence[int] = ()) -> dict:
        """Run one phase on every worker; returns the merged result (the RUN of the module doc).

        The CPU use of ``watch_pids`` (e.g. the server) over the measured window is reported as
        ``watched_cpu_cores``; ``machine_busy_cores`` is what all cores were busy with meanwhile.
        """
        n = self.processes
        start_ns = time.monotonic_ns() + int(_START_LEAD_S * 1e9)
        measure_ns = start_ns + int(phase.warmup_s * 1e9)
        end_ns = measure_ns + int(phase.duration_s * 1e9) if phase.duration_s else 0
        watch = _CpuWatch(watch_pids, measure_ns, end_ns)
        watch.start()
        conc = _split(phase.concurrency, n) if phase.concurrency else [0] * n
        quotas = _split(phase.requests, n) if phase.requests is not None else [None] * n
        if phase.rate:
            rates = [phase.rate / n] * n
            if phase.requests is not None:
                # Each process sends its share at its rate, so all finish together.
                rates = [phase.rate * q / phase.requests for q in quotas]  # type: ignore[operator]
        else:
            rates = [0.0] * n
        for i, (_, conn) in enumerate(self._workers):
            conn.send(
                (
                    "run",
                    {
                        "mode": phase.mode,
                        "concurrency": conc[i],
                        "rate": rates[i],
                        "arrival": phase.arrival,
                        "offset_ns": int(i * 1e9 / phase.rate) if phase.rate else 0,
                        "seed": i + 1,
                        "start_ns": start_ns,
                        "measure_ns": measure_ns,
                        "end_ns": end_ns,
                        "requests": quotas[i],
                        "timeout_s": self.target.timeout_s,
                        "max_inflight": phase.max_inflight,
                    },
                )
            )
        if phase.duration_s:
            budget = _START_LEAD_S + phase.warmup_s + phase.duration_s + (self.target.timeout_s or 30) + 60
        else:
            budget = 24 * 3600.0
        try:
            parts = [self._receive(proc, conn, budget, "result") for proc, conn in self._workers]
        finally:
            cpu = watch.stop()
        return self._merge(phase, parts, measure_ns, cpu)

    def _merge(self, phase: Phase, parts: list[dict], measure_ns: int, cpu: dict[str, Any]) -> dict:
        lat = np.concatenate([np.frombuffer(p["latency_ns"], dtype=np.int64) for p in parts]) / 1e6
        ok = sum(p["ok"] for p in parts)
        errors: dict[str, int] = {}
        for p in parts:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        n_err = sum(errors.values())
        if phase.duration_s:
            elapsed = phase.duration_s
        else:
            last = max((p["last_done_ns"] for p in parts), default=0)
            elapsed = max(1e-9, (last - measure_ns) / 1e9)
        lag_count = sum(p["lag_count"] for p in parts)
        cpu_s = sum(p["cpu_s"] for p in parts)
        cpu_wall = max((p["cpu_wall_s"] for p in parts), default=0.0)
        t = self.target
        return {
            "url": t.url,
            "transport": t.transport,
            "model": t.model,
            "model_version": t.model_version,
            "grpc_mode": t.grpc_mode if t.transport == "grpc" else None,
            "http_client": t.http_client if t.transport == "http" else None,
            "mode": phase.mode,
            "concurrency": phase.concurrency or None,
            "rate": phase.rate or None,
            "arrival": phase.arrival if phase.rate else None,
            "batch_size": self.payload.rows,
            "processes": self.processes,
            "cpus": self.cpus,
            "warmup_s": phase.warmup_s,
            "duration_s": phase.duration_s,
            "requests_target": phase.requests,
            "elapsed_s": round(elapsed, 6),
            "requests": ok + n_err,
            "successes": ok,
            "errors": n_err,
            "errors_by_kind": dict(sorted(errors.items())),
            "throughput_rps": ok / elapsed,
            "rows_per_s": ok * self.payload.rows / elapsed,
            "offered_rps": phase.rate or None,
            "latency_ms": latency_summary(lat),
            "send_lag_ms": {
                "mean": sum(p["lag_sum_ns"] for p in parts) / lag_count / 1e6 if lag_count else None,
                "max": max(p["lag_max_ns"] for p in parts) / 1e6 if lag_count else None,
            },
            "client_cpu_s": cpu_s,
            "client_cpu_cores": cpu_s / cpu_wall if cpu_wall else None,
            "watched_cpu_cores": cpu.get("watched_cpu_cores", {}),
            "machine_busy_cores": cpu.get("machine_busy_cores"),
        }

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                if proc.is_alive():
                    conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in self._workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_load(
    target: Target, phases: Sequence[Phase], processes: int | None = None, cpus: Sequence[int] | None = None
) -> list[dict]:
    """Run ``phases`` one after the other with one set of worker processes."""
    with LoadGenerator(target, processes, cpus) as gen:
        return [gen.run(phase) for phase in phases]
