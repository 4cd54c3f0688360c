"""Benchmark: the text report and the throughput-vs-p99 plot."""

from __future__ import annotations

from pathlib import Path

from loadtests.bench import models
from loadtests.bench.common import DISTURBED_CORES, Settings, _f, _pct
from loadtests.bench.targets import _find


def _c(r: dict) -> str:
    """The concurrency of a closed-loop run, ``#2``... for a repeated run."""
    return f"{r['concurrency']}" + (f"#{r['repeat'] + 1}" if r.get("repeat") else "")


def _run_line(r: dict, load: str) -> str:
    lat = r["latency_ms"]
    b = r.get("batcher") or {}
    return (
        f"{r['server']:7} {r['model']:6} {r['label']:11} {load:>5} {r['throughput_rps']:>8.1f} "
        f"{r['rows_per_s']:>8.1f} {_f(lat['p50'], 3):>8} {_f(lat['p90'], 3):>8} {_f(lat['p99'], 3):>8} "
        f"{_f(lat['p999'], 3):>8} {r['errors']:>4} {_f(r['server_cpu_cores']):>7} "
        f"{_f(r.get('server_cpu_us_per_request'), 0):>6} {_f(r['client_cpu_cores']):>6} "
        f"{_f(r['other_cpu_cores']) + ('!' if r.get('disturbed') else ' '):>6}{r['bound']:>6} "
        f"{_f(b.get('mean_batch_rows'), 1):>5} {_pct(b.get('busy_share')):>5}"
    )


_RUN_HEAD = (
    f"{'server':7} {'model':6} {'transport':11} {'C':>5} {'req/s':>8} {'rows/s':>8} {'p50_ms':>8} {'p90_ms':>8} "
    f"{'p99_ms':>8} {'p99.9_ms':>8} {'err':>4} {'srv_cpu':>7} {'cpu_us':>6} {'lg_cpu':>6} {'other':>6}{'bound':>6} "
    f"{'batch':>5} {'busy%':>5}"
)


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
    for name in doc["ort"]["models"]:
        p = s.plan(name)
        if p != s.default_plan():
            lines.append(
                f"  {name}: C={','.join(map(str, p.levels))}, {', '.join(p.labels)}; warm-up {p.warmup_s:g} s, "
                f"measured {p.duration_s:g} s, top level run {p.repeats}x; raw ORT at batch "
                f"{','.join(map(str, p.ort_batch_sizes))}"
            )
    lines.append("")
    lines.append(f"raw ONNX Runtime, in process (CPU {','.join(map(str, s.server_cpus or [])) or 'any'})")
    head = (
        f"{'model':8} {'MFLOP/row':>9} {'b=1 p50_us':>10} {'idle p50_us':>11} {'b=1 rows/s':>10} {'best batch':>10} "
        f"{'best rows/s':>11}"
    )
    lines += [head, "-" * len(head)]
    for name, m in doc["ort"]["models"].items():
        b1 = next(b for b in m["batches"] if b["batch_size"] == 1)
        lines.append(
            f"{name:8} {models.BY_NAME[name].flops_per_row / 1e6:>9.3f} {b1['latency_ms']['p50'] * 1e3:>10.1f} "
            f"{_f((b1.get('idle_gap_p50_ms') or 0) * 1e3 or None, 1):>11} "
            f"{b1['rows_per_s']:>10.0f} {m['best']['batch_size']:>10} {m['best']['rows_per_s']:>11.0f}"
        )
    lines.append("  (idle p50: batch 1 with 1 ms of idleness before each run, as a server at low load sees it)")
    lines.append("  per batch size (b=rows: rows/s | p50 ms):")
    for name, m in doc["ort"]["models"].items():
        cells = " ".join(
            f"b={b['batch_size']}:{b['rows_per_s']:.0f}|{b['latency_ms']['p50']:.3f}" for b in m["batches"]
        )
        lines.append(f"  {name:8} {cells}")
    lines.append("")
    closed = [r for r in doc["runs"] if r.get("mode", "closed") == "closed"]
    lines += [_RUN_HEAD, "-" * len(_RUN_HEAD)]
    lines += [_run_line(r, _c(r)) for r in closed]
    lines.append(
        "(srv_cpu / lg_cpu: cores used by the server (its process tree) / load generator in the window; cpu_us: "
        "server CPU-us per request = srv_cpu / req/s; other: rest of the machine; bound: who was at >= 90% of its "
        "CPUs; batch: mean rows per execution; busy%: share of the window the model's instances executed; #2: a "
        f"repeated run; !: still disturbed (> {DISTURBED_CORES} cores of other load) after up to {s.retries} "
        "re-measurement(s))"
    )
    lines.append("")
    opened = [r for r in doc["runs"] if r.get("mode") == "open"]
    if opened:
        lines.append("open loop (arrivals at a fixed rate, latency from the intended send time; R = offered req/s)")
        lines += [_RUN_HEAD.replace("    C ", "    R "), "-" * len(_RUN_HEAD)]
        lines += [_run_line(r, f"{r['offered_rps']:.0f}") for r in opened]
        lines.append("")
    if doc.get("batcher"):
        lines.append("batcher (gateway, each model's highest closed-loop level, first run)")
        for b in doc["batcher"]:
            lines.append(
                f"  {b['model']:8} {b['label']:11} C={b['concurrency']:<3} mean batch {_f(b['mean_batch_rows'], 1):>5} "
                f"rows, instances busy {_pct(b['busy_share']):>4}, ORT {_pct(b['ort_busy_fraction']):>4} of the time, "
                f"{_f(b['mean_compute_ms'], 3)} ms per execution, queue wait {_f(b['mean_queue_wait_ms'], 3)} ms"
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
    worker_runs = [r for r in doc["runs"] if r["server"].startswith("gw-")]
    if worker_runs:
        level = worker_runs[0]["concurrency"]
        lines.append(f"1 vs N workers (gateway unpinned, sharing the CPUs with the load generator; C={level})")
        for label in sorted({r["label"] for r in worker_runs}):
            cells = [
                f"{r['server']} {r['throughput_rps']:9.1f} req/s {_f(r.get('server_cpu_us_per_request'), 0):>5} "
                f"CPU-us/req ({_f(r['server_cpu_cores'])} cores)"
                for r in worker_runs
                if r["label"] == label
            ]
            lines.append(f"  {label:11} " + "   ".join(cells))
        lines.append("")
    head = f"{'target':16} {'value':>9} {'goal':>10} {'status':>6}  detail"
    lines += ["targets (reported, not asserted)", head, "-" * 100]
    for t in doc["targets"]:
        value = "-" if t["value"] is None else (f"{t['value']:.3f}" if t["unit"] == "x" else f"{t['value']:.0f}us")
        goal = f"{t['op']} {t['target']:g}{'us' if t['unit'] == 'us' else ''}"
        lines.append(f"{t['id']:16} {value:>9} {goal:>10} {t['status']:>6}  {t['detail']}")
    if doc["targets"]:
        lines.append("")
        lines += [f"  {t['id']:14} {t['description']}" for t in doc["targets"]]
    lines.append("")
    for n in doc["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Throughput vs p99 latency, one panel per model, one line per server/transport (closed loop,
    labelled with the concurrency); x: repeated runs; stars: open-loop runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(doc["ort"]["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(max(8, 6 * len(names)), 5), squeeze=False)
    colors = {"grpc-unary": "tab:blue", "grpc-stream": "tab:green", "http": "tab:orange"}
    for ax, name in zip(axes[0], names, strict=True):
        xmax = 0.0
        for server, style in (("gateway", "-o"), ("echo", "--s")):
            for label, color in colors.items():
                found = [r for r in _find(doc["runs"], server, name, label) if r["latency_ms"]["p99"] is not None]
                rs = sorted((r for r in found if not r.get("repeat")), key=lambda r: r["concurrency"])
                if not rs:
                    continue
                again = [r for r in found if r.get("repeat")]  # repeated runs: points off the line
                if again:
                    ax.plot(
                        [r["throughput_rps"] for r in again],
                        [r["latency_ms"]["p99"] for r in again],
                        "x" if server == "gateway" else "+",
                        color=color,
                    )
                xs = [r["throughput_rps"] for r in rs]
                ys = [r["latency_ms"]["p99"] for r in rs]
                xmax = max(xmax, *xs)
                ax.plot(
                    xs, ys, style, color=color, label=f"{server} {label}", alpha=0.9 if server == "gateway" else 0.6
                )
                for r, x, y in zip(rs, xs, ys, strict=True):
                    ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
                opened = [r for r in _find(doc["runs"], server, name, label, mode="open") if r["latency_ms"]["p99"]]
                if opened:
                    ax.plot(
                        [r["throughput_rps"] for r in opened],
                        [r["latency_ms"]["p99"] for r in opened],
                        "*",
                        markersize=10,
                        color=color,
                        label=f"{server} {label} open loop",
                    )
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
    fig.suptitle(f"onnxgate benchmark ({doc['mode']}, {pin}); labels = concurrency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
