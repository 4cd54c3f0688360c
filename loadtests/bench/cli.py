"""One-command benchmark: raw ONNX Runtime vs the gateway vs bare echo servers, on one machine.

    python -m loadtests.benchmark --quick          # ~3-4 minutes on 2 cores
    python -m loadtests.benchmark                  # full sweep, ~10-12 minutes
    python -m loadtests.benchmark --profile        # also py-spy the gateway under overhead-bound load

It builds the models (``gemm16``, ``mlp``, ``huge`` by default; ``loadtests.bench.models``) into a
temporary repository, measures raw ONNX Runtime in process at batch sizes 1..256 (``huge``: a few
sizes up to 64) with the gateway's session options (``loadtests.bench.ort``), starts the gateway
and sweeps closed-loop concurrency 1..64 with single-row requests over gRPC unary, gRPC stream and
HTTP (``huge``: fewer levels and transports, longer and repeated runs at the top level), then
open-loop runs of the overhead-bound model at 70% of its closed-loop peak, then the same closed
loop against bare grpc.aio / uvicorn echo servers (``loadtests.bench.echo_servers``) carrying the
overhead-bound model's payload. It prints the targets (``loadtests.bench.targets``: PASS/MISS,
reported, never asserted) and writes ``benchmark.json``, ``benchmark.txt`` and ``benchmark.png``
(throughput vs p99 latency) to ``--out``.

CPU split: on a machine with two or more CPUs the gateway, the echo servers and raw ONNX Runtime
all run pinned (``taskset``) to ``--server-cpus`` (default CPU 0) and the load generator to
``--loadgen-cpus`` (default CPU 1), so the servers and raw ONNX Runtime get the same compute and
the ratios compare like with like. Every run reports the CPU the server, the load generator and
the rest of the machine used in the measured window.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.bench import models, procs
from loadtests.bench.common import (
    COMPUTE_MODEL,
    DISTURBED_CORES,
    LABELS,
    OPEN_LOOP_FRACTION,
    OVERHEAD_MODEL,
    Plan,
    Settings,
    _log,
)
from loadtests.bench.report import format_report, plot
from loadtests.bench.runs import environment, profile_gateway, run_ort, sweep
from loadtests.bench.targets import batcher_summary, targets
from loadtests.loadgen.runner import cpu_list, default_processes

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"  # loadtests/results


def _cpus(text: str) -> list[int] | None:
    return None if text in ("", "none") else cpu_list(text)


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
        batch_sizes=st.get("batch_sizes")
        or [b["batch_size"] for b in next(iter(doc["ort"]["models"].values()))["batches"]],
        server_cpus=st["server_cpus"],
        loadgen_cpus=st["loadgen_cpus"],
        processes=st["loadgen_processes"],
        out=out,
        profile=False,
        profile_seconds=0.0,
        retries=st.get("retries", 0),
        retry_budget_s=0.0,
        plans={name: Plan(**plan) for name, plan in st.get("plans", {}).items()},
    )
    doc.setdefault("batcher", [])
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
    top = max(levels)
    # The compute-bound model: a batch of 64 rows takes a few tenths of a second on one core, so it
    # gets few batch sizes and levels, a longer window (and warm-up) and repeated top-level runs.
    if args.quick:
        compute = Plan([top], ["grpc-unary", "http"], 1.0, 2.5, 2, [1, 8, 32, 64], 2.0, 2)
    else:
        low = [x for x in levels if x in (1, 8) and x < top]
        compute = Plan([*low, top], list(LABELS), 2.0, 5.0, 3, [1, 8, 16, 32, 64], 3.0, 3)
    if args.warmup is not None:
        compute.warmup_s = args.warmup
    if args.duration is not None:
        compute.duration_s = args.duration
    return Settings(
        mode="quick" if args.quick else "full",
        levels=levels,
        warmup_s=args.warmup if args.warmup is not None else warmup,
        duration_s=args.duration if args.duration is not None else duration,
        ort_seconds=ort_s,
        batch_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        server_cpus=server_cpus,
        loadgen_cpus=loadgen_cpus,
        processes=args.processes or default_processes(loadgen_cpus),
        out=Path(args.out),
        profile=args.profile,
        profile_seconds=args.profile_seconds,
        retries=args.retries if args.retries is not None else (1 if args.quick else 2),
        retry_budget_s=30.0 if args.quick else 150.0,
        plans={COMPUTE_MODEL: compute},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; exit code 0 unless something broke (MISSes do not fail the run)."""
    p = argparse.ArgumentParser(prog="python -m loadtests.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 concurrency levels, short runs (~3-4 minutes)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default loadtests/results)")
    p.add_argument("--server-cpus", default="0", help="CPUs for the gateway, echo servers and raw ORT (default 0)")
    p.add_argument("--loadgen-cpus", default="1", help="CPUs for the load generator (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--processes", type=int, help="load generator processes (default: one per load generator CPU)")
    p.add_argument("--levels", help="concurrency levels, comma list (default 1,2,4,...,64; quick 1,8,64)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run")
    p.add_argument("--duration", type=float, help="measured seconds per run")
    p.add_argument(
        "--models",
        default=",".join(models.DEFAULT_MODELS),
        help=f"models to run, of {','.join(models.BY_NAME)} (default {','.join(models.DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also run the overhead-bound model at the top concurrency, unpinned, against the gateway with 1 and "
        "with N worker processes (default 2; 0 or 1 = skip)",
    )
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
        overhead = models.BY_NAME[OVERHEAD_MODEL]
        with procs.gateway(repo, settings.server_cpus) as gw:
            for model in chosen:
                # The overhead-bound model also gets open-loop runs at a share of its closed-loop peak.
                runs += sweep("gateway", gw, model, settings, OPEN_LOOP_FRACTION if model is overhead else 0.0)
            if settings.profile and overhead in chosen:
                profiles = profile_gateway(gw, overhead, settings)
        if overhead in chosen:
            _log("bare echo servers ...")
            with procs.echo_servers(overhead.name, overhead.out_dim, settings.server_cpus) as echo:
                runs += sweep("echo", echo, overhead, settings)
        if args.workers > 1 and overhead in chosen:
            # Several workers need several cores: nothing is pinned here, so client and server share them.
            # Only the overhead-bound model is loaded (each worker would load every model of the repository).
            _log(f"gateway with 1 and {args.workers} workers (unpinned) ...")
            small = models.build_repository(Path(tmp) / "repo-workers", (overhead,))
            loose = dataclasses.replace(settings, levels=[settings.top], server_cpus=None, loadgen_cpus=None)
            for n in (1, args.workers):
                with procs.gateway(small, None, extra=["--workers", str(n)]) as gw:
                    runs += sweep(f"gw-{n}w", gw, overhead, loose, instances=n)
    notes = [
        "gateway p50 at C=1 includes the client's own time; the load generator's raw gRPC/HTTP client adds "
        "roughly 30-200 us per request (see lg_cpu).",
        "echo = bare grpc.aio server (generic handler, bytes in/out, canned reply of the gateway's size) and bare "
        "uvicorn+httptools ASGI app, one uvloop loop, same pinning as the gateway.",
        "bound=client: the load generator was saturated, not the server. A client-bound gateway run understates "
        "the gateway (its ratio is a lower bound); a client-bound echo run understates the echo (the ratio is an "
        "upper bound). CPU per request (cpu_us) does not depend on who was saturated.",
        "cpu_us: server CPU-microseconds per request over the window (the server's process tree's CPU / requests); "
        "busy%: the share of time the model's instances executed (onnxgate_instance_busy_seconds_total).",
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
            "batch_sizes": settings.batch_sizes,
            "retries": settings.retries,
            "open_loop_fraction": OPEN_LOOP_FRACTION,
            "plans": {m.name: settings.plan(m.name).to_json() for m in chosen},
        },
        "models": {m.name: {"widths": m.widths, "kind": m.kind, "flops_per_row": m.flops_per_row} for m in chosen},
        "ort": ort,
        "runs": runs,
        "notes": notes,
        "profiles": profiles,
    }
    doc["targets"], doc["unary_vs_stream"] = targets(ort, runs, settings)
    doc["batcher"] = batcher_summary(runs)
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
