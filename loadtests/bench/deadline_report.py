"""Deadline benchmark: per-run summaries, the targets (PASS/MISS, reported, never asserted), the
text report and the goodput / late-share plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench.deadline_load import ERROR, LATE, OK, REFUSED, TIMEOUT, Record

P50_TOLERANCE = 0.10  # "p50 unchanged vs FIFO" at the lowest load: within this share of FIFO's p50,
P50_TOLERANCE_MS = 1.0  # or this many ms, whichever is more (a p50 of ~5 ms moves by ~1 ms run to run here)
LAG_MS = 2.0  # a run whose client send lag p99 is over this was limited by the client (marked ~)
GOALS = {"goodput": 0.90, "late": 0.01, "refusal_p99_ms": 5.0}


def _pct(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def _by_message(rec: Record, idx: list[int]) -> dict[str, dict]:
    groups: dict[str, list[float]] = {}
    for i in idx:
        if rec.kind[i] == REFUSED:
            groups.setdefault(rec.refusal_key[i], []).append(rec.latency_ms[i])
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return {key: {"count": len(v), "ms": _pct(v)} for key, v in ranked}


def summarize(rec: Record, duration_s: float, deadline_ms: float, capacity: float, priority: int | None = None) -> dict:
    """What one open-loop run's measured window got (``priority``: only that level's requests).

    ``goodput`` counts answers within the deadline; ``late_share`` is late answers over all answers,
    client timeouts (no answer within 10x the deadline) counted as late answers (gRPC: a late answer
    is the client's DEADLINE_EXCEEDED); ``refusal_share`` and ``timeout_share`` are over all requests
    sent. ``refusals`` splits the refusals by message (numbers masked): count and latency."""
    idx = [i for i, p in enumerate(rec.priority) if priority is None or p == priority]
    kinds = [rec.kind[i] for i in idx]
    lat = [rec.latency_ms[i] for i in idx]
    count = {k: kinds.count(k) for k in (OK, LATE, REFUSED, TIMEOUT, ERROR)}
    sent, answered = len(idx), count[OK] + count[LATE]
    waited = answered + count[TIMEOUT]  # answers, and requests the client stopped waiting for
    return {
        "sent": sent,
        "offered_rps": sent / duration_s,
        **count,
        "refused_deadline": sum(1 for i in idx if rec.kind[i] == REFUSED and rec.refusal_deadline[i]),
        "goodput_rps": count[OK] / duration_s,
        "goodput_share": count[OK] / duration_s / capacity if capacity else None,
        "late_share": (count[LATE] + count[TIMEOUT]) / waited if waited else None,
        "refusal_share": count[REFUSED] / sent if sent else None,
        "timeout_share": count[TIMEOUT] / sent if sent else None,
        "answered_ms": _pct([x for x, k in zip(lat, kinds, strict=True) if k in (OK, LATE)]),
        "refusal_ms": _pct([x for x, k in zip(lat, kinds, strict=True) if k == REFUSED]),
        "refusals": _by_message(rec, idx),
        "deadline_ms": deadline_ms,
    }


def summarize_record(rec: Record, duration_s: float, deadline_ms: float, capacity: float) -> dict:
    """The whole run's summary, per priority level when there are several, and the client's side."""
    out = summarize(rec, duration_s, deadline_ms, capacity)
    levels = sorted(set(rec.priority) - {0})
    if len(levels) > 1:
        out["levels"] = {str(p): summarize(rec, duration_s, deadline_ms, capacity, p) for p in levels}
    lag = _pct(rec.lag_ms)
    out["client"] = {
        "send_lag_ms": lag,
        "errors": dict(rec.errors),
        "refusals_with_retry_after": rec.retry_after,
        "connections_opened": rec.connects,
        "unanswered_after_60s": rec.unanswered,
    }
    return out


def _find(doc: dict, **match: Any) -> dict | None:
    for run in doc["runs"]:
        if all(run.get(k) == v for k, v in match.items()):
            return run
    return None


def _get(run: dict | None, *path: str) -> Any:
    value: Any = run
    for key in path:
        if value is None:
            return None
        value = value.get(key)
    return value


def targets(doc: dict) -> list[dict]:
    """The issue's targets for the deadline scheduler (HTTP), FIFO's value beside each."""
    loads = doc["settings"]["loads"]
    hi, lo = max(loads), min(loads)
    deadline = doc["deadline_ms"]

    def both(**match: Any) -> tuple[dict | None, dict | None]:
        return _find(doc, scheduler="deadline", **match), _find(doc, scheduler="fifo", **match)

    rows = []

    def add(tid: str, what: str, goal: str, value: Any, fifo: Any, ok: bool | None, fmt: str) -> None:
        shown = "-" if value is None else fmt.format(value)
        base = "-" if fifo is None else fmt.format(fifo)
        status = "n/a" if value is None or ok is None else ("PASS" if ok else "MISS")
        rows.append({"id": tid, "what": what, "goal": goal, "value": value, "fifo": fifo, "status": status,
                     "shown": shown, "fifo_shown": base})

    d_hi, f_hi = both(scenario="load", transport="http", load=hi)
    v = _get(d_hi, "summary", "goodput_share")
    add("d1", f"{hi:g}x load: goodput / capacity", f">= {GOALS['goodput']:.2f}", v,
        _get(f_hi, "summary", "goodput_share"), None if v is None else v >= GOALS["goodput"], "{:.3f}")
    v = _get(d_hi, "summary", "late_share")
    add("d2", f"{hi:g}x load: late answers / answers", f"<= {GOALS['late']:.0%}", v,
        _get(f_hi, "summary", "late_share"), None if v is None else v <= GOALS["late"], "{:.2%}")
    v = _get(d_hi, "summary", "refusal_ms", "p99")
    no_refusals = d_hi is not None and v is None
    add("d3", f"{hi:g}x load: refusal latency p99", f"<= {GOALS['refusal_p99_ms']:g} ms", v,
        _get(f_hi, "summary", "refusal_ms", "p99"), None if v is None else v <= GOALS["refusal_p99_ms"], "{:.2f} ms")
    if no_refusals:
        rows[-1]["status"], rows[-1]["shown"] = "n/a", "no refusals"
    d_lo, f_lo = both(scenario="load", transport="http", load=lo)
    v = _get(d_lo, "summary", "refused")
    add("d4", f"{lo:g}x load: requests refused", "0", v, _get(f_lo, "summary", "refused"),
        None if v is None else v == 0, "{:d}")
    p_d, p_f = _get(d_lo, "summary", "answered_ms", "p50"), _get(f_lo, "summary", "answered_ms", "p50")
    ratio = p_d / p_f if p_d is not None and p_f else None
    same = None if ratio is None else abs(p_d - p_f) <= max(P50_TOLERANCE * p_f, P50_TOLERANCE_MS)
    add("d5", f"{lo:g}x load: answered p50 / FIFO's", f"+-{P50_TOLERANCE:.0%} or {P50_TOLERANCE_MS:g} ms", ratio,
        None, same, "{:.3f}")
    if ratio is not None:
        rows[-1]["shown"] += f" ({p_d:.1f} vs {p_f:.1f} ms)"
    d_pr, f_pr = both(scenario="priority", transport="http")
    v = _get(d_pr, "summary", "levels", "1", "answered_ms", "p99")
    add("d6", "priority run: level 1 answered p99", f"<= deadline ({deadline:g} ms)", v,
        _get(f_pr, "summary", "levels", "1", "answered_ms", "p99"), None if v is None else v <= deadline, "{:.1f} ms")
    return rows


def _ms(v: dict | None, key: str) -> str:
    return "-" if v is None else f"{v[key]:.1f}"


def _share(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _run_line(label: str, run: dict, s: dict) -> str:
    m = run.get("metrics") or {}
    cpu = run.get("cpu") or {}
    rej = ",".join(f"{k}:{int(n)}" for k, n in sorted((m.get("rejected") or {}).items()) if n) or "-"
    misses = m.get("deadline_misses")
    return (
        f"{label:<24}{s['offered_rps']:>8.0f}{s['goodput_rps']:>8.0f}{_f(s['goodput_share'], 3):>7}"
        f"{_share(s['late_share']):>7}{_share(s['refusal_share']):>7}{s['refused_deadline']:>6}{s[TIMEOUT]:>5}"
        f"{s[ERROR]:>5}{_ms(s['refusal_ms'], 'p50'):>7}{_ms(s['refusal_ms'], 'p99'):>7}"
        f"{_ms(s['answered_ms'], 'p50'):>8}{_ms(s['answered_ms'], 'p99'):>8}"
        f"{_f(m.get('batch_rows')):>6}{_share(m.get('compute_share'), 0):>6}{_f(cpu.get('other_cores')):>6}"
        f"{_ms((s.get('client') or {}).get('send_lag_ms'), 'p99'):>6}{_loop_us(cpu, s):>6}"
        f"{_f(m.get('rows_per_s'), 0):>7}  {rej} misses:{'-' if misses is None else int(misses)}/late:{s[LATE]}"
        + (f" connects:{opened}" if (opened := _get(s, "client", "connections_opened")) else "")
    )


def _loop_us(cpu: dict, s: dict) -> str:
    """The gateway's event-loop CPU-us per request sent (its HTTP / gRPC handling, admission included)."""
    loop = cpu.get("gateway_loop_cores")
    return "-" if loop is None or not s["offered_rps"] else f"{loop / s['offered_rps'] * 1e6:.0f}"


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


HEADER = (
    f"{'run':<24}{'offer/s':>8}{'good/s':>8}{'good':>7}{'late':>7}{'refus':>7}{'r_dl':>6}{'tmo':>5}{'err':>5}"
    f"{'ref50':>7}{'ref99':>7}{'ans50':>8}{'ans99':>8}{'batch':>6}{'comp':>6}{'other':>6}{'lag99':>6}{'loop':>6}{'rows/s':>7}"
    "  gateway rejected, misses / client late"
)


def open_loop_ceiling(doc: dict) -> tuple[float, float, float] | None:
    """(load, rows/s, share of capacity) FIFO computed at the highest HTTP load: what this core
    delivers under open-loop arrivals, lateness aside."""
    runs = [r for r in doc["runs"] if r["scheduler"] == "fifo" and r["scenario"] == "load" and r["transport"] == "http"]
    if not runs:
        return None
    top = max(runs, key=lambda r: r["load"])
    rows = _get(top, "metrics", "rows_per_s")
    return None if rows is None else (top["load"], rows, rows / doc["capacity_rows_per_s"])


def front_end(doc: dict) -> str | None:
    """The gateway's front end at the highest HTTP load: its event loop's (main thread's) CPU, the
    HTTP handling and admission, as a share of the core it shares with ONNX Runtime; the whole
    gateway's beside it. (ORT's share of the window, ``comp``, is wall time: it includes the
    slices the event loop took from it.)"""
    loads = [r["load"] for r in doc["runs"] if r["scenario"] == "load" and r["transport"] == "http"]
    if not loads:
        return None
    parts = []
    for run in doc["runs"]:
        if run["scenario"] != "load" or run["transport"] != "http" or run["load"] != max(loads):
            continue
        cpu = run.get("cpu") or {}
        loop, gw = cpu.get("gateway_loop_cores"), cpu.get("gateway_cores")
        if loop is None:
            continue
        parts.append(f"{run['scheduler']} event loop {_share(loop, 1)} ({_loop_us(cpu, run['summary'])} us x "
                     f"{run['summary']['offered_rps']:.0f}/s) of the gateway's {_share(gw, 0)}")
    if not parts:
        return None
    return f"front end at {max(loads):g}x (share of the gateway's core): " + "; ".join(parts)


LEGEND = (
    "good: goodput (answers within the deadline) / capacity; late: late answers / answers, client timeouts",
    "  counted as late; refus: refusals / sent, r_dl: refusals that mention the deadline; tmo: client timeouts;",
    "  ref50/99, ans50/99: refusal / answer latency from the send, ms; batch: mean rows per execution; comp: ORT",
    "  share of the window; other: other processes' cores (!: over 0.35 after a re-measurement); lag99: the",
    f"  client's send lag p99, ms (~: over {LAG_MS:g} ms, the client fell behind); loop: the gateway's event-loop",
    "  CPU-us per request sent; rows/s: rows the gateway computed per second, on time or not; misses: the",
    "  gateway's onnxgate_deadline_misses_total, late: the late answers the client saw; connects: connections",
    "  the client had to open during the run",
)


def format_report(doc: dict) -> str:
    """The printed report: setup, capacity, every run (per level for the priority runs), targets."""
    st, model = doc["settings"], doc["model"]
    out = [f"deadline benchmark ({doc['mode']}), {doc['created']}"]
    out.append(f"gateway on CPU {st['server_cpus']}, load generator on CPU {st['loadgen_cpus']}; git {doc['git']}")
    if not doc["scheduler_flag"]:
        out.append("NOTE: this gateway has no --scheduler flag: it ran as it is (FIFO batches, the deadline header "
                   "and the priority parameter as it treats them); the deadline scheduler's rows and targets are n/a")
    out.append(f"model {model['name']}: {model['description']}, max_batch_size {model['max_batch_size']}, 1 instance")
    ort = doc["ort"]
    out.append("raw ORT p50 per batch: " + ", ".join(f"{b}: {ms:.2f} ms" for b, ms in ort["p50_ms"].items()))
    for name, cap in doc["capacity"].items():
        out.append(
            f"capacity ({name}, closed loop C={cap['concurrency']}): {cap['rows_per_s']:.0f} rows/s, mean batch "
            f"{_f(cap.get('batch_rows'))}, gateway {_f(cap.get('compute_ms_per_batch'), 2)} ms per execution in ORT, "
            f"busy {_share(cap.get('busy_share'), 0)}, p50 {cap['latency_ms']['p50']:.1f} ms, event loop "
            f"{_loop_us(cap.get('cpu') or {}, {'offered_rps': cap['rows_per_s']})} CPU-us per request"
        )
    out.append(
        f"capacity used: {doc['capacity_rows_per_s']:.0f} rows/s (fifo's); one full batch {doc['batch_ms']:.2f} ms "
        f"({doc['batch_ms_source']}); deadline {doc['deadline_ms']:g} ms; client timeout {doc['timeout_ms']:g} ms"
    )
    ceiling = open_loop_ceiling(doc)
    if ceiling:
        out.append(f"open-loop ceiling: at {ceiling[0]:g}x FIFO computed {ceiling[1]:.0f} rows/s = {ceiling[2]:.2f} of "
                   "the capacity (full batches; the requests' handling shares the core with ONNX Runtime)")
    front = front_end(doc)
    if front:
        out.append(front)
    out.append("")
    out.extend(LEGEND)
    out.append(HEADER)
    for run in doc["runs"]:
        s = run["summary"]
        label = f"{run['scheduler']} {run['transport']} {run['scenario'][:4]} {run['load']:g}x"
        label += "!" if run.get("disturbed") else ""
        label += "~" if (_get(s, "client", "send_lag_ms", "p99") or 0) > LAG_MS else ""
        out.append(_run_line(label, run, s))
        for level, ls in (s.get("levels") or {}).items():
            out.append(_run_line(f"  priority {level}", {}, ls))
    kinds = []
    for run in doc["runs"]:
        kinds += [(run, key, v) for key, v in list((run["summary"].get("refusals") or {}).items())[:3]]
    if kinds:
        out.append("")
        out.append("refusals by message (numbers masked as #): count, latency p50 / p99 ms")
        for run, key, v in kinds:
            label = f"{run['scheduler']} {run['transport']} {run['scenario'][:4]} {run['load']:g}x"
            text = key.split(": ", 1)[-1]
            out.append(f"  {label:<24}{v['count']:>7}{_ms(v['ms'], 'p50'):>8}{_ms(v['ms'], 'p99'):>8}  {text[:90]}")
    out.append("")
    out.append(f"{'id':<4}{'target':<44}{'goal':<26}{'deadline':<26}{'fifo':<14}status")
    for t in doc["targets"]:
        out.append(f"{t['id']:<4}{t['what']:<44}{t['goal']:<26}{t['shown']:<26}{t['fifo_shown']:<14}{t['status']}")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> str | None:
    """Goodput (share of capacity) and late share vs offered load, FIFO vs deadline; None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.2))
    loads = sorted(doc["settings"]["loads"])
    xs = np.linspace(0, max(loads) * 1.05, 50)
    ax1.plot(xs, np.minimum(xs, 1.0), "k:", label="ideal min(load, 1)")
    styles = {("fifo", "http"): "o-", ("deadline", "http"): "s-", ("fifo", "grpc"): "o--", ("deadline", "grpc"): "s--"}
    for (sched, transport), style in styles.items():
        runs = sorted((r for r in doc["runs"] if r["scenario"] == "load" and r["scheduler"] == sched
                       and r["transport"] == transport), key=lambda r: r["load"])
        if not runs:
            continue
        x = [r["summary"]["offered_rps"] / doc["capacity_rows_per_s"] for r in runs]
        ax1.plot(x, [r["summary"]["goodput_share"] for r in runs], style, label=f"{sched} ({transport})")
        if (sched, transport) == ("fifo", "http"):
            computed = [(r["metrics"].get("rows_per_s") or 0) / doc["capacity_rows_per_s"] for r in runs]
            ax1.plot(x, computed, ":", color="grey", label="fifo (http): rows computed, on time or not")
        ax2.plot(x, [100 * (r["summary"]["late_share"] or 0) for r in runs], style, label=f"{sched} ({transport})")
    ax1.set(xlabel="offered load (x capacity)", ylabel="goodput (share of capacity)", ylim=(0, 1.15),
            title=f"goodput: answers within {doc['deadline_ms']:g} ms")
    ax2.set(xlabel="offered load (x capacity)", ylabel="late answers (% of answers)", title="late answers")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"{doc['model']['name']}: capacity {doc['capacity_rows_per_s']:.0f} rows/s on one core "
                 f"({doc['mode']} run)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
