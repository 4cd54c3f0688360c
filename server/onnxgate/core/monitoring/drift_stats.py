"""Feature tables and drift statistics, shared by the drift report and the live drift gauges.

**Features.** A tensor whose first dimension is the batch gives one feature per remaining
element: a ``[N, F]`` input ``x`` gives ``x[0]`` .. ``x[F-1]`` (higher ranks are flattened row
by row); a ``[N]`` tensor is the single feature ``x``. Models without a batch dimension are read
the same way (their first dimension taken as rows).

**Sources.** A sample-log directory (``read_records``: its complete JSONL and Parquet files,
oldest first) or file, of which the records with status "ok" of one model count (inputs and
outputs), or training data: Parquet or CSV (one column per feature, named like the features;
a list column holds a whole tensor) or NPZ (one array per tensor, named like the tensor). When
no reference column is named like a current feature, the reference columns are matched by
position to the current inputs (or inputs then outputs) if their numbers agree.

**Statistics.** Numeric features: PSI over ``bins`` reference-quantile bins and the two-sample
Kolmogorov-Smirnov test. Categorical features (text, booleans, and integers with at most
``max_categories`` distinct values): PSI over the categories and the chi-square test of the
2 x K contingency table. Proportions are floored at 1e-4 for PSI.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from onnxgate.core.monitoring.file_sinks import JSON_COLUMNS

_EPS = 1e-4


class DriftDataError(Exception):
    """The data cannot be compared: missing or unreadable files, no records, nothing in common."""


@dataclass(slots=True)
class FeatureTable:
    """1-D value arrays by feature name, with where each came from."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # "input" | "output" | "column"
    rows: int = 0  # records (sample logs) or rows (training data) read
    model: str | None = None


def feature_names(name: str, shape: Sequence[int]) -> list[str]:
    """The feature names a tensor of ``shape`` (first dimension = rows) gives."""
    if len(shape) <= 1:
        return [name]
    return [f"{name}[{i}]" for i in range(math.prod(shape[1:]))]


def as_rows(arr: np.ndarray) -> np.ndarray:
    """A tensor as a 2-D [rows, features] array (a view where possible)."""
    a = np.asarray(arr)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)


def tensor_features(name: str, arr: np.ndarray) -> dict[str, np.ndarray]:
    """The features of one tensor, by name."""
    rows = as_rows(arr)
    names = feature_names(name, np.shape(arr) if np.ndim(arr) else (1,))
    return {n: rows[:, i] for i, n in enumerate(names)}


# -- reading sample logs and training data ------------------------------------------------------


class LogReadError(Exception):
    """A sample-log file cannot be read."""


def log_files(directory: str | Path) -> list[Path]:
    """The complete files of a sample-log directory (no dot or part files), oldest first."""
    return sorted(
        p
        for p in Path(directory).iterdir()
        if not p.name.startswith(".") and p.suffix in (".jsonl", ".parquet") and p.is_file()
    )


def read_file(path: Path) -> list[dict]:
    """The records of one JSONL or Parquet sample-log file, as the JSONL holds them."""
    try:
        if path.suffix == ".jsonl":
            with path.open("rb") as f:
                return [orjson.loads(line) for line in f if line.strip()]
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        for row in rows:
            for column in JSON_COLUMNS:
                if row.get(column) is not None:
                    row[column] = orjson.loads(row[column])
    except (OSError, ValueError) as exc:  # orjson.JSONDecodeError and pyarrow's ArrowInvalid are ValueErrors
        raise LogReadError(f"{path}: {exc}") from None
    return rows


def read_records(directory: str | Path) -> Iterator[dict]:
    """Every record of a sample-log directory, file by file; raises LogReadError."""
    try:
        files = log_files(directory)
    except OSError as exc:
        raise LogReadError(f"{directory}: {exc.strerror or exc}") from None
    for path in files:
        yield from read_file(path)


def load_features(path: str | Path, model: str | None = None) -> FeatureTable:
    """Read a sample-log directory or file, or a Parquet/CSV/NPZ training set; raises DriftDataError."""
    p = Path(path)
    try:
        if p.is_dir():
            return features_from_records(read_records(p), model, str(p))
        if not p.is_file():
            raise DriftDataError(f"{p}: no such file or directory")
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            return features_from_records(read_file(p), model, str(p))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            table = FeatureTable()
            for name, arr in arrays.items():
                table.features.update(tensor_features(name, arr.astype(object) if arr.dtype.kind in "SU" else arr))
            table.rows = max((len(as_rows(a)) for a in arrays.values()), default=0)
            table.kinds = dict.fromkeys(table.features, "column")
            return _nonempty(table, p)
        if suffix in (".parquet", ".pq", ".csv"):
            return _nonempty(_from_arrow(p), p)
    except LogReadError as exc:
        raise DriftDataError(str(exc)) from None
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError or ValueError subclasses
        raise DriftDataError(f"{p}: cannot read: {exc}") from None
    raise DriftDataError(f"{p}: expected a sample-log directory, or a .jsonl, .parquet, .csv or .npz file")


def _nonempty(table: FeatureTable, path: Path) -> FeatureTable:
    if not table.features or not table.rows:
        raise DriftDataError(f"{path}: no data")
    return table


def _from_arrow(path: Path) -> FeatureTable:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".csv":
        data = pacsv.read_csv(path)
    else:
        data = pq.read_table(path)
        if (data.schema.metadata or {}).get(b"onnxgate.schema_version"):  # a sample-log file
            return features_from_records(read_file(path), None, str(path))
    table = FeatureTable(rows=data.num_rows)
    for name in data.column_names:
        column = data.column(name)
        if (
            pa.types.is_list(column.type)
            or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)
        ):
            table.features.update(tensor_features(name, np.array(column.to_pylist())))
        else:
            values = column.to_numpy(zero_copy_only=False)
            table.features[name] = values.astype(object) if values.dtype.kind in "SU" else values
    table.kinds = dict.fromkeys(table.features, "column")
    return table


def _values(values: object, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(values, dtype=object)
    if datatype == "BOOL":
        return np.array(values, dtype=bool)
    if datatype.startswith(("INT", "UINT")):
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            return np.array(values, dtype=np.float64)
    return np.array(values, dtype=np.float64)  # null (NaN in the log) becomes NaN again


def features_from_records(records: Iterable[dict], model: str | None, where: str = "") -> FeatureTable:
    """The features of the successful records of ``model`` (of the only model, when None)."""
    parts: dict[str, dict[tuple[str, str], list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    counts: Counter[str] = Counter()
    for r in records:
        name = r.get("model", "")
        if model is not None and name != model:
            continue
        counts[name] += 1
        if r.get("status") != "ok":
            continue
        for kind in ("inputs", "outputs"):
            for t in r.get(kind) or ():
                if t.get("values") is None:
                    continue
                try:
                    arr = _values(t["values"], t.get("datatype", "FP64"))
                except (ValueError, TypeError):  # ragged or mistyped values
                    continue
                parts[name][(kind[:-1], t["name"])].append(arr.reshape(1) if arr.ndim == 0 else arr)
    if model is None:
        if len(counts) > 1:
            raise DriftDataError(f"{where}: records of several models ({', '.join(sorted(counts))}); pick one")
        model = next(iter(counts), None)
    if model is None or not counts[model]:
        raise DriftDataError(f"{where}: no records for model {model!r}" if model else f"{where}: no records")
    table = FeatureTable(rows=counts[model], model=model)
    for (kind, name), arrays in parts[model].items():
        shapes = Counter(a.shape[1:] for a in arrays)
        common = shapes.most_common(1)[0][0]  # records of another shape are left out
        joined = np.concatenate([a for a in arrays if a.shape[1:] == common])
        for feature, values in tensor_features(name, joined).items():
            table.features[feature] = values
            table.kinds[feature] = kind
    if not table.features:
        raise DriftDataError(f"{where}: no successful records with values for model {model!r}")
    return table


def align(reference: FeatureTable, current: FeatureTable) -> tuple[dict[str, np.ndarray], str]:
    """Reference arrays keyed by current feature names, and a note when matched by position."""
    by_name = {n: v for n, v in reference.features.items() if n in current.features}
    if by_name:
        return by_name, ""
    inputs = [n for n, k in current.kinds.items() if k == "input"]
    ordered = inputs + [n for n, k in current.kinds.items() if k == "output"]
    columns = list(reference.features)
    for target in (inputs, ordered):
        if target and len(columns) == len(target):
            pairs = ", ".join(f"{c} -> {t}" for c, t in zip(columns, target, strict=True))
            return dict(zip(target, reference.features.values(), strict=True)), f"matched by position: {pairs}"
    raise DriftDataError(
        f"no reference column is named like a current feature ({', '.join(list(current.features)[:8])}"
        f"{', ...' if len(current.features) > 8 else ''}), and the reference has {len(columns)} columns "
        f"for {len(inputs)} input features"
    )


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a feature counts as drifted; a None test is not used."""

    psi: float | None = 0.2
    ks_pvalue: float | None = 0.01
    chi2_pvalue: float | None = 0.01


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """The comparison of one feature."""

    name: str
    categorical: bool
    psi: float
    reference_count: int
    current_count: int
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    chi2_statistic: float | None = None
    chi2_pvalue: float | None = None

    def reasons(self, t: Thresholds) -> list[str]:
        """The tests this feature fails under ``t`` (empty: no drift)."""
        out = []
        if t.psi is not None and self.psi >= t.psi:
            out.append("psi")
        if t.ks_pvalue is not None and self.ks_pvalue is not None and self.ks_pvalue < t.ks_pvalue:
            out.append("ks")
        if t.chi2_pvalue is not None and self.chi2_pvalue is not None and self.chi2_pvalue < t.chi2_pvalue:
            out.append("chi2")
        return out


def clean(values: np.ndarray) -> np.ndarray:
    """The values without NaN (numeric) or None (text)."""
    a = np.asarray(values)
    if a.dtype.kind == "f":
        return a[~np.isnan(a)]
    if a.dtype.kind == "O":
        return np.array([v for v in a.tolist() if v is not None], dtype=object)
    return a


def is_categorical(reference: np.ndarray, current: np.ndarray, max_categories: int = 20) -> bool:
    """Text and booleans; integers (or integral floats) with few distinct values."""
    kinds = {reference.dtype.kind, current.dtype.kind}
    if kinds & {"O", "U", "S", "b"}:
        return True
    both = np.concatenate([reference, current]) if len(current) else reference
    if "f" in kinds and not np.all(np.mod(both, 1) == 0):
        return False
    return len(np.unique(both)) <= max_categories


def psi(reference_share: np.ndarray, current_share: np.ndarray) -> float:
    """Population stability index of two vectors of bin shares."""
    r = np.clip(reference_share, _EPS, None)
    c = np.clip(current_share, _EPS, None)
    return float(np.sum((c - r) * np.log(c / r)))


def numeric_bins(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at reference quantiles (duplicates merged)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def category_counts(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The categories of both samples and the count of each in each."""
    if {reference.dtype.kind, current.dtype.kind} & {"O", "U", "S"}:
        reference, current = reference.astype(str), current.astype(str)
    cats = np.union1d(reference, current)
    r = np.bincount(np.searchsorted(cats, reference), minlength=len(cats))
    c = np.bincount(np.searchsorted(cats, current), minlength=len(cats))
    return cats, r, c


def compare_feature(
    name: str, reference: np.ndarray, current: np.ndarray, *, bins: int = 10, max_categories: int = 20
) -> FeatureDrift:
    """PSI and KS (numeric) or PSI and chi-square (categorical) of two samples of one feature."""
    from scipy import stats

    ref, cur = clean(reference), clean(current)
    if not len(ref) or not len(cur):
        raise DriftDataError(f"feature {name}: no values to compare")
    if is_categorical(ref, cur, max_categories):
        _, r, c = category_counts(ref, cur)
        value = psi(r / r.sum(), c / c.sum())
        table = np.vstack([r, c])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] < 2:
            chi2, p = 0.0, 1.0
        else:
            result = stats.chi2_contingency(table)
            chi2, p = float(result[0]), float(result[1])
        return FeatureDrift(name, True, value, len(ref), len(cur), chi2_statistic=chi2, chi2_pvalue=p)
    ref, cur = ref.astype(np.float64), cur.astype(np.float64)
    edges = numeric_bins(ref, bins)
    value = psi(bin_shares(ref, edges), bin_shares(cur, edges))
    ks = stats.ks_2samp(ref, cur)
    return FeatureDrift(
        name, False, value, len(ref), len(cur), ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue)
    )
