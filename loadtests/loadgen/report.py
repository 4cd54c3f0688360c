"""Load generator: latency percentiles and the text table of runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def latency_summary(lat_ms: np.ndarray) -> dict[str, float | None]:
    """min, mean, p50, p90, p99, p99.9 and max of latencies in milliseconds."""
    if lat_ms.size == 0:
        return dict.fromkeys(("min", "mean", "p50", "p90", "p99", "p999", "max"))
    p50, p90, p99, p999 = np.percentile(lat_ms, [50, 90, 99, 99.9])
    return {
        "min": float(lat_ms.min()),
        "mean": float(lat_ms.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(lat_ms.max()),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(runs: Sequence[dict]) -> str:
    """A fixed-width table, one line per run, plus the errors by kind."""
    if not runs:
        return "(no runs)"
    first = runs[0]
    kind = first["transport"] + (f"/{first['grpc_mode']}" if first["grpc_mode"] else f"/{first['http_client']}")
    lines = [
        f"target {first['url']}  model {first['model']}{':' + first['model_version'] if first['model_version'] else ''}"
        f"  {kind}  batch {first['batch_size']}  processes {first['processes']}"
        f"{'  cpus ' + ','.join(map(str, first['cpus'])) if first['cpus'] else ''}",
    ]
    header = (
        f"{'load':>12} {'window_s':>8} {'ok':>8} {'err':>6} {'req/s':>9} {'rows/s':>9} "
        f"{'p50_ms':>8} {'p90_ms':>8} {'p99_ms':>8} {'p99.9_ms':>8} {'max_ms':>8} {'lag_ms':>7} {'cli_cpu':>7} "
        f"{'srv_cpu':>7} {'busy':>5}"
    )
    lines += [header, "-" * len(header)]
    for r in runs:
        load = f"C={r['concurrency']}" if r["mode"] == "closed" else f"R={r['rate']:g}/s"
        lat = r["latency_ms"]
        lines.append(
            f"{load:>12} {r['elapsed_s']:>8.2f} {r['successes']:>8} {r['errors']:>6} {r['throughput_rps']:>9.1f} "
            f"{r['rows_per_s']:>9.1f} {_fmt(lat['p50'], 3):>8} {_fmt(lat['p90'], 3):>8} {_fmt(lat['p99'], 3):>8} "
            f"{_fmt(lat['p999'], 3):>8} {_fmt(lat['max'], 3):>8} {_fmt(r['send_lag_ms']['max'], 2):>7} "
            f"{_fmt(r['client_cpu_cores'], 2):>7} {_fmt(_watched(r), 2):>7} {_fmt(r['machine_busy_cores'], 2):>5}"
        )
    errs = [(r, k, v) for r in runs for k, v in r["errors_by_kind"].items()]
    if errs:
        lines.append("errors:")
        for r, k, v in errs:
            load = f"C={r['concurrency']}" if r["mode"] == "closed" else f"R={r['rate']:g}/s"
            lines.append(f"  {load}: {k} x{v}")
    lines.append(
        "(lag_ms: open loop, worst delay of a send behind its intended time; cli_cpu: cores used by the load"
        " generator; srv_cpu: by the --watch-pid processes; busy: by the whole machine)"
    )
    return "\n".join(lines)


def _watched(run: dict) -> float | None:
    values = [v for v in run.get("watched_cpu_cores", {}).values() if v is not None]
    return sum(values) if values else None
