"""Deadline-scheduling benchmark: FIFO vs the deadline scheduler under open-loop overload.

    python -m loadtests.deadline_benchmark --quick     # ~2-2.5 minutes on a quiet machine
    python -m loadtests.deadline_benchmark             # ~5-6 minutes
    python -m loadtests.deadline_benchmark --model dlconv   # the first benchmark's lighter model

It builds a compute-bound model whose cost is linear in the batch (``models.DEADLINE_MODELS``:
``dlconv32``, ~15-18 ms a row, ``max_batch_size`` 16; or ``dlconv``, ~1.8 ms a row,
``max_batch_size`` 32; one instance, greedy dynamic batching) twice, once with
``priority_levels: 2``; times raw ONNX Runtime per batch size pinned like the gateway; starts one
gateway per scheduler (``--scheduler fifo`` and ``--scheduler deadline``, both pinned to CPU 0,
the load on CPU 1); measures the capacity (rows/s) with a saturating closed loop; sets the
deadline to 4x one full batch; then offers Poisson single-row requests at 0.5x..3x the capacity
(HTTP, the deadline in ``X-Request-Deadline-Ms``, the client waiting up to 10x the deadline), a
25 % / 75 % priority-1 / priority-2 mix at 2x, and (full run) gRPC with the call deadline, the
two schedulers' runs interleaved. Every load run holds ``/tmp/bench.lock``. Results: a table and
PASS/MISS targets on stdout, ``--out``/deadline.json and .txt, the plot docs/deadline.png (quick:
deadline-quick.* in ``--out``, so that a quick run leaves the committed full run alone). Nothing
is asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtests.bench import deadline_load as dl
from loadtests.bench import models, procs
from loadtests.bench.deadline_report import format_report, plot, summarize_record, targets
from loadtests.bench.deadline_window import Window
from loadtests.loadgen.runner import machine_busy_s

ROOT = Path(__file__).resolve().parents[2]
DISTURBED_CORES = 0.35  # other processes' CPU in a window above which the run is measured again, then flagged
QUIET_CORES = 0.15  # a run starts once other processes use at most this (or the waiting budget is spent)


@dataclass
class Settings:
    mode: str
    loads: list[float]
    warmup_s: float
    duration_s: float
    capacity_warmup_s: float
    capacity_duration_s: float
    grpc_loads: list[float]
    priority_load: float
    priority_share: float  # of requests at level 1
    model: str  # a key of models.DEADLINE_MODELS
    max_batch_size: int
    layers: int | None  # None: the model's own
    deadline_ms: float | None  # None: deadline_factor x one full batch
    deadline_factor: float
    timeout_factor: float
    schedulers: list[str]
    server_cpus: list[int] | None
    loadgen_cpus: list[int] | None
    connections: int  # HTTP connections opened per gateway before the runs
    retries: int  # re-measurements of a disturbed run
    retry_budget_s: float  # total time re-measurements may add
    quiet_budget_s: float  # total time to wait for other processes to go quiet before runs
    lock: str
    gateway_tree: str | None
    out: Path
    name: str  # of the files in ``out``: NAME.json, NAME.txt
    png: Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _gateway_env(settings: Settings) -> dict[str, str]:
    """PYTHONPATH for the gateway: this tree, or ``--gateway-tree``'s server/ and client/ first."""
    paths = [str(ROOT)]
    if settings.gateway_tree:
        tree = Path(settings.gateway_tree).resolve()
        paths = [str(tree / "server"), str(tree / "client"), *paths]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def scheduler_flag(settings: Settings) -> bool:
    """Whether ``onnxgate serve`` has ``--scheduler`` (the deadline scheduler has landed)."""
    env = {**os.environ, **_gateway_env(settings)}
    text = subprocess.run([sys.executable, "-m", "onnxgate", "serve", "--help"], capture_output=True, text=True,
                          env=env, timeout=60).stdout
    return "--scheduler" in text


class Lock:
    """``flock`` on the shared benchmark lock, taken around each load run (other runs may share the machine)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666) if path else None

    async def __aenter__(self) -> Lock:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log("  waiting for the benchmark lock ...")
                await asyncio.to_thread(fcntl.flock, self.fd, fcntl.LOCK_EX)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Blocking, for the synchronous steps (raw ORT)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def conv_model(settings: Settings) -> models.ConvBenchModel:
    model = models.DEADLINE_MODELS[settings.model].model
    return dataclasses.replace(model, layers=settings.layers) if settings.layers else model


def prio_name(model: models.ConvBenchModel) -> str:
    return f"{model.name}_prio"


def build(repo: Path, settings: Settings) -> models.ConvBenchModel:
    model = conv_model(settings)
    for name, levels in ((model.name, 0), (prio_name(model), 2)):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        models.write_conv_onnx(model, repo / name / "1" / "model.onnx")
        text = models.conv_config_text(model, name, settings.max_batch_size, levels)
        (repo / name / "config.pbtxt").write_text(text, encoding="utf-8")
    return model


def raw_ort(repo: Path, settings: Settings, model: str) -> dict:
    """p50 ms per batch size of ONNX Runtime in process, pinned like the gateway, its session options."""
    out = repo / "ort.json"
    sizes = sorted({1, 8, settings.max_batch_size // 2, settings.max_batch_size})
    cmd = [*procs.taskset_prefix(settings.server_cpus), sys.executable, "-m", "loadtests.bench.ort", "--repo",
           str(repo), "--models", model, "--batch-sizes", ",".join(map(str, sizes)), "--seconds", "1.5",
           "--min-runs", "5", "--json", str(out)]
    lock = Lock(settings.lock)
    lock.acquire()
    try:
        subprocess.run(cmd, check=True, env={**os.environ, **_gateway_env(settings)})
    finally:
        lock.release()
    batches = json.loads(out.read_text())["models"][model]["batches"]
    return {"p50_ms": {str(b["batch_size"]): b["latency_ms"]["p50"] for b in batches}}


def start_gateway(repo: Path, settings: Settings, scheduler: str | None) -> procs.ServerProcess:
    args = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1", "--model-repository", str(repo),
            "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--http-max-connections", "8192",
            "--http-keep-alive-timeout-s", "0"]
    if scheduler:
        args += ["--scheduler", scheduler]
    return procs.ServerProcess(args, settings.server_cpus, env=_gateway_env(settings)).start()


class Bench:
    """One benchmark run: the gateways, their clients, the capacity, the deadline and every run."""

    def __init__(self, settings: Settings, repo: Path, model: models.ConvBenchModel) -> None:
        self.st, self.repo, self.model = settings, repo, model
        self.lock = Lock(settings.lock)
        self.gateways: dict[str, procs.ServerProcess] = {}
        self.http: dict[str, dl.HttpLoad] = {}
        self.grpc: dict[str, dl.GrpcLoad] = {}
        self.runs: list[dict] = []
        self.capacity: dict[str, dict] = {}
        self.deadline_ms = self.timeout_ms = self.batch_ms = self.cap = 0.0
        self.batch_source = ""
        self.retry_left = settings.retry_budget_s
        self.quiet_left = settings.quiet_budget_s

    async def quiet(self) -> None:
        """Wait (within ``quiet_budget_s`` over the whole run) until everything but this process
        uses at most ``QUIET_CORES``, sampled over 0.5 s: other processes, and the gateways
        too (one still computing what an earlier run queued would disturb the next)."""
        while True:
            t0, b0, c0 = time.monotonic(), machine_busy_s(), time.process_time()
            await asyncio.sleep(0.5)
            wall, b1 = time.monotonic() - t0, machine_busy_s()
            if b0 is None or b1 is None:
                return
            other = (b1 - b0 - (time.process_time() - c0)) / wall
            if other <= QUIET_CORES or self.quiet_left <= 0:
                return
            _log(f"    other processes use {other:.2f} cores: waiting for a quieter machine "
                 f"({self.quiet_left:.0f} s of waiting left)")
            await asyncio.sleep(2.0)
            self.quiet_left -= time.monotonic() - t0

    async def measure_capacity(self, name: str) -> dict:
        st, gw = self.st, self.gateways[name]
        req = dl.encode(self.model.name, self.model.in_dim, "127.0.0.1", gw.http_port, None)
        concurrency = 3 * st.max_batch_size
        window = Window(gw, self.model.name)
        async with self.lock:
            await self.quiet()
            start = time.monotonic_ns()
            snaps = [asyncio.ensure_future(window.at(start + int(t * 1e9)))
                     for t in (st.capacity_warmup_s, st.capacity_warmup_s + st.capacity_duration_s)]
            result = await dl.closed_loop(self.http[name], req, concurrency, st.capacity_warmup_s,
                                          st.capacity_duration_s)
            await asyncio.gather(*snaps)
        metrics, cpu = window.result()
        result.update({k: metrics.get(k) for k in ("batch_rows", "compute_ms_per_batch", "busy_share")}, cpu=cpu)
        _log(f"  capacity {name}: {result['rows_per_s']:.0f} rows/s, batch {metrics.get('batch_rows')}")
        return result

    async def open_run(self, name: str, scenario: str, transport: str, load: float, duration_s: float) -> dict:
        st, gw = self.st, self.gateways[name]
        port = gw.http_port if transport == "http" else gw.grpc_port
        model = prio_name(self.model) if scenario == "priority" else self.model.name
        if scenario == "priority":
            reqs = [dl.encode(model, self.model.in_dim, "127.0.0.1", port, self.deadline_ms, p) for p in (1, 2)]
            weights = [st.priority_share, 1 - st.priority_share]
        else:
            reqs, weights = [dl.encode(model, self.model.in_dim, "127.0.0.1", port, self.deadline_ms)], [1.0]
        client: dl.HttpLoad | dl.GrpcLoad
        if transport == "http":
            client = self.http[name]
            await client.fill(st.connections)
        else:
            client = self.grpc.get(name) or dl.GrpcLoad("127.0.0.1", port)
            if name not in self.grpc:
                await client.open()
                self.grpc[name] = client
        rate = load * self.cap
        run: dict = {}
        for attempt in range(1 + st.retries):
            window = Window(gw, model)
            async with self.lock:
                await self.quiet()
                t0 = time.monotonic()
                start = time.monotonic_ns() + 20_000_000
                snaps = [asyncio.ensure_future(window.at(start + int(t * 1e9)))
                         for t in (st.warmup_s, st.warmup_s + duration_s)]
                rec = await dl.open_loop(client, reqs, weights, rate, st.warmup_s, duration_s,
                                         self.deadline_ms / 1e3, self.timeout_ms / 1e3, seed=int(load * 100) + attempt,
                                         start_ns=start)
                await asyncio.gather(*snaps)
            metrics, cpu = window.result()
            summary = summarize_record(rec, duration_s, self.deadline_ms, self.cap)
            other = cpu.get("other_cores") or 0.0
            if not run or other < (run["cpu"].get("other_cores") or 0.0):
                run = {"scheduler": name, "scenario": scenario, "transport": transport, "load": load, "rate": rate,
                       "duration_s": duration_s, "summary": summary, "metrics": metrics, "cpu": cpu,
                       "attempt": attempt + 1, "disturbed": other > DISTURBED_CORES}
            _log(f"  {name:<8} {transport} {scenario} {load:g}x: goodput {summary['goodput_share'] or 0:.2f}, "
                 f"late {summary['late_share'] or 0:.1%}, refused {summary['refusal_share'] or 0:.1%}, "
                 f"other {other:.2f} cores")
            await asyncio.sleep(0.5)
            elapsed = time.monotonic() - t0
            if attempt:
                self.retry_left -= elapsed
            if other <= DISTURBED_CORES or self.retry_left < elapsed:
                break
            _log(f"    other processes used {other:.2f} cores: measuring again")
        self.runs.append(run)
        return run

    async def run(self, ort: dict, flag: bool) -> None:
        st = self.st
        names = st.schedulers if flag else ["fifo"]
        for name in names:
            _log(f"starting the gateway ({'--scheduler ' + name if flag else 'no --scheduler flag'})")
            self.gateways[name] = gw = await asyncio.to_thread(start_gateway, self.repo, st, name if flag else None)
            self.http[name] = dl.HttpLoad("127.0.0.1", gw.http_port)
            await self.http[name].fill(st.connections)
            warm = dl.encode(self.model.name, self.model.in_dim, "127.0.0.1", gw.http_port, None)
            await dl.closed_loop(self.http[name], warm, st.max_batch_size, 0.5, 0.5)
        for name in names:
            self.capacity[name] = await self.measure_capacity(name)
        self.cap = self.capacity["fifo"]["rows_per_s"]
        self.batch_ms, self.batch_source = ort["p50_ms"][str(st.max_batch_size)], "raw ORT p50"
        self.deadline_ms = st.deadline_ms or round(st.deadline_factor * self.batch_ms)
        self.timeout_ms = st.timeout_factor * self.deadline_ms
        _log(f"capacity {self.cap:.0f} rows/s, deadline {self.deadline_ms:g} ms")
        for load in st.loads:
            for name in names:
                await self.open_run(name, "load", "http", load, st.duration_s)
        if st.priority_load:
            for name in names:
                await self.open_run(name, "priority", "http", st.priority_load, st.duration_s)
        for load in st.grpc_loads:
            for name in names:
                await self.open_run(name, "load", "grpc", load, st.duration_s)

    async def close(self) -> None:
        for client in [*self.http.values(), *self.grpc.values()]:
            await client.close()
        for gw in self.gateways.values():
            await asyncio.to_thread(gw.stop)


def _git(settings: Settings) -> str:
    """HEAD, and whether server/ has uncommitted changes (unless the gateway ran from ``--gateway-tree``)."""
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    dirty = "" if settings.gateway_tree else out("git", "status", "--porcelain", "server")
    return out("git", "rev-parse", "--short", "HEAD") + (" (server/ has uncommitted changes)" if dirty else "")


def _tree_commit(settings: Settings) -> str:
    """`` (commit X)`` from ``--gateway-tree``'s COMMIT file (written beside ``git archive``'s output)."""
    path = Path(settings.gateway_tree or "") / "COMMIT"
    return f" (commit {path.read_text().strip()})" if path.is_file() else ""


def run(settings: Settings) -> dict:
    """The whole benchmark; returns the JSON document (also written, with the plot)."""
    if settings.loadgen_cpus:
        os.sched_setaffinity(0, settings.loadgen_cpus)
    flag = scheduler_flag(settings)
    if not flag:
        _log("NOTE: onnxgate serve has no --scheduler flag: running the gateway as it is (FIFO) only")
    with tempfile.TemporaryDirectory(prefix="deadline-bench-") as tmp:
        repo = Path(tmp)
        model = build(repo, settings)
        _log("raw ONNX Runtime ...")
        ort = raw_ort(repo, settings, model.name)
        bench = Bench(settings, repo, model)

        async def go() -> None:
            try:
                await bench.run(ort, flag)
            finally:
                await bench.close()

        import uvloop

        uvloop.run(go())
    doc = {
        "benchmark": "deadline",
        "mode": settings.mode,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "git": _git(settings) + (f"; gateway from {settings.gateway_tree}{_tree_commit(settings)}"
                                 if settings.gateway_tree else ""),
        "cpu_model": _cpu_model(),
        "scheduler_flag": flag,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "model": {"name": model.name, "max_batch_size": settings.max_batch_size, "flops_per_row": model.flops_per_row,
                  "description": f"x[{model.in_dim}] -> Tile {model.channels}x{model.side}x{model.side} -> "
                                 f"{model.layers} x Conv3x3+ReLU -> GAP, {model.flops_per_row / 1e6:.0f} MFLOP/row"},
        "ort": ort,
        "capacity": bench.capacity,
        "capacity_rows_per_s": bench.cap,
        "batch_ms": bench.batch_ms,
        "batch_ms_source": bench.batch_source,
        "deadline_ms": bench.deadline_ms,
        "timeout_ms": bench.timeout_ms,
        "runs": bench.runs,
    }
    doc["targets"] = targets(doc)
    return doc


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def write(doc: dict, settings: Settings) -> None:
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / f"{settings.name}.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    text = format_report(doc)
    (settings.out / f"{settings.name}.txt").write_text(text, encoding="utf-8")
    print(text)
    note = plot(doc, settings.png)
    _log(note or f"plot: {settings.png}")
