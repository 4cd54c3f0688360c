"""``python -m loadtests.tracing_benchmark [--quick]``: what tracing and the access log cost.

One gateway per setting, the same model (``gemm16``, one 16x16 Gemm: overhead-bound, so the
request path is all there is to measure), the same pinning (gateway on ``--server-cpus``, the
load generator on ``--loadgen-cpus``), closed loop at C=64, gRPC unary and HTTP:

* ``off``: no ``OTEL_*`` environment, no access log (the default);
* ``otel-1%``: OTLP/HTTP export to a local sink, ``parentbased_traceidratio`` at 0.01;
* ``otel-100%``: every request traced (for scale: what a sampled request costs);
* ``access-log``: the access log to a file, tracing off.

All four gateways run at once, on the same CPUs, and are loaded one at a time in short runs: a
round runs every setting once per transport, in an order that rotates from round to round, so
the drift of a noisy machine falls on each alike and each setting's run is paired with an ``off``
run a few seconds away. A setting's ratio to ``off`` is the median over the rounds of the ratio
within a round (its spread is printed too); its throughput the median over the rounds. The
target: tracing on at 1% sampling keeps >= 95% of the throughput with tracing off, per transport.
Results: ``loadtests/results/tracing.json`` and a table on stdout (README "Tracing" quotes it).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from loadtests.bench import models, procs
from loadtests.loadgen.payload import Target, TensorSpec
from loadtests.loadgen.runner import LoadGenerator, Phase, cpu_list

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 0.95


class Sink:
    """An OTLP/HTTP endpoint that accepts every export and counts the bytes (spans are not decoded)."""

    def __init__(self) -> None:
        self.exports = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.exports += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def settings(sink: Sink, scratch: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Each setting's (environment, extra gateway flags)."""
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
    access = scratch / "access.yaml"
    access.write_text(f"access_log: {{path: {scratch / 'access.jsonl'}}}\n", encoding="utf-8")
    return {
        "off": ({}, []),
        "otel-1%": ({**otel, "OTEL_TRACES_SAMPLER_ARG": "0.01"}, []),
        "otel-100%": ({**otel, "OTEL_TRACES_SAMPLER_ARG": "1.0"}, []),
        "access-log": ({}, ["--config", str(access)]),
    }


def measure(repo: Path, plan: dict[str, tuple[dict[str, str], list[str]]], args: argparse.Namespace,
            rounds: int) -> list[dict[str, dict[str, dict]]]:
    """Every setting's gateway at once; per round, a closed-loop C=64 run of each setting on each
    transport, in rotating order."""
    model = models.BY_NAME["gemm16"]
    names = list(plan)
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, (env, extra) in plan.items():
            server = procs.gateway(repo, args.server_cpus, extra)
            server.env.update(env)
            servers[name] = stack.enter_context(server)
        gens = {}
        for name, server in servers.items():
            for transport in ("grpc", "http"):
                port = server.grpc_port if transport == "grpc" else server.http_port
                target = Target(f"{transport}://127.0.0.1:{port}", model.name,
                                inputs=[TensorSpec("x", "FP32", (model.in_dim,))], outputs=["y"])
                gens[name, transport] = stack.enter_context(LoadGenerator(target, 1, args.loadgen_cpus))
        out: list[dict[str, dict[str, dict]]] = []
        for i in range(rounds):
            result: dict[str, dict[str, dict]] = {name: {} for name in names}
            order = names[i % len(names):] + names[:i % len(names)]
            for transport in ("grpc", "http"):
                for name in order:
                    run = gens[name, transport].run(
                        Phase(concurrency=64, duration_s=args.duration, warmup_s=args.warmup), [servers[name].pid]
                    )
                    result[name][transport] = {
                        "rps": run["throughput_rps"],
                        "p50_ms": run["latency_ms"]["p50"],
                        "p99_ms": run["latency_ms"]["p99"],
                        "server_cores": run.get("watched_cpu_cores"),
                        "errors": sum(run.get("errors_by_kind", {}).values()),
                    }
            out.append(result)
            print(f"round {i + 1}/{rounds}: " + ", ".join(
                f"{name} {r['grpc']['rps']:.0f}/{r['http']['rps']:.0f}" for name, r in result.items()),
                file=sys.stderr)
        return out


def summarize(rounds: list[dict[str, dict[str, dict]]]) -> dict:
    names = list(rounds[0])
    summary: dict = {"settings": {}, "targets": {}}
    for name in names:
        summary["settings"][name] = {}
        for t in ("grpc", "http"):
            ratios = [r[name][t]["rps"] / r["off"][t]["rps"] for r in rounds if r["off"][t]["rps"]]
            summary["settings"][name][t] = {
                "rps_median": statistics.median(r[name][t]["rps"] for r in rounds),
                "rps_runs": [round(r[name][t]["rps"]) for r in rounds],
                "p99_ms_median": statistics.median(r[name][t]["p99_ms"] for r in rounds),
                "errors": sum(r[name][t]["errors"] for r in rounds),
                "ratio_to_off": round(statistics.median(ratios), 3) if ratios else 0.0,
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
            }
    for t in ("grpc", "http"):
        ratio = summary["settings"]["otel-1%"][t]["ratio_to_off"]
        summary["targets"][f"tracing_1pct_{t}"] = {
            "ratio": ratio, "goal": f">= {TARGET_RATIO}", "pass": ratio >= TARGET_RATIO,
        }
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'setting':<12} {'transport':<9} {'req/s (median)':>15} {'ratio to off':>13} {'range':>13} "
             f"{'p99 ms':>8}  runs"]
    for name, per in summary["settings"].items():
        for t, s in per.items():
            low, high = s["ratio_range"] or (0.0, 0.0)
            lines.append(f"{name:<12} {t:<9} {s['rps_median']:>15.0f} {s['ratio_to_off']:>13.3f} "
                         f"{low:>6.2f}-{high:<6.2f} {s['p99_ms_median']:>8.2f}  {s['rps_runs']}")
    for key, tgt in summary["targets"].items():
        lines.append(f"{key}: {tgt['ratio']:.3f} (goal {tgt['goal']}): {'PASS' if tgt['pass'] else 'MISS'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 rounds, 0.3 s + 1.5 s runs (default: 9, 0.5 s + 3 s)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--server-cpus", type=cpu_list, default=[0])
    p.add_argument("--loadgen-cpus", type=cpu_list, default=[1])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.warmup, args.duration = (0.3, 1.5) if args.quick else (0.5, 3.0)
    n = args.rounds or (5 if args.quick else 9)
    sink = Sink()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        repo = models.build_repository(scratch / "repo", (models.BY_NAME["gemm16"],))
        rounds = measure(repo, settings(sink, scratch), args, n)
    summary = summarize(rounds)
    summary["otlp_exports"] = sink.exports
    summary["rounds"] = rounds
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
