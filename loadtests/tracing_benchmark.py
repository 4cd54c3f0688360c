"""``python -m loadtests.tracing_benchmark [--quick]``: what tracing and the access log cost.

One gateway per setting, the same model (``gemm16``, one 16x16 Gemm: overhead-bound, so the
request path is all there is to measure), the same pinning (gateway on ``--server-cpus``, the
load generator on ``--loadgen-cpus``), closed loop at C=64, gRPC unary and HTTP:

* ``off``: no ``OTEL_*`` environment, no access log (the default);
* ``otel-1%``: OTLP/HTTP export to a local sink, ``parentbased_traceidratio`` at 0.01;
* ``otel-100%``: every request traced (for scale: what a sampled request costs);
* ``access-log``: the access log to a file, tracing off.

Settings are measured in rounds (off, 1%, 100%, access log; again), so drift of a noisy machine
falls on each alike; a setting's throughput is its median over the rounds. The target: tracing on
at 1% sampling keeps >= 95% of the throughput with tracing off, per transport. Results:
``loadtests/results/tracing.json`` and a table on stdout (README "Tracing" quotes it).
"""

from __future__ import annotations

import argparse
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


def measure(repo: Path, env: dict[str, str], extra: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """One gateway with ``env``: a closed-loop C=64 run per transport."""
    model = models.BY_NAME["gemm16"]
    server = procs.gateway(repo, args.server_cpus, extra)
    server.env.update(env)
    out: dict[str, dict] = {}
    with server:
        for transport in ("grpc", "http"):
            port = server.grpc_port if transport == "grpc" else server.http_port
            target = Target(f"{transport}://127.0.0.1:{port}", model.name,
                            inputs=[TensorSpec("x", "FP32", (model.in_dim,))], outputs=["y"])
            with LoadGenerator(target, 1, args.loadgen_cpus) as gen:
                run = gen.run(Phase(concurrency=64, duration_s=args.duration, warmup_s=args.warmup), [server.pid])
            out[transport] = {
                "rps": run["throughput_rps"],
                "p50_ms": run["latency_ms"]["p50"],
                "p99_ms": run["latency_ms"]["p99"],
                "server_cores": run.get("watched_cpu_cores"),
                "errors": sum(run.get("errors_by_kind", {}).values()),
            }
    return out


def summarize(rounds: list[dict[str, dict[str, dict]]]) -> dict:
    names = list(rounds[0])
    summary: dict = {"settings": {}, "targets": {}}
    for name in names:
        summary["settings"][name] = {
            t: {
                "rps_median": statistics.median(r[name][t]["rps"] for r in rounds),
                "rps_runs": [round(r[name][t]["rps"]) for r in rounds],
                "p99_ms_median": statistics.median(r[name][t]["p99_ms"] for r in rounds),
                "errors": sum(r[name][t]["errors"] for r in rounds),
            }
            for t in ("grpc", "http")
        }
    for t in ("grpc", "http"):
        off = summary["settings"]["off"][t]["rps_median"]
        for name in names[1:]:
            ratio = summary["settings"][name][t]["rps_median"] / off if off else 0.0
            summary["settings"][name][t]["ratio_to_off"] = round(ratio, 3)
        ratio = summary["settings"]["otel-1%"][t]["ratio_to_off"]
        summary["targets"][f"tracing_1pct_{t}"] = {
            "ratio": ratio, "goal": f">= {TARGET_RATIO}", "pass": ratio >= TARGET_RATIO,
        }
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'setting':<12} {'transport':<9} {'req/s (median)':>15} {'ratio to off':>13} {'p99 ms':>8}  runs"]
    for name, per in summary["settings"].items():
        for t, s in per.items():
            ratio = s.get("ratio_to_off", 1.0)
            lines.append(f"{name:<12} {t:<9} {s['rps_median']:>15.0f} {ratio:>13.3f} {s['p99_ms_median']:>8.2f}  "
                         f"{s['rps_runs']}")
    for key, tgt in summary["targets"].items():
        lines.append(f"{key}: {tgt['ratio']:.3f} (goal {tgt['goal']}): {'PASS' if tgt['pass'] else 'MISS'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 0.5 s + 2 s runs (default: 3 rounds, 1 s + 4 s)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--server-cpus", type=cpu_list, default=[0])
    p.add_argument("--loadgen-cpus", type=cpu_list, default=[1])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.warmup, args.duration = (0.5, 2.0) if args.quick else (1.0, 4.0)
    n = args.rounds or (2 if args.quick else 3)
    sink = Sink()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        repo = models.build_repository(scratch / "repo", (models.BY_NAME["gemm16"],))
        plan = settings(sink, scratch)
        rounds = []
        for i in range(n):
            rounds.append({name: measure(repo, env, extra, args) for name, (env, extra) in plan.items()})
            print(f"round {i + 1}/{n}: " + ", ".join(
                f"{name} {r['grpc']['rps']:.0f}/{r['http']['rps']:.0f}" for name, r in rounds[-1].items()),
                file=sys.stderr)
    summary = summarize(rounds)
    summary["otlp_exports"] = sink.exports
    summary["rounds"] = rounds
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
