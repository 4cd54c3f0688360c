"""``onnxgate drift``: compare a sample-log window with a reference and report per-feature drift.

::

    onnxgate drift --reference REF --current PATH [--model M] [--out report.html] [--json]
                   [--psi-threshold 0.2] [--ks-pvalue 0.01] [--chi2-pvalue 0.01] [--bins 10]
                   [--max-plots 50]

REF is training data (Parquet, CSV or NPZ) or an earlier sample-log directory; PATH is a
sample-log directory (JSONL and Parquet files). Features, sources and statistics are described
in ``core/monitoring/drift_stats.py``; the report is built by ``core/monitoring/drift_html.py``, as
the gateway's live report is. Writes the HTML report (``--out``, one reference/current histogram
pair per feature) and its JSON summary beside it (same name, ``.json``); prints the summary
(``--json``: the JSON). Exit status: 0 no feature drifted, 1 some feature crossed a threshold,
2 usage error (bad paths, unreadable files, no records for the model, nothing to compare).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxgate.core.monitoring.drift_html import SUMMARY_VERSION, analyse, render_html
from onnxgate.core.monitoring.drift_stats import DriftDataError, Thresholds, load_features

__all__ = ["SUMMARY_VERSION", "add_arguments", "analyse", "main", "render_html", "run"]


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


if __name__ == "__main__":
    sys.exit(main())
