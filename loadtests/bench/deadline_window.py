"""Deadline benchmark: what the gateway reports over a run's measured window -- its metrics
(rejections by reason, deadline misses, rows per execution, ORT time) and the CPU it (its main
thread, the event loop, apart), this process and the rest of the machine used."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from loadtests.bench import procs
from loadtests.loadgen.runner import machine_busy_s, process_cpu_s


def fetch(port: int) -> str:
    """The metrics port's text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample in a Prometheus text page: (name, sorted labels) -> value."""
    out: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = tuple(sorted(tuple(p.split("=", 1)) for p in labels.rstrip("}").split('",') if "=" in p))
        out[(name, tuple((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def _delta(a: dict, b: dict, name: str, model: str, by: str | None = None) -> dict[str, float] | float | None:
    found: dict[str, float] = {}
    for (n, labels), value in b.items():
        lab = dict(labels)
        if n == name and lab.get("model") == model:
            key = lab.get(by, "") if by else ""
            found[key] = found.get(key, 0.0) + value - a.get((n, labels), 0.0)
    if by:
        return found
    return found.get("") if found else None


class Window:
    """Metrics and CPU of the gateway at a run's measured window's start and end."""

    def __init__(self, gw: procs.ServerProcess, model: str) -> None:
        self.gw, self.model = gw, model
        self.snaps: list[tuple] = []

    def _snap(self) -> None:
        pid = self.gw.pid
        # Only fetched here: parsing (GIL-bound) waits for result(), after the run's sender is done.
        self.snaps.append((time.monotonic(), fetch(self.gw.metrics_port), process_cpu_s(pid),
                           machine_busy_s(), time.process_time(),
                           process_cpu_s(pid, pid)))  # its main thread: the event loop

    async def at(self, when_ns: int) -> None:
        await asyncio.sleep(max(0.0, (when_ns - time.monotonic_ns()) / 1e9))
        await asyncio.to_thread(self._snap)

    def result(self) -> tuple[dict, dict]:
        if len(self.snaps) < 2:
            return {}, {}
        (t0, text0, g0, b0, c0, l0), (t1, text1, g1, b1, c1, l1) = self.snaps[:2]
        m0, m1 = parse(text0), parse(text1)
        wall = t1 - t0
        rows = _delta(m0, m1, "onnxgate_batch_rows_sum", self.model)
        execs = _delta(m0, m1, "onnxgate_batch_rows_count", self.model)
        comp = _delta(m0, m1, "onnxgate_compute_duration_seconds_sum", self.model)
        comp_n = _delta(m0, m1, "onnxgate_compute_duration_seconds_count", self.model)
        busy = _delta(m0, m1, "onnxgate_instance_busy_seconds_total", self.model)
        metrics = {
            "rejected": _delta(m0, m1, "onnxgate_rejected_requests_total", self.model, by="reason"),
            "deadline_misses": _delta(m0, m1, "onnxgate_deadline_misses_total", self.model),
            "batch_rows": rows / execs if rows is not None and execs else None,
            "executions": execs,
            "rows_per_s": rows / wall if rows is not None else None,
            "compute_ms_per_batch": comp / comp_n * 1e3 if comp is not None and comp_n else None,
            "compute_share": comp / wall if comp is not None else None,
            "busy_share": busy / wall if busy is not None else None,
        }
        gw = (g1 - g0) / wall if g0 is not None and g1 is not None else None
        machine = (b1 - b0) / wall if b0 is not None and b1 is not None else None
        client = (c1 - c0) / wall
        other = machine - (gw or 0) - client if machine is not None else None
        loop = (l1 - l0) / wall if l0 is not None and l1 is not None else None
        return metrics, {"gateway_cores": gw, "gateway_loop_cores": loop, "client_cores": client, "other_cores": other}
