"""The load generator's command line: ``python -m loadtests.loadgen --url URL --model M [...]``.

What it measures, the load models and every field of the JSON it prints are described in the
package docstring (``loadtests/loadgen/__init__.py``).

Example::

    python -m loadtests.loadgen --url grpc://127.0.0.1:8001 --model mlp --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from loadtests.loadgen.payload import Target, TensorSpec
from loadtests.loadgen.report import format_table
from loadtests.loadgen.runner import LoadGenerator, Phase, cpu_list


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m loadtests.loadgen``."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.loadgen",
        description="Open Inference Protocol load generator (gRPC unary/stream, HTTP binary tensors).",
    )
    p.add_argument("--url", required=True, help="grpc://HOST:PORT or http://HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default="")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:DT:DIMS",
        help="input spec per row, e.g. x:FP32:16 (repeat per input); default: from the model metadata",
    )
    p.add_argument("--output", action="append", default=[], help="output to request (repeat); default: all")
    p.add_argument("--batch-size", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--no-batch-dim", action="store_true", help="the model has no batch dim: send shapes as given")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="closed loop: requests in flight; a comma list runs a sweep")
    load.add_argument("--rate", help="open loop: arrivals per second; a comma list runs a sweep")
    p.add_argument("--arrival", choices=["constant", "poisson"], default="constant", help="open-loop arrivals")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--requests", type=int, help="measure exactly this many requests instead of a duration")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, excluded (default 2)")
    p.add_argument("--processes", type=int, help="worker processes (default: one per usable CPU, at most 4)")
    p.add_argument("--cpus", help="pin the workers to these CPUs, e.g. 1 or 2-3")
    p.add_argument("--stream", action="store_true", help="gRPC: ModelStreamInfer instead of unary ModelInfer")
    p.add_argument("--http-client", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--connections", type=int, default=1, help="per process: gRPC channels or streams (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (0 = none)")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open loop: outstanding requests per process")
    p.add_argument("--validate", action="store_true", help="parse every reply and check its outputs")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop of the workers")
    p.add_argument(
        "--watch-pid", type=int, action="append", default=[], help="report this process's CPU use (e.g. the server)"
    )
    p.add_argument("--json", dest="json_path", help="also write the JSON document to this file")
    p.add_argument("--format", choices=["table", "json", "both"], default="both", help="what to print on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 when every request succeeded, 1 when any failed."""
    args = build_parser().parse_args(argv)
    target = Target(
        url=args.url,
        model=args.model,
        model_version=args.model_version,
        inputs=[TensorSpec.parse(s) for s in args.input],
        outputs=list(args.output),
        batch_size=args.batch_size,
        batched=not args.no_batch_dim,
        grpc_mode="stream" if args.stream else "unary",
        http_client=args.http_client,
        connections=args.connections,
        timeout_s=args.timeout,
        validate=args.validate,
        loop=args.loop,
    )
    target.transport  # noqa: B018 - validates the scheme early
    common = {
        "duration_s": None if args.requests else args.duration,
        "requests": args.requests,
        "warmup_s": args.warmup,
        "max_inflight": args.max_inflight,
    }
    if args.rate:
        phases = [Phase(rate=float(r), arrival=args.arrival, **common) for r in args.rate.split(",")]
    else:
        phases = [Phase(concurrency=int(c), **common) for c in (args.concurrency or "1").split(",")]
    cpus = cpu_list(args.cpus) if args.cpus else None
    with LoadGenerator(target, args.processes, cpus) as gen:
        runs = [gen.run(phase, args.watch_pid) for phase in phases]
    doc = {"loadgen": 1, "runs": runs}
    text = json.dumps(doc)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    if args.format in ("table", "both"):
        print(format_table(runs))
    if args.format in ("json", "both"):
        print(text)
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
