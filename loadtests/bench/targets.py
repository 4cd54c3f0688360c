"""Benchmark: the targets (PASS/MISS) and unary-vs-stream comparison computed from the runs."""

from __future__ import annotations

from collections.abc import Sequence

from loadtests.bench.common import COMPUTE_MODEL, OVERHEAD_MODEL, Settings, _f, _pct


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
            idle_ms = b1.get("idle_gap_p50_ms")
            idle = f" (raw ORT b=1 after 1 ms idle: {idle_ms * 1e3:.0f} us)" if idle_ms is not None else ""
            detail = (
                f"gateway p50 {r[0]['latency_ms']['p50'] * 1e3:.0f} us - raw ORT b=1 p50 {raw_us:.0f} us{idle}"
                if r
                else ""
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
