"""One-command benchmark: raw ONNX Runtime vs the gateway vs bare echo servers, on one machine.

    python -m loadtests.benchmark --quick          # ~2 minutes
    python -m loadtests.benchmark                  # full sweep, ~8-10 minutes
    python -m loadtests.benchmark --profile        # also py-spy the gateway under overhead-bound load

It builds three models into a temporary repository (``loadtests.models``), measures raw ONNX Runtime
in process at batch sizes 1..256 with the gateway's session options (``loadtests.ort_bench``),
starts the gateway and sweeps closed-loop concurrency 1..64 with single-row requests over gRPC
unary, gRPC stream and HTTP, then does the same against bare grpc.aio / uvicorn echo servers
(``loadtests.echo_servers``) carrying the overhead-bound model's payload. It prints the table of
targets (PASS/MISS, reported, never asserted) and writes ``benchmark.json`` and ``benchmark.png``
(throughput vs p99 latency) to ``--out``.

CPU split: on a machine with two or more CPUs the gateway, the echo servers and raw ONNX Runtime
all run pinned (``taskset``) to ``--server-cpus`` (default CPU 0) and the load generator to
``--loadgen-cpus`` (default CPU 1), so the servers and raw ONNX Runtime get the same compute and
the ratios compare like with like. Every run reports the CPU the server, the load generator and
the rest of the machine used in the measured window.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import loadgen, models, procs
from loadtests.loadgen import LoadGenerator, Phase, Target, TensorSpec

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
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


def _cpus(text: str) -> list[int] | None:
    return None if text in ("", "none") else loadgen._cpu_list(text)


# ----------------------------------------------------------------------------------------------
# measurements


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
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "server"], cwd=root, capture_output=True, text=True, timeout=10
        )
        git = {"head": head.stdout.strip(), "server_changes": dirty.stdout.split("\n")[:-1]}
    except (OSError, subprocess.SubprocessError):
        pass
    b0, t0 = loadgen.machine_busy_s(), time.monotonic()
    time.sleep(1.0)
    b1, t1 = loadgen.machine_busy_s(), time.monotonic()
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
    cmd = [*procs.taskset_prefix(settings.server_cpus), sys.executable, "-m", "loadtests.ort_bench"]
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
    from loadtests import profile_report

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


# ----------------------------------------------------------------------------------------------
# targets and output


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}ms"


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _find(runs: list[dict], server: str, model: str, label: str, level: int | None = None) -> list[dict]:
    return [
        r
        for r in runs
        if r["server"] == server
        and r["model"] == model
        and r["label"] == label
        and (level is None or r["concurrency"] == level)
    ]


def _p50_at(runs: list[dict], model: str, label: str, level: int, server: str = "gateway") -> float | None:
    found = _find(runs, server, model, label, level)
    return found[0]["latency_ms"]["p50"] if found else None


def _peak(runs: list[dict]) -> dict | None:
    return max(runs, key=lambda r: r["throughput_rps"]) if runs else None


def _target(
    tid: str, text: str, value: float | None, op: str, goal: float, unit: str, detail: str, used: Sequence[dict] = ()
) -> dict:
    met = value is not None and (value >= goal if op == ">=" else value <= goal)
    status = "n/a" if value is None else ("PASS" if met else "MISS")
    if value is not None and any(r.get("disturbed") for r in used):
        status += "?"
        detail += " [disturbed by other load: see 'other']"
    return {
        "id": tid,
        "description": text,
        "value": value,
        "op": op,
        "target": goal,
        "unit": unit,
        "status": status,
        "detail": detail,
    }


def targets(ort: dict, runs: list[dict], settings: Settings) -> tuple[list[dict], list[dict]]:
    """The targets of issue 3 item 6 plus unary-vs-stream ratios."""
    out = []
    top = max(settings.levels)
    best = ort["models"][COMPUTE_MODEL]["best"]
    for label in ("grpc-unary", "grpc-stream", "http"):
        r = _find(runs, "gateway", COMPUTE_MODEL, label, top)
        value = r[0]["rows_per_s"] / best["rows_per_s"] if r else None
        detail = (
            f"{r[0]['rows_per_s']:.0f} rows/s at C={top} vs raw ORT {best['rows_per_s']:.0f} rows/s "
            f"(batch {best['batch_size']})"
            if r
            else ""
        )
        out.append(
            _target(
                f"a/{label}",
                f"compute-bound ({COMPUTE_MODEL}) {label}: gateway rows/s at C={top} / raw ORT best-batch rows/s",
                value,
                ">=",
                0.85,
                "x",
                detail,
                r,
            )
        )
    at_top = next((b for b in ort["models"][COMPUTE_MODEL]["batches"] if b["batch_size"] == top), None)
    for label in ("grpc-unary", "grpc-stream", "http"):
        r = _find(runs, "gateway", COMPUTE_MODEL, label, top)
        if not r or at_top is None:
            continue
        b = r[0].get("batcher") or {}
        value = r[0]["rows_per_s"] / at_top["rows_per_s"]
        detail = (
            f"{r[0]['rows_per_s']:.0f} rows/s vs raw ORT {at_top['rows_per_s']:.0f} rows/s at batch {top} (the largest "
            f"batch {top} one-row clients can form); gateway mean batch {_f(b.get('mean_batch_rows'), 1)} rows, "
            f"ORT busy {_pct(b.get('ort_busy_fraction'))} of the time"
        )
        out.append(
            _target(
                f"a'/{label}",
                f"compute-bound ({COMPUTE_MODEL}) {label}: gateway rows/s at C={top} / raw ORT rows/s at batch {top} "
                "[extra]",
                value,
                ">=",
                0.85,
                "x",
                detail,
                r,
            )
        )
    for label, goal in (("grpc-unary", 0.60), ("http", 0.60), ("grpc-stream", 0.60)):
        g, e = _peak(_find(runs, "gateway", OVERHEAD_MODEL, label)), _peak(_find(runs, "echo", OVERHEAD_MODEL, label))
        value = g["throughput_rps"] / e["throughput_rps"] if g and e else None
        detail = (
            f"peak {g['throughput_rps']:.0f} req/s (C={g['concurrency']}) vs echo {e['throughput_rps']:.0f} req/s "
            f"(C={e['concurrency']}, {e['bound']}-bound)"
            if g and e
            else ""
        )
        extra = "" if label != "grpc-stream" else " [extra]"
        out.append(
            _target(
                f"b/{label}",
                f"overhead-bound ({OVERHEAD_MODEL}) {label}: gateway peak req/s / bare echo peak req/s{extra}",
                value,
                ">=",
                goal,
                "x",
                detail,
                [x for x in (g, e) if x],
            )
        )
    for name in ort["models"]:
        b1 = next(b for b in ort["models"][name]["batches"] if b["batch_size"] == 1)
        raw_us = b1["latency_ms"]["p50"] * 1e3
        for label in ("grpc-unary", "grpc-stream", "http"):
            r = _find(runs, "gateway", name, label, 1)
            value = r[0]["latency_ms"]["p50"] * 1e3 - raw_us if r and r[0]["latency_ms"]["p50"] is not None else None
            detail = (
                f"gateway p50 {r[0]['latency_ms']['p50'] * 1e3:.0f} us - raw ORT b=1 p50 {raw_us:.0f} us" if r else ""
            )
            out.append(
                _target(
                    f"c/{name}/{label}",
                    f"one client ({name}) {label}: gateway p50 - raw ORT batch-1 p50",
                    value,
                    "<=",
                    250.0,
                    "us",
                    detail,
                    r,
                )
            )
    for label in ("grpc-unary", "grpc-stream", "http"):
        g, e = _p50_at(runs, OVERHEAD_MODEL, label, 1), _p50_at(runs, OVERHEAD_MODEL, label, 1, "echo")
        if g is None or e is None:
            continue
        out.append(
            _target(
                f"c'/{OVERHEAD_MODEL}/{label}",
                f"one client ({OVERHEAD_MODEL}) {label}: gateway p50 - bare echo p50 (client and transport cancel) "
                "[extra]",
                (g - e) * 1e3,
                "<=",
                250.0,
                "us",
                f"gateway p50 {g * 1e3:.0f} us - echo p50 {e * 1e3:.0f} us",
                _find(runs, "gateway", OVERHEAD_MODEL, label, 1) + _find(runs, "echo", OVERHEAD_MODEL, label, 1),
            )
        )
    streams = []
    for name in ort["models"]:
        u, s = _peak(_find(runs, "gateway", name, "grpc-unary")), _peak(_find(runs, "gateway", name, "grpc-stream"))
        if u and s:
            streams.append(
                {
                    "model": name,
                    "unary_peak_rps": u["throughput_rps"],
                    "stream_peak_rps": s["throughput_rps"],
                    "stream_over_unary": s["throughput_rps"] / u["throughput_rps"],
                    "unary_c1_p50_ms": _p50_at(runs, name, "grpc-unary", 1),
                    "stream_c1_p50_ms": _p50_at(runs, name, "grpc-stream", 1),
                }
            )
    return out, streams


def format_report(doc: dict) -> str:
    """The human-readable tables."""
    s: Settings = doc["_settings"]
    env = doc["environment"]
    lines = [f"== onnxgate benchmark ({doc['mode']}) {doc['started']} =="]
    lines.append(
        f"machine: {env['cpus_online']} CPUs ({env['cpu_model']}), python {env['python']}, onnxruntime "
        f"{env['versions']['onnxruntime']}, grpcio {env['versions']['grpcio']}, uvicorn {env['versions']['uvicorn']}"
    )
    git = env.get("git") or {}
    if git:
        lines.append(
            f"server code: git {git.get('head', '?')[:10]} + {len(git.get('server_changes', []))} uncommitted "
            "change(s) under server/"
        )
    ort_threads = next(iter(doc["ort"]["models"].values()))["settings"]["intra_op_num_threads"]
    if s.server_cpus:
        lines.append(
            f"pinning: gateway, echo servers and raw ORT on CPU {','.join(map(str, s.server_cpus))} "
            f"(ORT intra_op_num_threads={ort_threads}, as the gateway computes it for that affinity); "
            f"load generator on CPU {','.join(map(str, s.loadgen_cpus or []))} ({s.processes} process"
            f"{'es' if s.processes > 1 else ''}, uvloop)"
        )
    else:
        lines.append(
            f"pinning: none -- gateway, raw ORT (intra_op_num_threads={ort_threads}) and the load generator "
            f"({s.processes} processes) share all CPUs; ratios mix client and server cost"
        )
    others = [r["other_cpu_cores"] for r in doc["runs"] if r.get("other_cpu_cores") is not None]
    if others:
        lines.append(
            f"other load on the machine during runs (not gateway/echo, not load generator): mean "
            f"{sum(others) / len(others):.2f} cores, max {max(others):.2f}; before start "
            f"{_f(env['idle_machine_busy_cores_before'])} cores busy"
        )
    lines.append(f"runs: closed loop, 1 row per request, warm-up {s.warmup_s:g} s, measured {s.duration_s:g} s each")
    lines.append("")
    lines.append(f"raw ONNX Runtime, in process (CPU {','.join(map(str, s.server_cpus or [])) or 'any'})")
    head = f"{'model':8} {'MFLOP/row':>9} {'b=1 p50_us':>10} {'b=1 rows/s':>10} {'best batch':>10} {'best rows/s':>11}"
    lines += [head, "-" * len(head)]
    for name, m in doc["ort"]["models"].items():
        b1 = next(b for b in m["batches"] if b["batch_size"] == 1)
        lines.append(
            f"{name:8} {models.BY_NAME[name].flops_per_row / 1e6:>9.3f} {b1['latency_ms']['p50'] * 1e3:>10.1f} "
            f"{b1['rows_per_s']:>10.0f} {m['best']['batch_size']:>10} {m['best']['rows_per_s']:>11.0f}"
        )
    lines.append("  per batch size (rows/s | p50 ms): " + " ".join(f"b={b}" for b in s.batch_sizes))
    for name, m in doc["ort"]["models"].items():
        cells = " ".join(f"{b['rows_per_s']:.0f}|{b['latency_ms']['p50']:.3f}" for b in m["batches"])
        lines.append(f"  {name:8} {cells}")
    lines.append("")
    head = (
        f"{'server':7} {'model':6} {'transport':11} {'C':>3} {'req/s':>8} {'rows/s':>8} {'p50_ms':>8} {'p90_ms':>8} "
        f"{'p99_ms':>8} {'p99.9_ms':>8} {'err':>4} {'srv_cpu':>7} {'lg_cpu':>6} {'other':>6}{'bound':>6} "
        f"{'batch':>5} {'ort%':>4}"
    )
    lines += [head, "-" * len(head)]
    for r in doc["runs"]:
        lat = r["latency_ms"]
        b = r.get("batcher") or {}
        lines.append(
            f"{r['server']:7} {r['model']:6} {r['label']:11} {r['concurrency']:>3} {r['throughput_rps']:>8.1f} "
            f"{r['rows_per_s']:>8.1f} {_f(lat['p50'], 3):>8} {_f(lat['p90'], 3):>8} {_f(lat['p99'], 3):>8} "
            f"{_f(lat['p999'], 3):>8} {r['errors']:>4} {_f(r['server_cpu_cores']):>7} {_f(r['client_cpu_cores']):>6} "
            f"{_f(r['other_cpu_cores']) + ('!' if r.get('disturbed') else ' '):>6}{r['bound']:>6} "
            f"{_f(b.get('mean_batch_rows'), 1):>5} "
            f"{_pct(b.get('ort_busy_fraction')):>4}"
        )
    lines.append(
        "(srv_cpu / lg_cpu: cores used by the server / load generator in the window; other: rest of the machine; "
        "bound: who was at >= 90% of its CPUs; batch: mean rows per ORT run; ort%: share of time ONNX Runtime ran; "
        f"!: still disturbed (> {DISTURBED_CORES} cores of other load) after up to {s.retries} re-measurement(s))"
    )
    lines.append("")
    lines.append("unary vs stream (gateway, gRPC, peak req/s over the sweep)")
    for u in doc["unary_vs_stream"]:
        lines.append(
            f"  {u['model']:8} unary {u['unary_peak_rps']:8.1f}  stream {u['stream_peak_rps']:8.1f}  "
            f"stream/unary {u['stream_over_unary']:.2f}  C=1 p50: unary {_f(u['unary_c1_p50_ms'], 3)} ms, "
            f"stream {_f(u['stream_c1_p50_ms'], 3)} ms"
        )
    lines.append("")
    head = f"{'target':24} {'value':>9} {'goal':>10} {'status':>6}  detail"
    lines += ["targets (reported, not asserted)", head, "-" * 100]
    for t in doc["targets"]:
        value = "-" if t["value"] is None else (f"{t['value']:.3f}" if t["unit"] == "x" else f"{t['value']:.0f}us")
        goal = f"{t['op']} {t['target']:g}{'us' if t['unit'] == 'us' else ''}"
        lines.append(f"{t['id']:24} {value:>9} {goal:>10} {t['status']:>6}  {t['detail']}")
    lines.append("")
    for n in doc["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Throughput vs p99 latency, one panel per model, one line per server/transport."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(doc["ort"]["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5), squeeze=False)
    colors = {"grpc-unary": "tab:blue", "grpc-stream": "tab:green", "http": "tab:orange"}
    for ax, name in zip(axes[0], names, strict=True):
        xmax = 0.0
        for server, style in (("gateway", "-o"), ("echo", "--s")):
            for label, color in colors.items():
                rs = sorted(_find(doc["runs"], server, name, label), key=lambda r: r["concurrency"])
                rs = [r for r in rs if r["latency_ms"]["p99"] is not None]
                if not rs:
                    continue
                xs = [r["throughput_rps"] for r in rs]
                ys = [r["latency_ms"]["p99"] for r in rs]
                xmax = max(xmax, *xs)
                ax.plot(
                    xs, ys, style, color=color, label=f"{server} {label}", alpha=0.9 if server == "gateway" else 0.6
                )
                for r, x, y in zip(rs, xs, ys, strict=True):
                    ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        best = doc["ort"]["models"][name]["best"]["rows_per_s"]
        if best <= 3 * xmax:
            ax.axvline(best, color="gray", linestyle=":", label="raw ORT best batch (rows/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name} ({models.BY_NAME[name].kind}-bound), 1 row/request")
        ax.set_xlabel("throughput (req/s = rows/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    s: Settings = doc["_settings"]
    pin = f"server CPU {s.server_cpus}, load generator CPU {s.loadgen_cpus}" if s.server_cpus else "no pinning"
    fig.suptitle(f"onnxgate benchmark ({doc['mode']}, {pin}); labels = concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def replot(out: Path) -> int:
    """Redraw the PNG and the text report of an earlier run from its JSON."""
    doc = json.loads((out / "benchmark.json").read_text())
    st = doc["settings"]
    doc["_settings"] = Settings(
        mode=doc["mode"],
        levels=st["levels"],
        warmup_s=st["warmup_s"],
        duration_s=st["duration_s"],
        ort_seconds=st["ort_seconds_per_batch"],
        batch_sizes=[b["batch_size"] for b in next(iter(doc["ort"]["models"].values()))["batches"]],
        server_cpus=st["server_cpus"],
        loadgen_cpus=st["loadgen_cpus"],
        processes=st["loadgen_processes"],
        out=out,
        profile=False,
        profile_seconds=0.0,
        retries=st.get("retries", 0),
        retry_budget_s=0.0,
    )
    plot(doc, out / "benchmark.png")
    report = format_report(doc)
    (out / "benchmark.txt").write_text(report + "\n")
    print(report)
    return 0


def build_settings(args: argparse.Namespace) -> Settings:
    ncpu = len(os.sched_getaffinity(0))
    if args.no_pin or ncpu < 2:
        server_cpus = loadgen_cpus = None
    else:
        server_cpus, loadgen_cpus = _cpus(args.server_cpus), _cpus(args.loadgen_cpus)
    if args.quick:
        levels, warmup, duration, ort_s = [1, 8, 64], 0.5, 1.5, 0.3
    else:
        levels, warmup, duration, ort_s = [1, 2, 4, 8, 16, 32, 64], 1.0, 4.0, 1.0
    if args.levels:
        levels = [int(x) for x in args.levels.split(",")]
    return Settings(
        mode="quick" if args.quick else "full",
        levels=levels,
        warmup_s=args.warmup if args.warmup is not None else warmup,
        duration_s=args.duration if args.duration is not None else duration,
        ort_seconds=ort_s,
        batch_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        server_cpus=server_cpus,
        loadgen_cpus=loadgen_cpus,
        processes=args.processes or loadgen.default_processes(loadgen_cpus),
        out=Path(args.out),
        profile=args.profile,
        profile_seconds=args.profile_seconds,
        retries=args.retries if args.retries is not None else (1 if args.quick else 2),
        retry_budget_s=30.0 if args.quick else 150.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; exit code 0 unless something broke (MISSes do not fail the run)."""
    p = argparse.ArgumentParser(prog="python -m loadtests.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 concurrency levels, short runs (~2 minutes)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default loadtests/results)")
    p.add_argument("--server-cpus", default="0", help="CPUs for the gateway, echo servers and raw ORT (default 0)")
    p.add_argument("--loadgen-cpus", default="1", help="CPUs for the load generator (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--processes", type=int, help="load generator processes (default: one per load generator CPU)")
    p.add_argument("--levels", help="concurrency levels, comma list (default 1,2,4,...,64; quick 1,8,64)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run")
    p.add_argument("--duration", type=float, help="measured seconds per run")
    p.add_argument("--models", default=",".join(m.name for m in models.MODELS), help="models to run")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway under overhead-bound load")
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--replot", metavar="DIR", help="only redraw DIR/benchmark.png and .txt from DIR/benchmark.json")
    p.add_argument(
        "--retries",
        type=int,
        help=f"measure a run again when other processes used > {DISTURBED_CORES} cores (default 1 quick, 2 full; "
        "at most 30 s / 150 s of re-measurement in all)",
    )
    args = p.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    settings = build_settings(args)
    settings.out.mkdir(parents=True, exist_ok=True)
    chosen = [models.BY_NAME[n] for n in args.models.split(",")]
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.monotonic()
    env = environment(settings)
    with tempfile.TemporaryDirectory(prefix="onnxgate-bench-") as tmp:
        repo = models.build_repository(Path(tmp) / "repo", tuple(chosen))
        _log(f"models built in {repo}; raw ONNX Runtime ...")
        ort = run_ort(repo, settings, [m.name for m in chosen])
        runs: list[dict] = []
        profiles: dict[str, str] = {}
        _log("gateway ...")
        with procs.gateway(repo, settings.server_cpus) as gw:
            for model in chosen:
                runs += sweep("gateway", gw, model, settings)
            if settings.profile and OVERHEAD_MODEL in models.BY_NAME:
                profiles = profile_gateway(gw, models.BY_NAME[OVERHEAD_MODEL], settings)
        overhead = models.BY_NAME[OVERHEAD_MODEL]
        if overhead in chosen:
            _log("bare echo servers ...")
            with procs.echo_servers(overhead.name, overhead.out_dim, settings.server_cpus) as echo:
                runs += sweep("echo", echo, overhead, settings)
    notes = [
        "gateway p50 at C=1 includes the client's own time; the load generator's raw gRPC/HTTP client adds "
        "roughly 30-200 us per request (see lg_cpu).",
        "echo = bare grpc.aio server (generic handler, bytes in/out, canned reply of the gateway's size) and bare "
        "uvicorn+httptools ASGI app, one uvloop loop, same pinning as the gateway.",
        "runs marked bound=client measure the load generator, not the server: read their ratio as a lower bound.",
    ]
    doc: dict[str, Any] = {
        "benchmark": 1,
        "mode": settings.mode,
        "started": started,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "command": [sys.executable, "-m", "loadtests.benchmark", *(argv if argv is not None else sys.argv[1:])],
        "environment": env,
        "settings": {
            "levels": settings.levels,
            "warmup_s": settings.warmup_s,
            "duration_s": settings.duration_s,
            "server_cpus": settings.server_cpus,
            "loadgen_cpus": settings.loadgen_cpus,
            "loadgen_processes": settings.processes,
            "ort_seconds_per_batch": settings.ort_seconds,
            "retries": settings.retries,
        },
        "models": {m.name: {"widths": m.widths, "kind": m.kind, "flops_per_row": m.flops_per_row} for m in chosen},
        "ort": ort,
        "runs": runs,
        "notes": notes,
        "profiles": profiles,
    }
    doc["targets"], doc["unary_vs_stream"] = (
        targets(ort, runs, settings) if {OVERHEAD_MODEL, COMPUTE_MODEL} <= {m.name for m in chosen} else ([], [])
    )
    doc["_settings"] = settings
    report = format_report(doc)
    plot(doc, settings.out / "benchmark.png")
    del doc["_settings"]
    (settings.out / "benchmark.json").write_text(json.dumps(doc, indent=2, default=str))
    (settings.out / "benchmark.txt").write_text(report + "\n")
    print(report)
    print(
        f"\nwrote {settings.out / 'benchmark.json'}, {settings.out / 'benchmark.png'}, {settings.out / 'benchmark.txt'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
