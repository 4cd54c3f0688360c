"""``onnxgate drift``: compare a sample-log window with a reference and report per-feature drift.

::

    onnxgate drift --reference REF --current PATH [--model M] [--out report.html] [--json]
                   [--psi-threshold 0.2] [--ks-pvalue 0.01] [--chi2-pvalue 0.01] [--bins 10]
                   [--max-plots 50]

REF is training data (Parquet, CSV or NPZ) or an earlier sample-log directory; PATH is a
sample-log directory (JSONL and Parquet files). Features, sources and statistics are described
in ``core/monitoring/drift_stats.py``. Writes the HTML report (``--out``, one reference/current histogram
pair per feature) and its JSON summary beside it (same name, ``.json``); prints the summary
(``--json``: the JSON). Exit status: 0 no feature drifted, 1 some feature crossed a threshold,
2 usage error (bad paths, unreadable files, no records for the model, nothing to compare).
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
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
    load_features,
)

SUMMARY_VERSION = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``drift`` subcommand's options (``cli.py`` registers the subcommand with these)."""
    p.add_argument("--reference", required=True, help="training data (.parquet, .csv, .npz) or a sample-log directory")
    p.add_argument("--current", required=True, help="sample-log directory (or file) to check")
    p.add_argument("--model", help="model to compare (needed when the logs hold several)")
    p.add_argument("--out", default="drift-report.html", help="HTML report path; the JSON summary goes beside it")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of a table")
    p.add_argument("--psi-threshold", type=float, default=0.2, help="PSI at or above this is drift (default 0.2)")
    p.add_argument("--ks-pvalue", type=float, default=0.01, help="KS p-value below this is drift (default 0.01)")
    p.add_argument("--chi2-pvalue", type=float, default=0.01, help="chi-square p-value below this is drift")
    p.add_argument("--bins", type=int, default=10, help="PSI bins (reference quantiles) for numeric features")
    p.add_argument("--max-plots", type=int, default=50, help="histogram pairs in the HTML (drifted first)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``onnxgate drift`` with ``argv``; the exit status."""
    parser = argparse.ArgumentParser(prog="onnxgate drift", description="per-feature drift report")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return 0 if exc.code == 0 else 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The subcommand's body, for parsed ``args``."""
    if args.bins < 2 or args.max_plots < 0 or args.psi_threshold <= 0:
        return _usage("--bins must be >= 2, --max-plots >= 0 and --psi-threshold > 0")
    missing = [m for m in ("scipy", "matplotlib", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        return _usage(f"needs {', '.join(missing)}: pip install 'onnxgate[drift]'")
    thresholds = Thresholds(args.psi_threshold, args.ks_pvalue, args.chi2_pvalue)
    try:
        current = load_features(args.current, args.model)
        reference = load_features(args.reference, args.model or current.model)
        summary, pairs = analyse(reference, current, thresholds, args.bins)
    except DriftDataError as exc:
        return _usage(str(exc))
    summary.update(reference=str(args.reference), current=str(args.current))
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        out.write_text(render_html(summary, pairs, args.max_plots), encoding="utf-8")
    except OSError as exc:
        return _usage(f"cannot write {out}: {exc.strerror or exc}")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_table(summary))
    return 1 if summary["drifted"] else 0


def _usage(message: str) -> int:
    print(f"onnxgate drift: {message}", file=sys.stderr)
    return 2


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def analyse(
    reference: FeatureTable, current: FeatureTable, thresholds: Thresholds, bins: int = 10
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The JSON summary, and each compared feature's (reference, current) values."""
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


def _table(summary: dict[str, Any]) -> str:
    lines = [f"{'feature':<24} {'type':<11} {'psi':>8} {'ks p':>10} {'chi2 p':>10}  drift"]
    for f in summary["features"]:
        cells = [f["psi"], f["ks_pvalue"], f["chi2_pvalue"]]
        psi, ks, chi2 = ("-" if v is None else f"{v:.4g}" for v in cells)
        mark = ",".join(f["reasons"]) if f["drifted"] else ""
        lines.append(f"{f['name']:<24} {f['type']:<11} {psi:>8} {ks:>10} {chi2:>10}  {mark}")
    n = len(summary["drifted"])
    lines.append(
        f"{n} of {len(summary['features'])} features drifted" + (f": {', '.join(summary['drifted'])}" if n else "")
    )
    return "\n".join(lines)


def _plot(title: str, reference: np.ndarray, current: np.ndarray, categorical: bool) -> str:
    """One reference/current histogram pair as a base64 PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

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


def render_html(summary: dict[str, Any], pairs: dict[str, tuple[np.ndarray, np.ndarray]], max_plots: int) -> str:
    """The self-contained HTML report: a table of every feature, then histogram pairs."""
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
    t = summary["thresholds"]
    skipped = "".join(f"<li>{esc(s['name'])}: {esc(s['reason'])}</li>" for s in summary["skipped"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift report: {esc(str(summary["model"]))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{padding:2px 8px;
border-bottom:1px solid #ddd;text-align:right}}td:first-child{{text-align:left}}tr.drift{{background:#fdd}}
figure{{display:inline-block;margin:4px}}</style></head><body>
<h1>Drift report: {esc(str(summary["model"]))}</h1>
<p>Reference {esc(summary["reference"])} ({summary["reference_rows"]} rows) against current
{esc(summary["current"])} ({summary["current_rows"]} records), {esc(summary["generated"])}.
Thresholds: PSI &ge; {t["psi"]}, KS p &lt; {t["ks_pvalue"]}, chi-square p &lt; {t["chi2_pvalue"]}.
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


if __name__ == "__main__":
    sys.exit(main())
