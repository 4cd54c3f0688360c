"""The evidence of one rollout step and the gates judged on it, on one-sided confidence bounds.

**Evidence** counts paired answers (``comparisons``), argmax rows compared and agreeing, and
candidate requests and errors, and keeps three histograms with the same fixed bucket edges
everywhere: the per-request max abs diff, the primary's and the candidate's service time.
Buckets are log-spaced, 32 per octave (each about 2.2 % wide) from 1e-9 up to about 1e4, with
a bucket for exact zeros, one below 1e-9 and one above the top (a NaN counts there: an unknown
difference is judged the worst). So evidence is bounded in memory, sums across worker
processes (``merge``, associative and commutative) and saves as sparse JSON.

**Gates.** Each gate is pass, fail or pending. With confidence ``c`` (0.5 < c < 1):

- ``agreement`` (``agreement_min``): p = rows_agree / rows, a binomial proportion over argmax
  rows. Clopper-Pearson one-sided bounds, each at level c: the lower bound L solves
  P(X >= x | n, L) = 1 - c, the upper U solves P(X <= x | n, U) = 1 - c (x = 0: L = 0;
  x = n: U = 1, L = (1 - c)^(1/n)); found by bisection on the exact binomial CDF and rounded
  outwards. Pass when L >= agreement_min, fail when U < agreement_min, else pending; no rows:
  pending. (Rows of one request are taken as independent trials.)
- ``error_rate`` (``error_rate_max``): p = errors / candidate requests, the same bounds.
  Pass when U <= error_rate_max, fail when L > error_rate_max. With no errors U is
  1 - (1 - c)^(1/n): 0 errors in 3000 requests pass 0.001 at 95 %, 0 in 500 do not.
- ``abs_diff_p99`` (``abs_diff_p99_max``): the 0.99 quantile xi of the per-request max abs
  diff, by distribution-free order statistics. With B ~ Binomial(n, 0.99), the k-th smallest
  of n values X_(k) >= xi with probability >= P(B <= k - 1), and X_(j) <= xi with probability
  >= P(B >= j) (equality for continuous laws; ties only raise them). The upper bound is X_(k)
  for the smallest k with P(B <= k - 1) >= c, read as the upper edge of its bucket; the lower
  bound X_(j) for the largest j with P(B >= j) >= c, read as the lower edge of its bucket. No
  such rank (the upper needs n >= 299 at 95 %): no bound. Pass when upper <= abs_diff_p99_max,
  fail when lower > abs_diff_p99_max.
- ``latency_p99_ratio`` (``latency_p99_ratio_max``): the same quantile bounds on each side's
  service time, each at level (1 + c) / 2, so that by Bonferroni both hold together with
  probability >= c whatever the dependence between the paired latencies. The ratio's upper
  bound is candidate-upper / primary-lower, its lower bound candidate-lower / primary-upper.
  Pass when the upper <= latency_p99_ratio_max, fail when the lower > it.

Each verdict holds at level c for the evidence it is judged on; a rollout that judges again
as evidence grows looks many times, so its overall error rate is larger than 1 - c (the
dwell time and ``min_comparisons`` only hold passing back, not failing).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from onnxgate.core.traffic.rollout_config import Gates

_LO = 1e-9  # lower edge of bucket 0
_PER_OCTAVE = 32
_BUCKETS = math.ceil(math.log2(1e4 / _LO) * _PER_OCTAVE)  # regular buckets 0.._BUCKETS-1
_UNDER, _OVER = -1, _BUCKETS  # (0, 1e-9) and [top, inf)
SCHEME = f"log2/{_PER_OCTAVE} from {_LO:g}, {_BUCKETS} buckets"  # saved with evidence: same edges or refused
QUANTILE = 0.99


def _edge(i: int) -> float:
    """The lower edge of bucket ``i`` (the upper edge of ``i - 1``)."""
    if i <= _UNDER:
        return 0.0
    if i > _OVER:
        return math.inf
    return _LO * 2.0 ** (i / _PER_OCTAVE)


def _bucket(value: float) -> int | None:
    """The bucket of ``value``; None for the zero bucket (value <= 0)."""
    if value != value or value >= _edge(_OVER):  # NaN: as bad as can be
        return _OVER
    if value <= 0:
        return None
    if value < _LO:
        return _UNDER
    i = min(_BUCKETS - 1, int(math.log2(value / _LO) * _PER_OCTAVE))
    while i > 0 and value < _edge(i):  # math.log2 may be off by one at an edge
        i -= 1
    while value >= _edge(i + 1):
        i += 1
    return i


class Histogram:
    """Counts per fixed log-spaced bucket, sparse."""

    __slots__ = ("counts", "zero")

    def __init__(self) -> None:
        self.zero = 0
        self.counts: dict[int, int] = {}

    @property
    def n(self) -> int:
        return self.zero + sum(self.counts.values())

    def add(self, value: float) -> None:
        b = _bucket(float(value))
        if b is None:
            self.zero += 1
        else:
            self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: Histogram) -> None:
        self.zero += other.zero
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c

    def at_rank(self, k: int) -> tuple[float, float]:
        """The (lower, upper) edges of the bucket of the k-th smallest value (1-based)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"rank {k} outside 1..{self.n}")
        if k <= self.zero:
            return 0.0, 0.0
        seen = self.zero
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= k:
                return _edge(b), _edge(b + 1)
        raise AssertionError("unreachable")

    def quantile(self, q: float) -> float | None:
        """A point estimate of the q quantile: the geometric middle of its bucket."""
        if not self.n:
            return None
        lower, upper = self.at_rank(max(1, math.ceil(q * self.n)))
        if math.isinf(upper):  # beyond the top bucket
            return lower
        if lower == 0.0:  # the zero bucket, or the one below 1e-9
            return upper
        return math.sqrt(lower * upper)

    def quantile_bounds(self, q: float, confidence: float) -> tuple[float | None, float | None]:
        """One-sided (lower, upper) bounds on the q quantile, each at ``confidence``."""
        j, k = quantile_ranks(self.n, q, confidence)
        return (self.at_rank(j)[0] if j else None), (self.at_rank(k)[1] if k else None)

    def to_dict(self) -> dict[str, int]:
        out = {"zero": self.zero} if self.zero else {}
        out.update((str(b), c) for b, c in sorted(self.counts.items()))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Histogram:
        h = cls()
        for key, count in d.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"histogram count must be a non-negative integer, got {count!r}")
            if key == "zero":
                h.zero = count
                continue
            b = int(key)
            if not _UNDER <= b <= _OVER:
                raise ValueError(f"histogram bucket {key!r} outside {_UNDER}..{_OVER}")
            if count:
                h.counts[b] = count
        return h


_COUNTERS = ("comparisons", "rows", "rows_agree", "candidate_requests", "candidate_errors")
_HISTOGRAMS = ("abs_diff", "primary_latency_s", "candidate_latency_s")


class Evidence:
    """What one step has seen: mergeable across processes, bounded in memory."""

    __slots__ = (*_COUNTERS, *_HISTOGRAMS)

    def __init__(self) -> None:
        self.comparisons = 0  # paired answers compared
        self.rows = 0  # argmax rows compared
        self.rows_agree = 0
        self.candidate_requests = 0
        self.candidate_errors = 0
        self.abs_diff = Histogram()  # per request: max |primary - candidate| over its outputs
        self.primary_latency_s = Histogram()
        self.candidate_latency_s = Histogram()

    def add_comparison(
        self,
        rows: int,
        rows_agree: int,
        max_abs_diff: float | None,
        primary_latency_s: float | None,
        candidate_latency_s: float | None,
    ) -> None:
        """One pair of answers compared (None: that part had nothing to compare)."""
        if not 0 <= rows_agree <= rows:
            raise ValueError(f"need 0 <= rows_agree <= rows, got {rows_agree} of {rows}")
        self.comparisons += 1
        self.rows += rows
        self.rows_agree += rows_agree
        for hist, value in (
            (self.abs_diff, max_abs_diff),
            (self.primary_latency_s, primary_latency_s),
            (self.candidate_latency_s, candidate_latency_s),
        ):
            if value is not None:
                hist.add(value)

    def add_candidate(self, ok: bool) -> None:
        """One request the candidate answered (ok) or failed, mirrored or live."""
        self.candidate_requests += 1
        self.candidate_errors += not ok

    def merge(self, other: Evidence) -> None:
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in _HISTOGRAMS:
            getattr(self, name).merge(getattr(other, name))

    def copy(self) -> Evidence:
        out = Evidence()
        out.merge(self)
        return out

    def take(self) -> Evidence:
        """What was gathered so far, leaving this empty (a worker's delta to ship)."""
        out = self.copy()
        self.__init__()
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": SCHEME}
        out.update((name, getattr(self, name)) for name in _COUNTERS)
        out.update((name, getattr(self, name).to_dict()) for name in _HISTOGRAMS)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evidence:
        """The inverse of ``to_dict``; ValueError when ``d`` is not evidence of this bucket scheme."""
        if not isinstance(d, Mapping) or d.get("scheme") != SCHEME:
            raise ValueError(f"not evidence with buckets {SCHEME!r}")
        out = cls()
        for name in _COUNTERS:
            value = d.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"evidence {name} must be a non-negative integer, got {value!r}")
            setattr(out, name, value)
        if out.rows_agree > out.rows or out.candidate_errors > out.candidate_requests:
            raise ValueError("evidence counts disagree (rows_agree > rows or errors > requests)")
        for name in _HISTOGRAMS:
            value = d.get(name, {})
            if not isinstance(value, Mapping):
                raise ValueError(f"evidence {name} must be a mapping")
            setattr(out, name, Histogram.from_dict(value))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Evidence) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Evidence({', '.join(f'{n}={getattr(self, n)}' for n in _COUNTERS)})"


# ---- binomial maths (no scipy: the exact CDF, summed outwards from the mode) ----


def _log_pmf(i: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)


def _tail(start: int, n: int, p: float, step: int) -> float:
    """The sum of pmf(i) from ``start`` away from the mode (``step`` -1: down to 0, +1: up to n).

    Terms are scaled by pmf(start), so nothing underflows before the end. Away from the mode the
    ratio r of consecutive terms only falls (the pmf is log-concave), so what is left after a
    term t is at most t r / (1 - r): the sum stops once that is below 1e-17 of the total."""
    odds = p / (1.0 - p)
    total = term = 1.0
    i = start
    while (i > 0) if step < 0 else (i < n):
        ratio = i / ((n - i + 1) * odds) if step < 0 else (n - i) * odds / (i + 1)
        term *= ratio
        total += term
        i += step
        if ratio < 1.0 and term * ratio <= 1e-17 * total * (1.0 - ratio):
            break
    return math.exp(_log_pmf(start, n, p) + math.log(total))


_NORMAL_VARIANCE = 1e4  # from this variance on, the normal approximation (see binom_cdf)
_STD_NORMAL = statistics.NormalDist()


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p): exact (to about 1e-10) below a variance n p (1 - p) of
    1e4, the normal approximation with continuity correction from there on.

    Exact sums cost O(sqrt(variance)) terms and a bound's bisection 60 of them: 22 ms of a
    judgement at 2e6 comparisons, 0.5 s at 2e8, with the GIL held. The approximation's error is at
    most 0.48 / sqrt(variance) (Berry-Esseen), 5e-3 at 1e4, which moves a 95 % bound by a small
    fraction of its distance from the estimate; a judgement then costs 10 ms at most (at ~2e6)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    variance = n * p * (1.0 - p)
    if variance >= _NORMAL_VARIANCE:
        return _STD_NORMAL.cdf((k + 0.5 - n * p) / math.sqrt(variance))
    mode = min(n, math.floor((n + 1) * p))
    if k < mode:
        return min(1.0, _tail(k, n, p, -1))
    return max(0.0, 1.0 - _tail(k + 1, n, p, +1))


_BISECTIONS = 60


@functools.lru_cache(maxsize=4096)
def proportion_bounds(x: int, n: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson one-sided (lower, upper) bounds on p from x successes in n, each at
    ``confidence``; rounded outwards (the lower never above the exact bound, the upper never below)."""
    if not 0 <= x <= n or n < 1:
        raise ValueError(f"need 0 <= x <= n and n >= 1, got {x} of {n}")
    alpha = 1.0 - confidence
    if x == 0:
        lower = 0.0
    elif x == n:
        lower = math.exp(math.log(alpha) / n)
    else:  # the largest p with P(X >= x | p) <= alpha, i.e. P(X <= x - 1 | p) >= 1 - alpha
        lo, hi = 0.0, x / n  # cdf(x - 1) is 1 at lo, <= 1/2 at hi (the median of B(n, x/n) is x)
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if binom_cdf(x - 1, n, mid) >= confidence else (lo, mid)
        lower = lo
    if x == n:
        upper = 1.0
    elif x == 0:
        upper = -math.expm1(math.log(alpha) / n)
    else:  # the smallest p with P(X <= x | p) <= alpha
        lo, hi = x / n, 1.0  # cdf(x) is >= 1/2 at lo, 0 at hi
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if binom_cdf(x, n, mid) <= alpha else (mid, hi)
        upper = hi
    return lower, upper


@functools.lru_cache(maxsize=4096)
def quantile_ranks(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ascending ranks (j, k) of n values with P(X_(j) <= xi_q) >= c and
    P(X_(k) >= xi_q) >= c; None where n is too small for such a rank."""
    if n < 1:
        return None, None
    upper = None  # the smallest k with P(B <= k - 1) >= c, B ~ Binomial(n, q)
    if binom_cdf(n - 1, n, q) >= confidence:
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if binom_cdf(mid - 1, n, q) >= confidence else (mid + 1, hi)
        upper = lo
    lower = None  # the largest j with P(B >= j) >= c, i.e. P(B <= j - 1) <= 1 - c
    if binom_cdf(0, n, q) <= 1.0 - confidence:
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if binom_cdf(mid - 1, n, q) <= 1.0 - confidence else (lo, mid - 1)
        lower = lo
    return lower, upper


# ---- gates ----

_KEY = {
    "agreement": "agreement_min",
    "abs_diff_p99": "abs_diff_p99_max",
    "error_rate": "error_rate_max",
    "latency_p99_ratio": "latency_p99_ratio_max",
}
_UNIT = {"agreement": "rows", "abs_diff_p99": "comparisons", "error_rate": "requests", "latency_p99_ratio": "pairs"}


@dataclass(slots=True)
class GateResult:
    """One gate's verdict. ``bound`` is the bound on the side that must pass (the lower one for
    agreement, the upper one otherwise), ``fail_bound`` the other side's; None: none yet."""

    name: str  # agreement | abs_diff_p99 | error_rate | latency_p99_ratio
    threshold: float
    value: float | None  # the point estimate
    bound: float | None
    verdict: str  # pass | fail | pending
    fail_bound: float | None = None
    samples: int = 0  # rows, comparisons, requests or latency pairs judged
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: an infinite bound (beyond the top bucket, or over a zero) is None."""
        out = asdict(self)
        for key in ("value", "bound", "fail_bound"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out

    def describe(self) -> str:
        """A sentence naming the gate, its value, bound and threshold."""
        pct = f"{self.confidence * 100:g} %"
        minimum = self.name == "agreement"
        head = f"{self.name} {_fmt(self.value)} over {self.samples} {_UNIT.get(self.name, 'samples')}"
        key = f"{_KEY.get(self.name, self.name)} {_fmt(self.threshold)}"
        pass_side, fail_side = ("lower", "upper") if minimum else ("upper", "lower")
        if self.verdict == "pass":
            return f"{head}: its {pct} {pass_side} bound {_fmt(self.bound)} {'>=' if minimum else '<='} {key}"
        if self.verdict == "fail":
            return f"{head}: its {pct} {fail_side} bound {_fmt(self.fail_bound)} {'<' if minimum else '>'} {key}"
        return (
            f"{head}: undecided against {key} ({pct} {pass_side} bound {_fmt(self.bound)}, "
            f"{fail_side} bound {_fmt(self.fail_bound)})"
        )


def _fmt(x: float | None) -> str:
    return "none yet" if x is None else f"{x:.4g}"


def _verdict(passes: bool, fails: bool) -> str:
    return "fail" if fails else "pass" if passes else "pending"


def evaluate(evidence: Evidence, gates: Gates, confidence: float) -> list[GateResult]:
    """Every configured gate on ``evidence``, in a fixed order (see the module docstring)."""
    c = confidence
    out = []
    if (t := gates.agreement_min) is not None:
        n, x = evidence.rows, evidence.rows_agree
        lower, upper = proportion_bounds(x, n, c) if n else (None, None)
        passes, fails = lower is not None and lower >= t, upper is not None and upper < t
        out.append(GateResult("agreement", t, x / n if n else None, lower, _verdict(passes, fails), upper, n, c))
    if (t := gates.abs_diff_p99_max) is not None:
        h = evidence.abs_diff
        lower, upper = h.quantile_bounds(QUANTILE, c)
        passes, fails = upper is not None and upper <= t, lower is not None and lower > t
        out.append(GateResult("abs_diff_p99", t, h.quantile(QUANTILE), upper, _verdict(passes, fails), lower, h.n, c))
    if (t := gates.error_rate_max) is not None:
        n, x = evidence.candidate_requests, evidence.candidate_errors
        lower, upper = proportion_bounds(x, n, c) if n else (None, None)
        passes, fails = upper is not None and upper <= t, lower is not None and lower > t
        out.append(GateResult("error_rate", t, x / n if n else None, upper, _verdict(passes, fails), lower, n, c))
    if (t := gates.latency_p99_ratio_max) is not None:
        out.append(_latency_ratio(evidence, t, c))
    return out


def _latency_ratio(evidence: Evidence, threshold: float, confidence: float) -> GateResult:
    split = (1.0 + confidence) / 2.0  # each side's bound; both hold together at >= confidence
    cand, prim = evidence.candidate_latency_s, evidence.primary_latency_s
    c_lower, c_upper = cand.quantile_bounds(QUANTILE, split)
    p_lower, p_upper = prim.quantile_bounds(QUANTILE, split)
    upper = _ratio(c_upper, p_lower)
    lower = _ratio(c_lower, p_upper)
    c_point, p_point = cand.quantile(QUANTILE), prim.quantile(QUANTILE)
    value = _ratio(c_point, p_point)
    passes, fails = upper is not None and upper <= threshold, lower is not None and lower > threshold
    return GateResult(
        "latency_p99_ratio", threshold, value, upper, _verdict(passes, fails), lower, min(cand.n, prim.n), confidence
    )


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den for bounds: None where it is undefined (0 / 0, inf / inf)."""
    if num is None or den is None:
        return None
    if math.isinf(den):
        return None if math.isinf(num) else 0.0
    if den == 0.0:
        return math.inf if num > 0 else None
    return num / den
