"""Benchmark: measurements -- environment, raw ONNX Runtime, load sweeps against a server, profiling."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.bench import models, procs
from loadtests.bench.common import DISTURBED_CORES, TRANSPORTS, Settings, _f, _label, _log, _ms, cpu_us_per_request
from loadtests.loadgen.payload import Target, TensorSpec
from loadtests.loadgen.runner import _START_LEAD_S, LoadGenerator, Phase, machine_busy_s

OPEN_LOOP_LAG_MS = 1.0  # an open-loop client whose mean send lag exceeds this fell behind: bound=client


def environment(settings: Settings) -> dict[str, Any]:
    """Machine, versions, and how busy the machine is before we start."""
    import grpc
    import numpy
    import onnxruntime
    import uvicorn
    import uvloop

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git: dict[str, Any] = {}
    root = Path(__file__).resolve().parents[2]  # the repository root
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "server"], cwd=root, capture_output=True, text=True, timeout=10
        )
        git = {"head": head.stdout.strip(), "server_changes": dirty.stdout.split("\n")[:-1]}
    except (OSError, subprocess.SubprocessError):
        pass
    b0, t0 = machine_busy_s(), time.monotonic()
    time.sleep(1.0)
    b1, t1 = machine_busy_s(), time.monotonic()
    return {
        "cpus_online": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "grpcio": grpc.__version__,
            "uvicorn": uvicorn.__version__,
            "uvloop": uvloop.__version__,
            "numpy": numpy.__version__,
        },
        "idle_machine_busy_cores_before": (b1 - b0) / (t1 - t0) if b0 is not None and b1 is not None else None,
        "loadavg": os.getloadavg(),
        "git": git,
    }


def run_ort(repo: Path, settings: Settings, names: Sequence[str]) -> dict[str, Any]:
    """Raw ONNX Runtime in subprocesses pinned like the gateway: one per group of models with the same plan."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        plan = settings.plan(name)
        groups.setdefault((tuple(plan.ort_batch_sizes), plan.ort_seconds, plan.ort_min_runs), []).append(name)
    result: dict[str, Any] = {"models": {}}
    env = {**os.environ, "PYTHONPATH": procs._pythonpath()}
    for (batch_sizes, seconds, min_runs), group in groups.items():
        out = repo / "ort.json"
        cmd = [*procs.taskset_prefix(settings.server_cpus), sys.executable, "-m", "loadtests.bench.ort"]
        cmd += ["--repo", str(repo), "--models", ",".join(group), "--seconds", str(seconds)]
        cmd += ["--batch-sizes", ",".join(map(str, batch_sizes)), "--min-runs", str(min_runs), "--json", str(out)]
        subprocess.run(cmd, check=True, env=env)
        part = json.loads(out.read_text())
        result["cpus"] = part["cpus"]
        result["models"].update(part["models"])
    result["models"] = {name: result["models"][name] for name in names}
    return result


BUSY_COUNTER = "onnxgate_instance_busy_seconds_total"
_SCRAPED = (
    "onnxgate_batch_rows",
    "onnxgate_queue_wait_seconds",
    "onnxgate_compute_duration_seconds",
    "onnxgate_request_duration_seconds",
)


def scrape(metrics_port: int, model: str) -> dict[str, float]:
    """Sums and counts of the gateway's batcher histograms and its instance busy counter for ``model``
    (all versions/protocols; with several workers, their sum)."""
    if not metrics_port:
        return {}
    t = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {"t": t}
    needle = f'model="{model}"'
    for line in text.splitlines():
        if needle not in line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0]
        if name == BUSY_COUNTER or any(name in (base + "_sum", base + "_count") for base in _SCRAPED):
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class _WindowScrape(threading.Thread):
    """Scrapes the gateway's metrics when a phase's measured window starts and when it ends."""

    def __init__(self, metrics_port: int, model: str, phase: Phase) -> None:
        super().__init__(daemon=True)
        self.port, self.model = metrics_port, model
        # LoadGenerator.run starts the phase _START_LEAD_S after it is called, then warms up.
        self.start_at = time.monotonic() + _START_LEAD_S + phase.warmup_s
        self.end_at = self.start_at + (phase.duration_s or 0.0)
        self.cancel = threading.Event()
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    def run(self) -> None:
        if self.cancel.wait(max(0.0, self.start_at - time.monotonic())):
            return
        self.before = scrape(self.port, self.model)
        if self.cancel.wait(max(0.0, self.end_at - time.monotonic())):
            return
        self.after = scrape(self.port, self.model)

    def result(self, instances: int) -> dict[str, float | None] | None:
        self.join(10)
        self.cancel.set()
        return batcher_stats(self.before, self.after, instances)


def batcher_stats(
    before: dict[str, float], after: dict[str, float], instances: int = 1
) -> dict[str, float | None] | None:
    """What the gateway's batcher did between two scrapes (the measured window).

    ``busy_share``: the rate of ``onnxgate_instance_busy_seconds_total`` over ``instances`` (every
    instance of the model, over all workers); ``ort_busy_fraction``: ONNX Runtime's own time
    (``onnxgate_compute_duration_seconds``) over the wall time."""
    if not before or not after:
        return None

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches, requests = d("onnxgate_batch_rows_count"), d("onnxgate_request_duration_seconds_count")
    wall = after["t"] - before["t"]
    return {
        "executions": batches,
        "mean_batch_rows": d("onnxgate_batch_rows_sum") / batches if batches else None,
        "mean_queue_wait_ms": 1e3 * d("onnxgate_queue_wait_seconds_sum") / d("onnxgate_queue_wait_seconds_count")
        if d("onnxgate_queue_wait_seconds_count")
        else None,
        "mean_compute_ms": 1e3 * d("onnxgate_compute_duration_seconds_sum") / batches if batches else None,
        "mean_service_ms": 1e3 * d("onnxgate_request_duration_seconds_sum") / requests if requests else None,
        "ort_busy_fraction": d("onnxgate_compute_duration_seconds_sum") / wall if wall > 0 else None,
        "busy_share": d(BUSY_COUNTER) / wall / instances if wall > 0 and BUSY_COUNTER in after else None,
        "instances": instances,
        "window_s": wall,
    }


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway with ``--workers N`` serves from child processes)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def _enrich(run: dict, server: str, label: str, watched: Sequence[int], settings: Settings) -> dict:
    cores = [run["watched_cpu_cores"].get(str(pid)) for pid in watched]
    srv = sum(c for c in cores if c is not None) if any(c is not None for c in cores) else None
    cli = run["client_cpu_cores"]
    busy = run["machine_busy_cores"]
    other = busy - (srv or 0) - (cli or 0) if busy is not None else None
    server_cores = len(settings.server_cpus) if settings.server_cpus else (os.cpu_count() or 1)
    client_cores = len(settings.loadgen_cpus) if settings.loadgen_cpus else (os.cpu_count() or 1)
    bound = []
    if srv is not None and srv >= 0.9 * server_cores:
        bound.append("server")
    if run.get("mode") == "open":
        # The open loop spins through the last ~1 ms before each send, so its CPU reads high even
        # when it keeps up: it is the bottleneck when it falls behind its schedule.
        if ((run.get("send_lag_ms") or {}).get("mean") or 0.0) > OPEN_LOOP_LAG_MS:
            bound.append("client")
    elif cli is not None and cli >= 0.9 * client_cores:
        bound.append("client")
    run.update(
        {
            "server": server,
            "label": label,
            "server_cpu_cores": srv,
            "server_pids": list(watched),
            "other_cpu_cores": max(0.0, other) if other is not None else None,
            "bound": "+".join(bound) or "-",
        }
    )
    run["server_cpu_us_per_request"] = cpu_us_per_request(run)
    return run


def _measure(
    gen: LoadGenerator,
    phase: Phase,
    server: str,
    proc: procs.ServerProcess,
    model: str,
    label: str,
    settings: Settings,
    instances: int,
) -> dict:
    """One run, measured again (within the retry budget) while other load disturbed it."""
    attempts = []
    for _ in range(1 + settings.retries):
        watched = process_tree(proc.pid)
        window = _WindowScrape(proc.metrics_port, model, phase)
        window.start()
        try:
            run = _enrich(gen.run(phase, watched), server, label, watched, settings)
        finally:
            run_batcher = window.result(instances)
        run["batcher"] = run_batcher
        if proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{server} exited ({proc.proc.returncode}) during a run:\n{proc.log[-2000:]}")
        attempts.append(run)
        if (run["other_cpu_cores"] or 0.0) <= DISTURBED_CORES:
            break
        cost = phase.warmup_s + (phase.duration_s or 0.0) + 0.3
        if settings.retry_budget_s < cost:
            break
        settings.retry_budget_s -= cost
        _log(f"  (disturbed: {run['other_cpu_cores']:.2f} cores of other load; measuring again)")
    run = min(attempts, key=lambda r: r["other_cpu_cores"] or 0.0)
    run["attempts"] = len(attempts)
    run["disturbed"] = (run["other_cpu_cores"] or 0.0) > DISTURBED_CORES
    lat = run["latency_ms"]
    load = f"C={phase.concurrency:<3}" if phase.concurrency else f"R={phase.rate:<5.0f}"
    _log(
        f"  {server:7} {model:6} {label:11} {load} {run['throughput_rps']:9.1f} req/s  "
        f"p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])}  err {run['errors']}  "
        f"srv {_f(run['server_cpu_cores'])} cli {_f(run['client_cpu_cores'])} "
        f"other {_f(run['other_cpu_cores'])} cpu/req {_f(run['server_cpu_us_per_request'], 0)}us"
    )
    return run


def sweep(
    server: str,
    proc: procs.ServerProcess,
    model: models.BenchModel,
    settings: Settings,
    open_loop: float = 0.0,
    instances: int = 1,
) -> list[dict]:
    """Closed-loop sweep over the model's transports and concurrency levels against one server.

    The plan's top level runs ``repeats`` times (``repeat`` 0, 1, ...). With ``open_loop`` > 0, each
    transport then gets one open-loop run (``mode`` "open") offering that share of the highest
    closed-loop throughput it just measured. ``instances``: the model's instances in the server
    (every worker's), for the batcher's busy share."""
    plan = settings.plan(model.name)
    runs = []
    for transport, mode in TRANSPORTS:
        label = _label(transport, mode)
        if label not in plan.labels:
            continue
        url_grpc, url_http = f"grpc://127.0.0.1:{proc.grpc_port}", f"http://127.0.0.1:{proc.http_port}"
        target = Target(
            url=url_grpc if transport == "grpc" else url_http,
            model=model.name,
            inputs=[TensorSpec("x", "FP32", (model.in_dim,))],
            outputs=["y"],
            batch_size=1,
            grpc_mode=mode,
            timeout_s=60.0,
        )
        closed: list[dict] = []
        with LoadGenerator(target, settings.processes, settings.loadgen_cpus) as gen:
            for level in plan.levels:
                for repeat in range(plan.repeats if level == max(plan.levels) else 1):
                    phase = Phase(concurrency=level, duration_s=plan.duration_s, warmup_s=plan.warmup_s)
                    run = _measure(gen, phase, server, proc, model.name, label, settings, instances)
                    run["repeat"] = repeat
                    closed.append(run)
            runs += closed
            peak = max((r["throughput_rps"] for r in closed), default=0.0)
            if open_loop > 0 and peak > 0:
                phase = Phase(rate=open_loop * peak, duration_s=plan.duration_s, warmup_s=plan.warmup_s)
                run = _measure(gen, phase, server, proc, model.name, label, settings, instances)
                run.update({"repeat": 0, "open_loop_fraction": open_loop, "closed_peak_rps": peak})
                runs.append(run)
    return runs


def _delayed_popen(cmd: list[str], delay_s: float, holder: list[subprocess.Popen]) -> None:
    time.sleep(delay_s)
    holder.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))


def profile_gateway(gw: procs.ServerProcess, model: models.BenchModel, settings: Settings) -> dict[str, str]:
    """py-spy the gateway at the highest concurrency (gRPC unary, then HTTP): raw stacks + report.

    Separate runs from the measured ones: py-spy (``--nonblocking``) still costs the gateway a little.
    """
    from loadtests.bench import profile_report

    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    out: dict[str, str] = {}
    level = max(settings.levels)
    for transport, mode in (("grpc", "unary"), ("http", "raw")):
        label = _label(transport, mode)
        url = f"grpc://127.0.0.1:{gw.grpc_port}" if transport == "grpc" else f"http://127.0.0.1:{gw.http_port}"
        target = Target(url, model.name, inputs=[TensorSpec("x", "FP32", (model.in_dim,))], outputs=["y"])
        raw = settings.out / f"profile-{model.name}-{label}.txt"
        cmd = [pyspy, "record", "--pid", str(gw.pid), "--rate", "250", "--nonblocking", "--format", "raw"]
        cmd += ["--duration", str(int(settings.profile_seconds)), "-o", str(raw)]
        holder: list[subprocess.Popen] = []
        with LoadGenerator(target, settings.processes, settings.loadgen_cpus) as gen:
            # py-spy starts after the warm-up and stops before the run ends.
            spy_thread = threading.Thread(target=_delayed_popen, args=(cmd, 1.5, holder))
            spy_thread.start()
            run = gen.run(Phase(concurrency=level, duration_s=settings.profile_seconds + 3, warmup_s=1.0), [gw.pid])
            spy_thread.join()
        _, err = holder[0].communicate(timeout=60)
        if holder[0].returncode != 0 or not raw.exists():
            out[label] = f"py-spy failed: {err.strip()[-300:]}"
            continue
        text = profile_report.report(raw, 15, ["ModelInfer (", "HttpApp.__call__", "Batcher._worker"], 1.5)
        (settings.out / f"profile-{model.name}-{label}.report.txt").write_text(text)
        out[label] = text
        _log(f"  profiled {label}: {run['throughput_rps']:.0f} req/s under py-spy; report in {raw.name}")
    return out
