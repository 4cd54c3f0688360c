"""Benchmark: the targets (PASS/MISS), the batcher summary and unary-vs-stream, computed from the runs.

Every target compares numbers measured in the same run with the same core budget (gateway, echo
servers and raw ONNX Runtime pinned alike); they are reported, never asserted. "C" is the number
of closed-loop clients, ``top`` the highest level of the run (64 by default):

* t1 -- gRPC unary, overhead-bound model, C=top: gateway req/s >= 0.80 x the bare grpc.aio echo's;
* t2 -- no drop in throughput from C=8 to C=top (overhead-bound, gRPC unary): ratio >= 0.95;
* t3 -- a larger payload costs only its bytes: per-request cost of ``mlp`` minus that of ``gemm16``
  (gRPC unary, C=top), minus the difference of raw ORT compute per row, <= 30 us;
* t4 -- gRPC stream, C=top: gateway >= 0.80 x the bare grpc.aio stream echo;
* t5 -- HTTP, C=top: gateway >= 0.60 x the bare uvicorn app;
* t6 -- one client: gateway p50 <= echo p50 + 100 us, per transport;
* t7 -- compute-bound (``huge``), gRPC unary and HTTP, C=top: gateway rows/s >= 0.85 x raw ORT's
  best-batch rows/s on the same core, the worst of the repeated runs (their spread in the detail);
* t8 -- latency under load: open loop at 70% of the closed-loop peak, per transport: p99 <= 2 x p50,
  and the gateway not overloaded at that rate (CPU saturated, or more in flight than C=top);
* t9 -- server CPU per request <= 1.3 x the bare server's, per transport (C=top).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loadtests.bench.common import (
    COMPUTE_MODEL,
    LABELS,
    OPEN_LOOP_FRACTION,
    OVERHEAD_MODEL,
    PAYLOAD_MODEL,
    Settings,
    _f,
    _pct,
    cpu_us_per_request,
)


def _find(
    runs: list[dict], server: str, model: str, label: str, level: int | None = None, mode: str = "closed"
) -> list[dict]:
    """Runs of one server, model and transport (closed loop unless ``mode`` says otherwise)."""
    return [
        r
        for r in runs
        if r["server"] == server
        and r["model"] == model
        and r["label"] == label
        and r.get("mode", "closed") == mode
        and (level is None or r["concurrency"] == level)
    ]


def _one(runs: list[dict], server: str, model: str, label: str, level: int) -> dict | None:
    found = _find(runs, server, model, label, level)
    return found[0] if found else None


def _p50_at(runs: list[dict], model: str, label: str, level: int, server: str = "gateway") -> float | None:
    r = _one(runs, server, model, label, level)
    return r["latency_ms"]["p50"] if r else None


def _peak(runs: list[dict]) -> dict | None:
    return max(runs, key=lambda r: r["throughput_rps"]) if runs else None


def per_row_us(ort_model: dict, batch: float) -> float:
    """Raw ONNX Runtime time per row (us) at ``batch`` rows: p50 latency interpolated between the
    measured batch sizes (clamped to their range), divided by ``batch``."""
    rows = sorted(ort_model["batches"], key=lambda b: b["batch_size"])
    sizes = [b["batch_size"] for b in rows]
    batch = min(max(batch, sizes[0]), sizes[-1])
    latency_ms = float(np.interp(batch, sizes, [b["latency_ms"]["p50"] for b in rows]))
    return latency_ms * 1e3 / batch


def request_cost_us(run: dict) -> tuple[float | None, str]:
    """Per-request cost: server CPU-us per request over the window, or 1/throughput when the server
    was saturated and its CPU was not watched; with how it was obtained."""
    cpu = cpu_us_per_request(run)
    if cpu is not None:
        return cpu, "server CPU / requests"
    if "server" in run.get("bound", "") and run["throughput_rps"]:
        return 1e6 / run["throughput_rps"], "1/throughput (server saturated)"
    return None, "no server CPU and not saturated"


def _bound_note(echo: dict) -> str:
    if "client" in echo["bound"]:
        return " (echo client-bound: the echo server could do more, so the ratio overstates the gateway)"
    return f" (echo {echo['bound']}-bound)" if echo["bound"] != "-" else ""


def _target(
    tid: str,
    text: str,
    value: float | None,
    op: str,
    goal: float,
    unit: str,
    detail: str,
    used: Sequence[dict] = (),
    failed: str = "",
) -> dict:
    """One target; ``failed`` names a reason it is missed whatever the value says."""
    met = value is not None and (value >= goal if op == ">=" else value <= goal) and not failed
    status = "n/a" if value is None else ("PASS" if met else "MISS")
    if failed and value is not None:
        detail += f" [{failed}]"
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


def _throughput_ratio(
    tid: str, text: str, runs: list[dict], label: str, level: int, goal: float, model: str = OVERHEAD_MODEL
) -> dict:
    g, e = _one(runs, "gateway", model, label, level), _one(runs, "echo", model, label, level)
    if not g or not e:
        return _target(tid, text, None, ">=", goal, "x", f"needs gateway and echo runs at C={level}")
    detail = (
        f"gateway {g['throughput_rps']:.0f} req/s vs echo {e['throughput_rps']:.0f} req/s at C={level}{_bound_note(e)}"
    )
    return _target(tid, text, g["throughput_rps"] / e["throughput_rps"], ">=", goal, "x", detail, [g, e])


def targets(ort: dict, runs: list[dict], settings: Settings) -> tuple[list[dict], list[dict]]:
    """The targets t1..t9 of the models that ran, plus unary-vs-stream ratios."""
    out: list[dict] = []
    present = set(ort["models"])
    top, o = settings.top, OVERHEAD_MODEL
    if o in present:
        out.append(
            _throughput_ratio(
                "t1",
                f"gRPC unary, overhead-bound ({o}), C={top}: gateway req/s / bare grpc.aio echo req/s",
                runs,
                "grpc-unary",
                top,
                0.80,
            )
        )
        low, high = _one(runs, "gateway", o, "grpc-unary", 8), _one(runs, "gateway", o, "grpc-unary", top)
        text = (
            f"no drop from 8 to {top} clients ({o}, gRPC unary): gateway req/s at C={top} / at C=8 "
            "(goal 0.95: 5% allowance for run-to-run noise)"
        )
        if low and high and top != 8:
            detail = f"{high['throughput_rps']:.0f} req/s at C={top} vs {low['throughput_rps']:.0f} req/s at C=8"
            out.append(
                _target(
                    "t2", text, high["throughput_rps"] / low["throughput_rps"], ">=", 0.95, "x", detail, [low, high]
                )
            )
        else:
            out.append(_target("t2", text, None, ">=", 0.95, "x", f"needs gateway runs at C=8 and C={top} > 8"))
    if {o, PAYLOAD_MODEL} <= present:
        out.append(_payload_target(ort, runs, top))
    if o in present:
        out.append(
            _throughput_ratio(
                "t4",
                f"gRPC stream ({o}), C={top}: gateway req/s / bare grpc.aio stream echo req/s",
                runs,
                "grpc-stream",
                top,
                0.80,
            )
        )
        out.append(
            _throughput_ratio(
                "t5", f"HTTP ({o}), C={top}: gateway req/s / bare uvicorn app req/s", runs, "http", top, 0.60
            )
        )
        for label in LABELS:
            g, e = _one(runs, "gateway", o, label, 1), _one(runs, "echo", o, label, 1)
            text = f"one client ({o}) {label}: gateway p50 - bare echo p50 (client and transport cancel)"
            if not g or not e or g["latency_ms"]["p50"] is None or e["latency_ms"]["p50"] is None:
                out.append(_target(f"t6/{label}", text, None, "<=", 100.0, "us", "needs gateway and echo runs at C=1"))
                continue
            gp, ep = g["latency_ms"]["p50"] * 1e3, e["latency_ms"]["p50"] * 1e3
            detail = f"gateway p50 {gp:.0f} us - echo p50 {ep:.0f} us"
            out.append(_target(f"t6/{label}", text, gp - ep, "<=", 100.0, "us", detail, [g, e]))
    if COMPUTE_MODEL in present:
        out += _compute_targets(ort, runs, settings)
    if o in present:
        for label in LABELS:
            text = (
                f"latency under load ({o}) {label}: open loop at {OPEN_LOOP_FRACTION:.0%} of the closed-loop peak, "
                "p99 / p50"
            )
            found = _find(runs, "gateway", o, label, mode="open")
            if not found or not found[0]["latency_ms"]["p50"]:
                out.append(_target(f"t8/{label}", text, None, "<=", 2.0, "x", "needs an open-loop gateway run"))
                continue
            r = found[0]
            lat, lag = r["latency_ms"], r.get("send_lag_ms") or {}
            in_flight = r["offered_rps"] * lat["mean"] / 1e3  # Little's law: mean requests in the server
            detail = (
                f"offered {r['offered_rps']:.0f} req/s ({r['open_loop_fraction']:.0%} of {r['closed_peak_rps']:.0f}), "
                f"served {r['throughput_rps']:.0f} req/s, p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, "
                f"{r['errors']} errors, {in_flight:.0f} in flight on average; server {_f(r['server_cpu_cores'])} "
                f"cores, {_f(r.get('server_cpu_us_per_request'), 0)} CPU-us/request; client send lag mean "
                f"{_f(lag.get('mean'), 3)} ms"
            )
            # Below capacity the server has CPU to spare and few requests wait; saturated, the queue
            # grows through the window and p99/p50 says nothing about latency under load.
            why = [
                x
                for x, hit in (
                    ("server CPU saturated", "server" in r["bound"]),
                    (f"more in flight than C={top}", in_flight > top),
                )
                if hit
            ]
            failed = f"overloaded at this rate ({', '.join(why)}): the queue grew" if why else ""
            out.append(_target(f"t8/{label}", text, lat["p99"] / lat["p50"], "<=", 2.0, "x", detail, [r], failed))
        for label in LABELS:
            g, e = _one(runs, "gateway", o, label, top), _one(runs, "echo", o, label, top)
            text = f"server CPU per request ({o}) {label}, C={top}: gateway CPU-us/request / bare server's"
            gc, ec = (cpu_us_per_request(g) if g else None), (cpu_us_per_request(e) if e else None)
            if gc is None or ec is None:
                out.append(_target(f"t9/{label}", text, None, "<=", 1.3, "x", "needs watched server CPU at C=top"))
                continue
            detail = (
                f"gateway {gc:.0f} us/request ({g['server_cpu_cores']:.2f} cores at {g['throughput_rps']:.0f} req/s) "
                f"vs echo {ec:.0f} us/request ({e['server_cpu_cores']:.2f} cores at {e['throughput_rps']:.0f} req/s)"
            )
            out.append(_target(f"t9/{label}", text, gc / ec, "<=", 1.3, "x", detail, [g, e]))
    return out, unary_vs_stream(ort, runs)


def _payload_target(ort: dict, runs: list[dict], top: int) -> dict:
    """t3: (cost of mlp - cost of gemm16) - (raw ORT per row of mlp - of gemm16), gRPC unary at C=top."""
    small, large = OVERHEAD_MODEL, PAYLOAD_MODEL
    text = (
        f"a larger payload costs only its bytes, gRPC unary, C={top}: per-request cost {large} - {small}, "
        "minus their raw ORT compute per row at the gateway's mean batch"
    )
    gs, gl = _one(runs, "gateway", small, "grpc-unary", top), _one(runs, "gateway", large, "grpc-unary", top)
    if not gs or not gl:
        return _target("t3", text, None, "<=", 30.0, "us", f"needs gateway gRPC unary runs of both at C={top}")
    (cs, hs), (cl, hl) = request_cost_us(gs), request_cost_us(gl)
    if cs is None or cl is None:
        return _target("t3", text, None, "<=", 30.0, "us", f"per-request cost unknown: {hs}; {hl}")

    def batch(run: dict) -> tuple[float, str]:
        rows = (run.get("batcher") or {}).get("mean_batch_rows")
        return (rows, "the gateway's mean batch") if rows else (64.0, "batch 64: no batcher metrics")

    (bs, ws), (bl, wl) = batch(gs), batch(gl)
    os_, ol = per_row_us(ort["models"][small], bs), per_row_us(ort["models"][large], bl)
    how = hs if hs == hl else f"{large}: {hl}, {small}: {hs}"
    where = ws if ws == wl else f"{wl} / {ws}"
    detail = (
        f"cost per request ({how}): {large} {cl:.0f} us - {small} {cs:.0f} us = {cl - cs:.0f} us; raw ORT per row "
        f"({where}): {large} {ol:.0f} us at {bl:.1f} rows - {small} {os_:.1f} us at {bs:.1f} rows = {ol - os_:.0f} us"
    )
    return _target("t3", text, (cl - cs) - (ol - os_), "<=", 30.0, "us", detail, [gs, gl])


def _compute_targets(ort: dict, runs: list[dict], settings: Settings) -> list[dict]:
    """t7: the compute-bound model at the top level, every repeat against raw ORT's best batch."""
    out = []
    plan = settings.plan(COMPUTE_MODEL)
    top = max(plan.levels)
    best = ort["models"][COMPUTE_MODEL]["best"]
    for label in ("grpc-unary", "http"):
        found = _find(runs, "gateway", COMPUTE_MODEL, label, top)
        text = (
            f"compute-bound ({COMPUTE_MODEL}) {label}, C={top}: gateway rows/s / raw ORT best-batch rows/s "
            "(same core; the worst of the repeated runs)"
        )
        if not found:
            out.append(_target(f"t7/{label}", text, None, ">=", 0.85, "x", f"needs gateway runs at C={top}"))
            continue
        ratios = [r["rows_per_s"] / best["rows_per_s"] for r in found]
        b = found[0].get("batcher") or {}
        rates = ", ".join(f"{r['rows_per_s']:.0f}" for r in found)
        shares = ", ".join(f"{x:.3f}" for x in ratios)
        rows = b.get("mean_batch_rows")
        at_mean = ""
        if rows:
            raw_us = per_row_us(ort["models"][COMPUTE_MODEL], rows)
            at_mean = (
                f" (raw ORT at that batch: {1e6 / raw_us:.0f} rows/s, {raw_us * rows / 1e3:.0f} ms per run; gateway "
                f"{_f(b.get('mean_compute_ms'), 0)} ms per execution)"
            )
        detail = (
            f"{len(found)} run(s): {rates} rows/s = {shares} (spread {max(ratios) - min(ratios):.3f}) of raw ORT "
            f"{best['rows_per_s']:.0f} rows/s (batch {best['batch_size']}); gateway mean batch "
            f"{_f(rows, 1)} rows{at_mean}, instances busy {_pct(b.get('busy_share'))}"
        )
        out.append(_target(f"t7/{label}", text, min(ratios), ">=", 0.85, "x", detail, found))
    return out


def batcher_summary(runs: list[dict]) -> list[dict]:
    """The gateway's batcher at each model's highest closed-loop level: mean rows per execution and
    the instances' busy share (``onnxgate_instance_busy_seconds_total``), first run of each."""
    out = []
    seen: set[tuple[str, str]] = set()
    gateway = [r for r in runs if r["server"] == "gateway" and r.get("mode", "closed") == "closed"]
    for r in gateway:
        key = (r["model"], r["label"])
        if key in seen:
            continue
        top = max(x["concurrency"] for x in gateway if (x["model"], x["label"]) == key)
        first = next(x for x in gateway if (x["model"], x["label"]) == key and x["concurrency"] == top)
        seen.add(key)
        b = first.get("batcher") or {}
        out.append(
            {
                "model": r["model"],
                "label": r["label"],
                "concurrency": top,
                "throughput_rps": first["throughput_rps"],
                "mean_batch_rows": b.get("mean_batch_rows"),
                "busy_share": b.get("busy_share"),
                "ort_busy_fraction": b.get("ort_busy_fraction"),
                "mean_compute_ms": b.get("mean_compute_ms"),
                "mean_queue_wait_ms": b.get("mean_queue_wait_ms"),
                "executions": b.get("executions"),
            }
        )
    return out


def unary_vs_stream(ort: dict, runs: list[dict]) -> list[dict]:
    """Per model: peak gRPC unary vs peak gRPC stream throughput of the gateway, and their C=1 p50."""
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
    return streams
