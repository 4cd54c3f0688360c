"""``python -m loadtests.deadline_benchmark [--quick ...]``: FIFO vs the deadline scheduler under overload.

The benchmark itself is ``loadtests.bench.deadline`` (runs), ``deadline_load`` (the open-loop
client) and ``deadline_report`` (summaries, targets, table, plot); loadtests/README.md explains it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtests.bench import deadline, models
from loadtests.bench.deadline_report import format_report, plot, targets
from loadtests.loadgen.runner import cpu_list

RESULTS = Path(__file__).resolve().parent / "results"
PNG = Path(__file__).resolve().parent.parent / "docs" / "deadline.png"
# Per model, full / quick: (warm-up, measured seconds) of an open-loop run, and of the capacity's closed
# loop. dlconv32 (~50-60 rows/s): 12 s is ~600-700 requests at 1x, 1800-2100 at 3x; dlconv (~430 rows/s): 15 s.
TIMES = {
    "dlconv32": {"full": ((3.0, 12.0), (2.0, 8.0)), "quick": ((2.0, 4.0), (1.5, 4.0))},
    "dlconv": {"full": ((3.0, 15.0), (2.0, 6.0)), "quick": ((1.5, 4.0), (1.0, 3.0))},
}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _cpus(text: str) -> list[int] | None:
    return None if text in ("", "none") else cpu_list(text)


def parse(argv: Sequence[str] | None = None) -> tuple[deadline.Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m loadtests.deadline_benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, no gRPC (~2-2.5 minutes instead of ~5-6)")
    p.add_argument("--model", choices=sorted(models.DEADLINE_MODELS), default=models.DEFAULT_DEADLINE_MODEL,
                   help="dlconv32 (default: ~15-18 ms a row, max_batch_size 16) or dlconv (~1.8 ms a row, 32)")
    p.add_argument("--loads", default="0.5,1,2,3", help="offered loads, x capacity (default 0.5,1,2,3)")
    p.add_argument("--warmup", type=float, help="seconds before each measured window (default 3, quick 2)")
    p.add_argument("--duration", type=float, help="measured seconds per open-loop run (default 12, quick 4; "
                   "dlconv: 15, 4)")
    p.add_argument("--grpc-loads", help="gRPC loads, x capacity (call deadline = deadline; default 1,3; quick none)")
    p.add_argument("--priority-load", type=float, default=2.0, help="load of the priority run (0 skips it)")
    p.add_argument("--priority-share", type=float, default=0.25, help="share of requests at priority 1")
    p.add_argument("--max-batch-size", type=int, help="default: the model's (dlconv32 16, dlconv 32)")
    p.add_argument("--layers", type=int, help="conv layers of the model (default: dlconv32 32, dlconv 12)")
    p.add_argument("--deadline-ms", type=float, help="fixed deadline (default: --deadline-factor x one full batch)")
    p.add_argument("--deadline-factor", type=float, default=4.0)
    p.add_argument("--timeout-factor", type=float, default=10.0, help="the HTTP client waits this x the deadline")
    p.add_argument("--schedulers", default="fifo,deadline")
    p.add_argument("--server-cpus", default="0", help="CPUs of the gateways and raw ORT ('none': no pinning)")
    p.add_argument("--loadgen-cpus", default="1", help="CPUs of this process, the load generator ('none')")
    p.add_argument("--no-pin", action="store_true", help="= --server-cpus none --loadgen-cpus none")
    p.add_argument("--connections", type=int, default=2000, help="HTTP connections opened per gateway")
    p.add_argument("--retries", type=int, default=1, help="re-measure a run disturbed by other processes (default 1)")
    p.add_argument("--quiet-wait", type=float, help="seconds in all to wait for a quiet machine (180, quick 60)")
    p.add_argument("--lock", default="/tmp/bench.lock", help="flock file held around each load run ('' = none)")
    p.add_argument("--gateway-tree", help="run the gateway from this checkout's server/ and client/")
    p.add_argument("--out", type=Path, default=RESULTS, help="NAME.json and NAME.txt go here (results/)")
    p.add_argument("--name", help="file names: deadline (default), deadline-quick with --quick; deadline-dlconv"
                   "[-quick] with --model dlconv")
    p.add_argument("--png", type=Path, help="the plot (default docs/deadline.png for the full run of the default "
                   "model, else OUT/NAME.png)")
    p.add_argument("--replot", action="store_true", help="redraw NAME.txt and the plot from OUT/NAME.json")
    a = p.parse_args(argv)
    quick = a.quick
    default_name = "deadline" + ("" if a.model == models.DEFAULT_DEADLINE_MODEL else f"-{a.model}")
    name = a.name or (default_name + ("-quick" if quick else ""))
    (warmup, duration), (cap_warmup, cap_duration) = TIMES[a.model]["quick" if quick else "full"]
    schedulers = [s for s in a.schedulers.split(",") if s]
    if "fifo" not in schedulers:
        p.error("--schedulers must include fifo (its capacity is the benchmark's reference)")
    settings = deadline.Settings(
        mode="quick" if quick else "full",
        loads=_floats(a.loads),
        warmup_s=a.warmup if a.warmup is not None else warmup,
        duration_s=a.duration if a.duration is not None else duration,
        capacity_warmup_s=cap_warmup,
        capacity_duration_s=cap_duration,
        grpc_loads=_floats(a.grpc_loads) if a.grpc_loads is not None else ([] if quick else [1.0, 3.0]),
        priority_load=a.priority_load,
        priority_share=a.priority_share,
        model=a.model,
        max_batch_size=a.max_batch_size or models.DEADLINE_MODELS[a.model].max_batch_size,
        layers=a.layers,
        deadline_ms=a.deadline_ms,
        deadline_factor=a.deadline_factor,
        timeout_factor=a.timeout_factor,
        schedulers=schedulers,
        server_cpus=None if a.no_pin else _cpus(a.server_cpus),
        loadgen_cpus=None if a.no_pin else _cpus(a.loadgen_cpus),
        connections=a.connections,
        retries=a.retries,
        retry_budget_s=30.0 if quick else 90.0,
        quiet_budget_s=a.quiet_wait if a.quiet_wait is not None else (60.0 if quick else 180.0),
        lock=a.lock,
        gateway_tree=a.gateway_tree,
        out=a.out,
        name=name,
        png=a.png or (PNG if name == "deadline" else a.out / f"{name}.png"),
    )
    return settings, a


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse(argv)
    if args.replot:
        doc = json.loads((settings.out / f"{settings.name}.json").read_text())
        doc["targets"] = targets(doc)
        text = format_report(doc)
        (settings.out / f"{settings.name}.txt").write_text(text, encoding="utf-8")
        print(text)
        note = plot(doc, settings.png)
        print(note or f"plot: {settings.png}", file=sys.stderr)
        return 0
    deadline.write(deadline.run(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
