"""The drift report: per-feature statistics of a current window against a reference, as a JSON
summary (:func:`analyse`) and a self-contained HTML page (:func:`render_html`).

Both the ``onnxgate drift`` command (``drift_report.py``: a sample-log directory against
training data) and the gateway's live report (``GET /v2/drift/{model}/report``: a model's live
window, :meth:`LiveDrift.report <onnxgate.core.monitoring.drift_live.LiveDrift.report>`) build it
here. The page has one table row per feature and a reference/current histogram pair per feature
(drifted first, at most ``max_plots``), as inline PNGs; every name and text in it is escaped
(feature and model names come from users), it has no script, and its only style is
:data:`STYLE` (so a CSP can allow exactly that stylesheet by its hash, :func:`style_hash`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import time
from typing import Any

import numpy as np

from onnxgate.core.monitoring.drift_stats import (
    DriftDataError,
    FeatureDrift,
    FeatureTable,
    Thresholds,
    align,
    category_counts,
    clean,
    compare_feature,
)

SUMMARY_VERSION = 1
MAX_PLOTS = 50  # histogram pairs in a report by default (drifted first)
#: The report's one stylesheet (inline, in a <style> element: the page is one file).
STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:2px 8px;
border-bottom:1px solid #ddd;text-align:right}td:first-child{text-align:left}tr.drift{background:#fdd}
figure{display:inline-block;margin:4px}"""


def style_hash() -> str:
    """The CSP source allowing :data:`STYLE` inline: ``'sha256-...'``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode() + "'"


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def analyse(
    reference: FeatureTable, current: FeatureTable, thresholds: Thresholds, bins: int = 10
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The JSON summary, and each compared feature's (reference, current) values; raises
    ``DriftDataError`` when no feature could be compared."""
    ref, note = align(reference, current)
    features, skipped, pairs = [], [], {}
    for name, values in current.features.items():
        if name not in ref:
            skipped.append({"name": name, "reason": "not in the reference"})
            continue
        try:
            result: FeatureDrift = compare_feature(name, ref[name], values, bins=bins)
        except DriftDataError as exc:
            skipped.append({"name": name, "reason": str(exc)})
            continue
        pairs[name] = (ref[name], values)
        reasons = result.reasons(thresholds)
        features.append(
            {
                "name": name,
                "kind": current.kinds.get(name, "input"),
                "type": "categorical" if result.categorical else "numeric",
                "psi": _num(result.psi),
                "ks_statistic": _num(result.ks_statistic),
                "ks_pvalue": _num(result.ks_pvalue),
                "chi2_statistic": _num(result.chi2_statistic),
                "chi2_pvalue": _num(result.chi2_pvalue),
                "reference_count": result.reference_count,
                "current_count": result.current_count,
                "drifted": bool(reasons),
                "reasons": reasons,
            }
        )
    if not features:
        raise DriftDataError(
            "no feature could be compared: " + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        )
    summary = {
        "summary_version": SUMMARY_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": current.model,
        "thresholds": {"psi": thresholds.psi, "ks_pvalue": thresholds.ks_pvalue, "chi2_pvalue": thresholds.chi2_pvalue},
        "reference_rows": reference.rows,
        "current_rows": current.rows,
        "note": note,
        "drifted": [f["name"] for f in features if f["drifted"]],
        "features": features,
        "skipped": skipped,
    }
    return summary, pairs


def _plot(title: str, reference: np.ndarray, current: np.ndarray, categorical: bool) -> str:
    """One reference/current histogram pair as a base64 PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas (safe off the main thread)

    fig = Figure(figsize=(5.2, 2.6), dpi=80)
    ax = fig.subplots()
    ref, cur = clean(reference), clean(current)
    if categorical:
        cats, r, c = category_counts(ref, cur)
        x = np.arange(len(cats))
        ax.bar(x - 0.2, r / max(1, r.sum()), 0.4, label="reference")
        ax.bar(x + 0.2, c / max(1, c.sum()), 0.4, label="current")
        ax.set_xticks(x, [str(v)[:12] for v in cats], rotation=45 if len(cats) > 6 else 0, fontsize=7)
    else:
        ref, cur = ref.astype(np.float64), cur.astype(np.float64)
        lo, hi = np.percentile(np.concatenate([ref, cur]), [0.5, 99.5])
        edges = np.linspace(lo, hi, 31) if hi > lo else np.array([lo - 0.5, hi + 0.5])
        ax.hist(ref, bins=edges, density=True, alpha=0.55, label="reference")
        ax.hist(cur, bins=edges, density=True, alpha=0.55, label="current")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _tests(t: dict[str, float | None]) -> str:
    """The thresholds in use (a None test is not used)."""
    parts = [f"PSI &ge; {t['psi']}" if t["psi"] is not None else "",
             f"KS p &lt; {t['ks_pvalue']}" if t["ks_pvalue"] is not None else "",
             f"chi-square p &lt; {t['chi2_pvalue']}" if t["chi2_pvalue"] is not None else ""]
    return ", ".join(p for p in parts if p) or "none"


def render_html(summary: dict[str, Any], pairs: dict[str, tuple[np.ndarray, np.ndarray]], max_plots: int) -> str:
    """The self-contained HTML report: a table of every feature, then histogram pairs. ``summary``
    is :func:`analyse`'s with ``reference`` and ``current`` (what was compared, as text) added;
    ``current_unit`` (default "records") names what ``current_rows`` counts."""
    esc = html.escape
    rows = []
    for f in summary["features"]:
        cells = [f["name"], f["kind"], f["type"], f["psi"], f["ks_statistic"], f["ks_pvalue"], f["chi2_pvalue"]]
        text = "".join(f"<td>{esc('-' if v is None else str(v))}</td>" for v in cells)
        verdict = "drift: " + ", ".join(f["reasons"]) if f["drifted"] else "ok"
        rows.append(f'<tr class="{"drift" if f["drifted"] else "ok"}">{text}<td>{esc(verdict)}</td></tr>')
    ordered = sorted(summary["features"], key=lambda f: (not f["drifted"], -(f["psi"] or 0)))
    plots = []
    for f in ordered[:max_plots]:
        ref, cur = pairs[f["name"]]
        test = f"KS p {f['ks_pvalue']}" if f["type"] == "numeric" else f"chi2 p {f['chi2_pvalue']}"
        png = _plot(f"{f['name']}: PSI {f['psi']}, {test}", ref, cur, f["type"] == "categorical")
        plots.append(f'<figure><img alt="{esc(f["name"])}" src="data:image/png;base64,{png}"></figure>')
    skipped = "".join(f"<li>{esc(s['name'])}: {esc(s['reason'])}</li>" for s in summary["skipped"])
    unit = esc(summary.get("current_unit", "records"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift report: {esc(str(summary["model"]))}</title>
<style>{STYLE}</style></head><body>
<h1>Drift report: {esc(str(summary["model"]))}</h1>
<p>Reference {esc(summary["reference"])} ({summary["reference_rows"]} rows) against current
{esc(summary["current"])} ({summary["current_rows"]} {unit}), {esc(summary["generated"])}.
Thresholds: {_tests(summary["thresholds"])}.
{esc(summary["note"])}</p>
<p><b>{len(summary["drifted"])} of {len(summary["features"])} features drifted</b>{
        ": " + esc(", ".join(summary["drifted"])) if summary["drifted"] else ""
    }</p>
<table><tr><th>feature</th><th>kind</th><th>type</th><th>PSI</th><th>KS</th><th>KS p</th><th>chi2 p</th><th></th></tr>
{"".join(rows)}</table>
{f"<p>Not compared:</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Histograms (reference and current)</h2>
{"".join(plots)}
</body></html>
"""


def window_report(
    reference: FeatureTable,
    current: FeatureTable,
    thresholds: Thresholds,
    *,
    bins: int = 10,
    reference_label: str = "the reference",
    current_label: str = "the live window",
    max_plots: int = MAX_PLOTS,
) -> str:
    """The HTML report of a live window (``current``, its rows counted in ``current.rows``)
    against ``reference``; raises ``DriftDataError`` when no feature could be compared."""
    summary, pairs = analyse(reference, current, thresholds, bins)
    summary.update(reference=reference_label, current=current_label, current_unit="rows")
    return render_html(summary, pairs, max_plots)
