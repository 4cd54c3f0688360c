"""Rollout gates (issue 18): the evidence a step gathers and the one-sided bounds judged on it.

The bounds are checked for the coverage they claim by simulation (seeded, so deterministic),
for tightening as evidence grows, and the evidence for merging and saving exactly."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxgate.core.traffic.rollout_config import Gates
from onnxgate.core.traffic.rollout_gates import (
    _BUCKETS,
    _OVER,
    Evidence,
    Histogram,
    _bucket,
    _edge,
    binom_cdf,
    evaluate,
    proportion_bounds,
    quantile_ranks,
)

C = 0.95
TOL = 0.012  # coverage may fall this far below C: ~3.5 standard errors of 4000 trials


# ---- the binomial maths ----


@pytest.mark.parametrize("n", [1, 2, 7, 50, 200])
@pytest.mark.parametrize("p", [1e-4, 0.01, 0.3, 0.5, 0.97, 0.999])
def test_binomial_cdf_is_the_exact_sum(n: int, p: float):
    acc = 0.0
    for k in range(n + 1):
        acc += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        assert binom_cdf(k, n, p) == pytest.approx(min(acc, 1.0), abs=1e-12), (k, n, p)
    assert binom_cdf(-1, n, p) == 0.0 and binom_cdf(n, n, p) == 1.0


def test_binomial_cdf_at_large_n_matches_the_normal_limit():
    n, p = 10**6, 0.99
    sd = math.sqrt(n * p * (1 - p))
    for z in (-2.0, 0.0, 1.5):
        k = math.floor(n * p + z * sd)
        assert binom_cdf(k, n, p) == pytest.approx(NormalDist().cdf((k + 0.5 - n * p) / sd), abs=3e-3)


def test_zero_errors_bound_is_exact_and_shrinks_with_n():
    for n in (1, 10, 500, 3000, 10**5):
        assert proportion_bounds(0, n, C)[1] == pytest.approx(1 - (1 - C) ** (1 / n), rel=1e-12)
    assert proportion_bounds(0, 3000, C)[1] <= 0.001 < proportion_bounds(0, 500, C)[1]
    e = Evidence()
    for ok in [True] * 3000:
        e.add_candidate(ok)
    assert evaluate(e, Gates(error_rate_max=0.001), C)[0].verdict == "pass"
    e = Evidence()
    for ok in [True] * 500:
        e.add_candidate(ok)
    assert evaluate(e, Gates(error_rate_max=0.001), C)[0].verdict == "pending"


@pytest.mark.parametrize(("n", "p"), [(3000, 0.001), (500, 0.02), (200, 0.5), (1000, 0.99), (40, 0.9)])
def test_proportion_bounds_cover_at_the_claimed_confidence(n: int, p: float):
    rng = np.random.default_rng(18)
    xs = rng.binomial(n, p, size=4000)
    bounds = {int(x): proportion_bounds(int(x), n, C) for x in np.unique(xs)}
    lower_ok = np.mean([bounds[int(x)][0] <= p for x in xs])
    upper_ok = np.mean([bounds[int(x)][1] >= p for x in xs])
    assert lower_ok >= C - TOL and upper_ok >= C - TOL, (lower_ok, upper_ok)


def test_proportion_bounds_tighten_with_n():
    widths = []
    for n in (100, 1000, 10_000, 100_000):
        lower, upper = proportion_bounds(round(0.99 * n), n, C)
        assert lower <= 0.99 <= upper
        widths.append(upper - lower)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 20


def test_quantile_ranks_exist_only_with_enough_samples():
    # the max is a 95 % upper bound on the p99 from 299 values on, never before
    assert quantile_ranks(298, 0.99, C)[1] is None
    assert quantile_ranks(299, 0.99, C) == (quantile_ranks(299, 0.99, C)[0], 299)
    assert quantile_ranks(1, 0.99, C) == (1, None)  # one value already bounds the p99 from below
    assert quantile_ranks(0, 0.99, C) == (None, None)


@pytest.mark.parametrize("n", [300, 1000, 5000])
def test_order_statistic_bounds_cover_the_p99(n: int):
    rng = np.random.default_rng(n)
    true_p99 = math.exp(NormalDist().inv_cdf(0.99))  # standard lognormal
    j, k = quantile_ranks(n, 0.99, C)
    upper_ok = lower_ok = 0
    for _ in range(8):  # 4000 trials, 500 at a time
        samples = np.sort(rng.lognormal(0.0, 1.0, size=(500, n)), axis=1)
        upper_ok += int(np.sum(samples[:, k - 1] >= true_p99))
        lower_ok += int(np.sum(samples[:, j - 1] <= true_p99))
    assert upper_ok / 4000 >= C - TOL and lower_ok / 4000 >= C - TOL, (upper_ok, lower_ok)


def test_histogram_bounds_cover_the_p99_with_ties_and_bucket_edges():
    """60 % exact zeros, the rest lognormal: the p99 is the lognormal's 0.975 quantile."""
    rng = np.random.default_rng(7)
    true_p99 = math.exp(-5 + 0.5 * NormalDist().inv_cdf(0.975))
    n, trials = 400, 400
    covered_upper = covered_lower = 0
    for _ in range(trials):
        values = np.where(rng.random(n) < 0.6, 0.0, rng.lognormal(-5, 0.5, n))
        h = Histogram()
        for v in values:
            h.add(v)
        lower, upper = h.quantile_bounds(0.99, C)
        exact_j, exact_k = quantile_ranks(n, 0.99, C)
        ordered = np.sort(values)
        assert lower <= ordered[exact_j - 1] and upper >= ordered[exact_k - 1]  # edges are conservative
        covered_upper += upper >= true_p99
        covered_lower += lower <= true_p99
    assert covered_upper / trials >= C - 0.03 and covered_lower / trials >= C - 0.03


def test_order_statistic_bounds_tighten_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (300, 3000, 30_000):
        h = Histogram()
        for v in rng.lognormal(0, 1, n):
            h.add(v)
        lower, upper = h.quantile_bounds(0.99, C)
        widths.append(upper - lower)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 3


def test_latency_ratio_bound_covers_the_true_ratio():
    """Paired, correlated lognormal service times with equal spread: the true p99 ratio is
    exp(mu_c - mu_p). Each side's bound is taken at (1 + c) / 2, so the ratio holds at c."""
    rng = np.random.default_rng(11)
    true_ratio = math.exp(0.2)
    n, trials = 600, 300
    upper_ok = lower_ok = 0
    for _ in range(trials):
        z = rng.standard_normal(n)
        zc = 0.8 * z + 0.6 * rng.standard_normal(n)
        e = Evidence()
        for p, c in zip(np.exp(-4 + 0.4 * z), np.exp(-3.8 + 0.4 * zc), strict=True):
            e.add_comparison(1, 1, 0.0, float(p), float(c))
        (g,) = evaluate(e, Gates(latency_p99_ratio_max=1.3), C)
        assert g.bound is not None and g.fail_bound is not None
        upper_ok += g.bound >= true_ratio
        lower_ok += g.fail_bound <= true_ratio
    assert upper_ok / trials >= C - 0.03 and lower_ok / trials >= C - 0.03


# ---- verdicts ----


def _evidence(n: int, agree: float = 1.0, diff: float = 0.001, errors: int = 0, ratio: float = 1.0) -> Evidence:
    rng = np.random.default_rng(n)
    e = Evidence()
    for i in range(n):
        lat = float(rng.lognormal(-5, 0.3))
        e.add_comparison(10, round(10 * agree), diff * float(rng.random()), lat, lat * ratio)
        e.add_candidate(i >= errors)
    return e


ALL = Gates(agreement_min=0.99, abs_diff_p99_max=0.05, error_rate_max=0.01, latency_p99_ratio_max=1.3)


def test_verdicts_pass_fail_and_pending():
    assert [g.verdict for g in evaluate(Evidence(), ALL, C)] == ["pending"] * 4
    good = evaluate(_evidence(2000), ALL, C)
    assert [g.name for g in good] == ["agreement", "abs_diff_p99", "error_rate", "latency_p99_ratio"]
    assert [g.verdict for g in good] == ["pass"] * 4
    bad = evaluate(_evidence(2000, agree=0.9, diff=1.0, errors=100, ratio=2.0), ALL, C)
    assert [g.verdict for g in bad] == ["fail"] * 4
    few = evaluate(_evidence(100), ALL, C)  # too few for the p99 upper bounds, errors undecided
    assert {g.name: g.verdict for g in few}["abs_diff_p99"] == "pending"
    assert {g.name: g.verdict for g in few}["latency_p99_ratio"] == "pending"


def test_gate_results_are_json_and_say_what_they_judged():
    e = _evidence(500, agree=0.9)
    e.add_comparison(1, 1, float("nan"), 0.0, 1.0)  # a NaN diff is the worst; a zero latency divides
    for g in evaluate(e, ALL, C):
        doc = orjson.loads(orjson.dumps(g.to_dict()))
        assert doc["name"] == g.name and doc["verdict"] in ("pass", "fail", "pending")
        text = g.describe()
        assert g.name in text and f"{g.threshold:.4g}" in text
    agreement = evaluate(e, ALL, C)[0]
    text = agreement.describe()
    assert agreement.verdict == "fail" and "upper bound" in text and "< agreement_min 0.99" in text


# ---- evidence: buckets, merging, saving ----


@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False))
def test_every_value_falls_between_its_bucket_edges(value: float):
    b = _bucket(value)
    assert b is not None and _edge(b) <= value < _edge(b + 1)
    if 1e-9 <= value < 1e4:
        assert _edge(b + 1) / _edge(b) < 1.025  # ~2.2 % resolution


def test_special_buckets():
    assert _bucket(0.0) is None and _bucket(-1.0) is None
    assert _bucket(float("nan")) == _OVER and _bucket(math.inf) == _OVER
    assert _edge(_BUCKETS) >= 1e4 and _edge(_OVER + 1) == math.inf


_value = st.one_of(
    st.none(), st.just(0.0), st.floats(min_value=1e-12, max_value=1e6, allow_nan=False), st.just(float("nan"))
)
_op = st.one_of(
    st.tuples(st.integers(0, 5), st.integers(0, 5), _value, _value, _value).map(
        lambda t: ("cmp", t[0] + t[1], t[1], t[2], t[3], t[4])
    ),
    st.booleans().map(lambda ok: ("cand", ok)),
)
_ops = st.lists(_op, max_size=30)


def _build(ops: list) -> Evidence:
    e = Evidence()
    for op in ops:
        if op[0] == "cmp":
            e.add_comparison(*op[1:])
        else:
            e.add_candidate(op[1])
    return e


def _sum(*parts: Evidence) -> Evidence:
    out = Evidence()
    for p in parts:
        out.merge(p)
    return out


@settings(max_examples=60, deadline=None)
@given(_ops, _ops, _ops)
def test_merge_is_associative_commutative_and_equals_the_concatenation(a: list, b: list, c: list):
    ea, eb, ec = _build(a), _build(b), _build(c)
    assert _sum(ea, eb) == _sum(eb, ea)
    left = _sum(ea, eb)
    left.merge(ec)
    right = _sum(eb, ec)
    right.merge(ea)
    assert left == right == _build(a + b + c)
    before = ea.to_dict()
    copied = ea.copy()
    copied.merge(eb)
    assert ea.to_dict() == before  # a copy shares nothing


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_evidence_round_trips_through_json(ops: list):
    e = _build(ops)
    back = Evidence.from_dict(orjson.loads(orjson.dumps(e.to_dict())))
    assert back == e and back.to_dict() == e.to_dict()
    assert [g.to_dict() for g in evaluate(back, ALL, C)] == [g.to_dict() for g in evaluate(e, ALL, C)]
    taken = e.take()
    assert taken == back and e == Evidence()


def test_evidence_from_dict_refuses_what_is_not_evidence():
    good = _evidence(3).to_dict()
    for bad in (
        {},
        {**good, "scheme": "other buckets"},
        {**good, "rows": -1},
        {**good, "rows_agree": good["rows"] + 1},
        {**good, "abs_diff": {"99999": 1}},
        {**good, "abs_diff": {"3": "x"}},
        {**good, "primary_latency_s": []},
    ):
        with pytest.raises(ValueError):
            Evidence.from_dict(bad)
    with pytest.raises(ValueError):
        Evidence().add_comparison(2, 3, None, None, None)
