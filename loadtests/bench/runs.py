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
from loadtests.bench.common import DISTURBED_CORES, TRANSPORTS, Settings, _f, _label, _log, _ms
from loadtests.loadgen.payload import Target, TensorSpec
from loadtests.loadgen.runner import LoadGenerator, Phase, machine_busy_s


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
    """Raw ONNX Runtime in a subprocess pinned like the gateway."""
    out = repo / "ort.json"
    cmd = [*procs.taskset_prefix(settings.server_cpus), sys.executable, "-m", "loadtests.bench.ort"]
    cmd += ["--repo", str(repo), "--models", ",".join(names), "--seconds", str(settings.ort_seconds)]
    cmd += ["--batch-sizes", ",".join(map(str, settings.batch_sizes)), "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": procs._pythonpath()}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


_SCRAPED = (
    "onnxgate_batch_rows",
    "onnxgate_queue_wait_seconds",
    "onnxgate_compute_duration_seconds",
    "onnxgate_request_duration_seconds",
)


def scrape(metrics_port: int, model: str) -> dict[str, float]:
    """Sums and counts of the gateway's batcher histograms for ``model`` (all versions/protocols)."""
    if not metrics_port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {"t": time.monotonic()}
    needle = f'model="{model}"'
    for line in text.splitlines():
        if needle not in line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0]
        for base in _SCRAPED:
            if name in (base + "_sum", base + "_count"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def batcher_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None] | None:
    """What the gateway's batcher did between two scrapes (warm-up and drain included)."""
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
    }


def _enrich(run: dict, server: str, label: str, server_pid: int, settings: Settings) -> dict:
    srv = run["watched_cpu_cores"].get(str(server_pid))
    cli = run["client_cpu_cores"]
    busy = run["machine_busy_cores"]
    other = busy - (srv or 0) - (cli or 0) if busy is not None else None
    server_cores = len(settings.server_cpus) if settings.server_cpus else (os.cpu_count() or 1)
    client_cores = len(settings.loadgen_cpus) if settings.loadgen_cpus else (os.cpu_count() or 1)
    bound = []
    if srv is not None and srv >= 0.9 * server_cores:
        bound.append("server")
    if cli is not None and cli >= 0.9 * client_cores:
        bound.append("client")
    run.update(
        {
            "server": server,
            "label": label,
            "server_cpu_cores": srv,
            "other_cpu_cores": max(0.0, other) if other is not None else None,
            "bound": "+".join(bound) or "-",
        }
    )
    return run


def sweep(
    server: str,
    proc: procs.ServerProcess,
    model: models.BenchModel,
    settings: Settings,
) -> list[dict]:
    """Closed-loop sweep over every transport and concurrency level against one server."""
    runs = []
    for transport, mode in TRANSPORTS:
        url_grpc, url_http = f"grpc://127.0.0.1:{proc.grpc_port}", f"http://127.0.0.1:{proc.http_port}"
        server_pid = proc.pid
        target = Target(
            url=url_grpc if transport == "grpc" else url_http,
            model=model.name,
            inputs=[TensorSpec("x", "FP32", (model.in_dim,))],
            outputs=["y"],
            batch_size=1,
            grpc_mode=mode,
            timeout_s=60.0,
        )
        label = _label(transport, mode)
        with LoadGenerator(target, settings.processes, settings.loadgen_cpus) as gen:
            for level in settings.levels:
                phase = Phase(concurrency=level, duration_s=settings.duration_s, warmup_s=settings.warmup_s)
                attempts = []
                for _ in range(1 + settings.retries):
                    before = scrape(proc.metrics_port, model.name)
                    run = _enrich(gen.run(phase, [server_pid]), server, label, server_pid, settings)
                    run["batcher"] = batcher_stats(before, scrape(proc.metrics_port, model.name))
                    if proc.proc is not None and proc.proc.poll() is not None:
                        raise RuntimeError(
                            f"{server} exited ({proc.proc.returncode}) during a run:\n{proc.log[-2000:]}"
                        )
                    attempts.append(run)
                    if (run["other_cpu_cores"] or 0.0) <= DISTURBED_CORES:
                        break
                    cost = settings.warmup_s + settings.duration_s + 0.3
                    if settings.retry_budget_s < cost:
                        break
                    settings.retry_budget_s -= cost
                    _log(f"  (disturbed: {run['other_cpu_cores']:.2f} cores of other load; measuring again)")
                run = min(attempts, key=lambda r: r["other_cpu_cores"] or 0.0)
                run["attempts"] = len(attempts)
                run["disturbed"] = (run["other_cpu_cores"] or 0.0) > DISTURBED_CORES
                runs.append(run)
                lat = run["latency_ms"]
                _log(
                    f"  {server:7} {model.name:6} {label:11} C={level:<3} {run['throughput_rps']:9.1f} req/s  "
                    f"p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])}  err {run['errors']}  "
                    f"srv {_f(run['server_cpu_cores'])} cli {_f(run['client_cpu_cores'])} "
                    f"other {_f(run['other_cpu_cores'])}"
                )
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
