"""Traffic routing (issue 5): weighted split, sticky keys, shadow traffic and its live comparison,
route changes at run time, through tritonclient on gRPC and HTTP against real gateway processes."""

from __future__ import annotations

import math
import signal
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until
from routing_helpers import (
    PAIR_PERM,
    PAIR_W,
    TRANSPORTS,
    Background,
    Clients,
    build_crash,
    build_matmul,
    build_renamed,
    call,
    comparison,
    fan_out,
    metric,
    metrics,
    route,
    write_routes,
)

SCALES = {"a": 1.0, "b": 2.0, "c": 3.0}
X = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
SLOW_CONFIG = """
max_batch_size: 64
instance_group [{ count: 1, kind: KIND_CPU }]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
ROUTES = [
    route("split", {"a": 90, "b": 10}),
    # budgets above the 200 requests sent: no shadow is dropped, every one must reach its model
    route("guard_invalid", {"a": 1}, shadow={"target": "mlp", "fraction": 1.0, "max_in_flight": 512}),
    route("guard_crash", {"a": 1}, shadow={"target": "crash", "fraction": 1.0, "max_in_flight": 512}),
    route("slowshadow", {"fast": 1}, shadow={"target": "slow", "fraction": 1.0, "max_in_flight": 2}),
    route("compare", {"pair_p": 1}, shadow={"target": "pair_s", "fraction": 1.0, "max_in_flight": 64}),
    route("renamed", {"a": 1}, shadow={"target": "a_z", "fraction": 1.0}),
    route("classified", {"pair_p": 1}, shadow={"target": "pair_s", "fraction": 1.0}),
    route("primary_fails", {"a": 1}, shadow={"target": "mlp", "fraction": 1.0}),
]
NONE = {"compared": 0, "failed": 0, "dropped": 0, "primary_failed": 0}
STICKY = route("sticky", {"a": 1, "b": 1}, sticky="header:x-user-id")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("routing")
    for name, scale in SCALES.items():
        modelzoo.build_scaled(repo, name, scale=scale)
    modelzoo.build_mlp(repo, "mlp")  # takes x [batch, 16]: a shadow of 'a' fails validation
    build_crash(repo)  # takes x [batch, 4] but fails inside ONNX Runtime
    modelzoo.build_slow(repo, "fast", dim=256, layers=1)
    modelzoo.build_slow(repo, "slow", dim=256, layers=256)
    modelzoo.write_config(repo / "slow", SLOW_CONFIG)
    build_renamed(repo, "a_z")  # answers z, not y: nothing to compare with 'a'
    build_matmul(repo, "pair_p")
    build_matmul(repo, "pair_s", PAIR_PERM)
    return repo


@pytest.fixture(scope="module")
def gw(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    config = write_routes(tmp_path_factory.mktemp("cfg") / "gateway.yaml", ROUTES)
    with GatewayProcess(repo, ["--config", str(config)]) as g:
        yield g


def _scaled_target(name: str, version: str, y: np.ndarray, x: np.ndarray) -> str:
    """The target that answered, checked against its answer (y = x * scale)."""
    assert name in SCALES and version == "1", (name, version)
    np.testing.assert_array_equal(y, x * SCALES[name])
    return name


# -- 1. split ------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_split_proportions_match_weights_within_binomial_bounds(gw, transport):
    n, p = 2000, 0.1

    def one(clients: Clients, i: int) -> str:
        x = X + i
        return _scaled_target(*clients.infer(transport, "split", x), x)

    targets = fan_out(gw, list(range(n)), one)
    to_b = targets.count("b")
    assert targets.count("a") + to_b == n
    bound = 5 * math.sqrt(n * p * (1 - p))
    assert abs(to_b - n * p) <= bound, f"{to_b} of {n} went to b; expected {n * p} +- {bound:.0f}"


# -- 2. sticky keys --------------------------------------------------------------------------------
def _sticky_map(gw: GatewayProcess, keys: list[str]) -> dict[str, str]:
    """key -> target, checking that gRPC metadata and HTTP headers (any case) agree on every request."""

    def one(clients: Clients, key: str) -> str:
        seen = set()
        for _ in range(2):
            for transport, header in (("grpc", "x-user-id"), ("http", "x-user-id"), ("http", "X-User-Id")):
                seen.add(_scaled_target(*clients.infer(transport, "sticky", X, headers={header: key}), X))
        assert len(seen) == 1, f"key {key!r} went to {seen}"
        return seen.pop()

    return dict(zip(keys, fan_out(gw, keys, one), strict=True))


def test_sticky_keys_keep_their_target_across_requests_transports_and_restarts(repo, tmp_path):
    config = write_routes(tmp_path / "gateway.yaml", [STICKY])
    keys = [f"user-{i}" for i in range(50)]
    with GatewayProcess(repo, ["--config", str(config)]) as g:
        before = _sticky_map(g, keys)
        unkeyed = fan_out(g, list(range(200)), lambda c, i: c.infer(TRANSPORTS[i % 2], "sticky", X)[0])
    counts = {t: list(before.values()).count(t) for t in ("a", "b")}
    assert min(counts.values()) >= 5, f"50 keys spread over the targets as {counts}"
    assert set(unkeyed) == {"a", "b"}, "without the sticky header the split is random"
    with GatewayProcess(repo, ["--config", str(config)]) as g:
        after = _sticky_map(g, keys)
    assert after == before, {k: (before[k], after[k]) for k in keys if before[k] != after[k]}


# -- 3. failing shadows ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,shadow,outcome", [("guard_invalid", "mlp", "invalid_input"),
                                                 ("guard_crash", "crash", "error")])
def test_a_shadow_failing_every_request_leaves_the_primary_at_full_success(gw, name, shadow, outcome):
    n = 200
    with closing(Clients(gw)) as clients:
        assert clients.http.is_model_ready(shadow), "the failing shadow must be loaded, so requests reach it"
    before = metrics(gw)
    jobs = [(TRANSPORTS[i % 2], X + i) for i in range(n)]
    targets = fan_out(gw, jobs, lambda c, job: _scaled_target(*c.infer(job[0], name, job[1]), job[1]))
    assert targets == ["a"] * n
    assert wait_until(lambda: comparison(gw, name)["counts"]["failed"] >= n, timeout=30)
    summary = comparison(gw, name)
    assert summary["counts"] == {**NONE, "failed": n}, summary
    assert [(p["primary"], p["shadow"]) for p in summary["pairs"]] == [("a", shadow)]
    after = metrics(gw)

    def delta(sample: str, **labels: str) -> float:
        return metric(after, sample, **labels) - metric(before, sample, **labels)

    assert delta("onnxgate_shadow_requests_total", route=name, outcome="failed") == n
    assert delta("onnxgate_requests_total", model="a", outcome="success") == n
    assert delta("onnxgate_requests_total", model="a") == n, "every primary request succeeded"
    assert delta("onnxgate_requests_total", model=shadow, protocol="shadow", outcome=outcome) == n


# -- 4. slow shadow --------------------------------------------------------------------------------
def test_a_slow_shadow_over_its_budget_is_dropped_and_never_sheds_or_fails_the_primary(gw, repo):
    n = 300
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((4, 256), dtype=np.float32) for _ in range(n)]
    reference = modelzoo.reference_run(repo / "fast/1/model.onnx", {"x": np.concatenate(xs)})["y"]

    def one(clients: Clients, i: int) -> np.ndarray:
        name, version, y = clients.infer(TRANSPORTS[i % 2], "slowshadow", xs[i])
        assert (name, version) == ("fast", "1")
        return y

    answers = fan_out(gw, list(range(n)), one, threads=4)
    np.testing.assert_allclose(np.concatenate(answers), reference, rtol=1e-5, atol=1e-5)

    def counts() -> dict:
        return comparison(gw, "slowshadow")["counts"]

    assert wait_until(lambda: sum(counts().values()) >= n, timeout=60), counts()
    c = counts()
    assert c["compared"] + c["failed"] + c["dropped"] == n, c
    assert c["failed"] == 0 and c["compared"] >= 1, c
    assert c["dropped"] >= 1, f"a budget of 2 for a shadow much slower than its primary dropped nothing: {c}"
    m = metrics(gw)
    assert metric(m, "onnxgate_rejected_requests_total", model="fast") == 0, "a primary request was shed"
    assert metric(m, "onnxgate_requests_total", model="fast", outcome="success") == n
    assert metric(m, "onnxgate_requests_total", model="fast") == n
    for outcome in ("compared", "failed", "dropped"):
        assert metric(m, "onnxgate_shadow_requests_total", route="slowshadow", outcome=outcome) == c[outcome]


# -- 5. comparison of a pair whose disagreement is known -----------------------------------------------
def _pair_inputs(total: int) -> np.ndarray:
    """Distinct deterministic rows whose top two scores (x @ W) are well apart, so argmax is robust."""
    x = np.random.RandomState(11).randn(4 * total, 6).astype(np.float32)
    top2 = np.sort(x.astype(np.float64) @ PAIR_W.astype(np.float64), axis=1)[:, -2:]
    return x[top2[:, 1] - top2[:, 0] > 1e-3][:total]


def test_comparison_counts_agreement_and_differences_match_numpy(gw):
    n = 40
    sizes = [1 + i % 8 for i in range(n)]
    rows = _pair_inputs(sum(sizes))
    xs = np.split(rows, np.cumsum(sizes)[:-1])
    with closing(Clients(gw)) as clients:
        answers = [clients.infer(TRANSPORTS[i % 2], "compare", x) for i, x in enumerate(xs)]
    assert {(name, version) for name, version, _ in answers} == {("pair_p", "1")}
    ys = [y for _, _, y in answers]
    np.testing.assert_allclose(np.concatenate(ys), rows.astype(np.float64) @ PAIR_W, rtol=1e-5, atol=1e-5)

    reference = rows.astype(np.float64) @ PAIR_W.astype(np.float64)
    expected_agree = int(np.sum(np.argmax(reference, 1) == np.argmax(reference[:, PAIR_PERM], 1)))
    assert 0 < expected_agree < len(rows), "the inputs must exercise both agreeing and disagreeing rows"
    diffs = [np.abs(y.astype(np.float64) - y[:, PAIR_PERM].astype(np.float64)) for y in ys]
    per_request = {"max_abs_diff": [d.max() for d in diffs], "mean_abs_diff": [d.mean() for d in diffs]}

    assert wait_until(lambda: comparison(gw, "compare")["counts"]["compared"] >= n, timeout=30)
    summary = comparison(gw, "compare")
    assert summary["counts"] == {**NONE, "compared": n}
    agreement = {"rows": len(rows), "rows_agree": expected_agree, "rate": pytest.approx(expected_agree / len(rows))}
    assert summary["argmax_agreement"] == agreement
    [pair] = summary["pairs"]
    assert (pair["primary"], pair["shadow"]) == ("pair_p", "pair_s")
    assert pair["window"]["filled"] == n
    assert pair["argmax_agreement"]["rows_agree"] == expected_agree
    for stat, values in per_request.items():
        q = np.quantile(values, [0.5, 0.9, 0.99, 1.0])
        expected = dict(zip(("p50", "p90", "p99", "max"), q.tolist(), strict=True))
        assert pair[stat] == pytest.approx(expected, rel=1e-6), stat
    assert set(pair["latency_diff_s"]) == {"p50", "p90", "p99", "max"}

    m = metrics(gw)
    labels = {"route": "compare", "primary": "pair_p", "shadow": "pair_s"}
    assert metric(m, "onnxgate_shadow_requests_total", outcome="compared", **labels) == n
    assert metric(m, "onnxgate_shadow_argmax_rows_total", agree="true", output="y", **labels) == expected_agree
    assert metric(m, "onnxgate_shadow_argmax_rows_total", agree="false", **labels) == len(rows) - expected_agree
    assert metric(m, "onnxgate_shadow_abs_diff_count", stat="max", output="y", **labels) == n
    assert metric(m, "onnxgate_shadow_abs_diff_sum", stat="max", **labels) == pytest.approx(
        sum(per_request["max_abs_diff"]), rel=1e-6)
    assert metric(m, "onnxgate_shadow_latency_diff_seconds_count", **labels) == n


def test_answers_without_a_comparable_output_add_no_difference(gw):
    """A shadow without the primary's output, or a primary answer turned into class labels, cannot be
    compared: such requests count as compared but must not enter the differences as zeros."""
    n = 10
    with closing(Clients(gw)) as clients:
        for i in range(n):
            clients.infer(TRANSPORTS[i % 2], "renamed", X + i)
            mod, client = (grpcclient, clients.grpc) if i % 2 else (httpclient, clients.http)
            x = _pair_inputs(3)
            inp = mod.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("classified", [inp], outputs=[mod.InferRequestedOutput("y", class_count=2)])
    for name in ("renamed", "classified"):
        assert wait_until(lambda name=name: comparison(gw, name)["counts"]["compared"] >= n, timeout=30)
        summary = comparison(gw, name)
        assert summary["counts"]["compared"] == n and summary["argmax_agreement"]["rows"] == 0, summary
        [pair] = summary["pairs"]
        assert pair["max_abs_diff"] is None and pair["mean_abs_diff"] is None, (name, pair)


def test_a_mirrored_request_whose_primary_fails_is_still_counted(gw):
    """The shadow (mlp takes x [batch, 16]) answers, the primary ('a' takes x [batch, 4]) refuses:
    nothing to compare, but every mirrored request must show up in the counts."""
    n = 10
    with closing(Clients(gw)) as clients:
        for i in range(n):
            with pytest.raises(InferenceServerException, match="expected shape"):
                clients.infer(TRANSPORTS[i % 2], "primary_fails", np.ones((1, 16), np.float32))
    assert wait_until(lambda: sum(comparison(gw, "primary_fails")["counts"].values()) >= n, timeout=30)
    counts = comparison(gw, "primary_fails")["counts"]
    assert counts == {**NONE, "primary_failed": n}, counts
    assert metric(metrics(gw), "onnxgate_shadow_requests_total", route="primary_fails", outcome="primary_failed") == n


def test_a_target_version_the_model_does_not_have_is_rejected(gw):
    status, doc = call(gw.http_port, "PUT", "/v2/routes/pinned", {"split": [{"target": "a:7", "weight": 1}]})
    if status == 200:
        call(gw.http_port, "DELETE", "/v2/routes/pinned")
    assert status == 400 and "version 7" in doc["error"], (status, doc)


# -- 6. a route is a model to clients; route changes at run time ----------------------------------------
def test_a_route_shows_its_primary_under_its_own_name_and_has_no_versions(gw):
    with closing(Clients(gw)) as clients:
        http_meta, model_meta = clients.http.get_model_metadata("split"), clients.http.get_model_metadata("a")
        assert http_meta == {**model_meta, "name": "split"}  # the primary is the target of weight 90
        assert clients.grpc.get_model_metadata("split").name == "split"
        assert clients.http.get_model_config("split") == {**clients.http.get_model_config("a"), "name": "split"}
        assert clients.grpc.get_model_config("split").config.name == "split"
        assert clients.http.is_model_ready("split") and clients.grpc.is_model_ready("split")
        for transport in TRANSPORTS:
            with pytest.raises(InferenceServerException) as err:
                clients.infer(transport, "split", X, version="1")
            assert "404" in str(err.value.status()) or "NOT_FOUND" in str(err.value.status()), err.value
            assert "route" in err.value.message()
    for path in ("/v2/models/split/versions/1", "/v2/models/split/versions/1/ready",
                 "/v2/models/split/versions/1/config"):
        assert call(gw.http_port, "GET", path)[0] == 404, path
    status, doc = call(gw.http_port, "PUT", "/v2/routes/a", {"split": [{"target": "b", "weight": 1}]})
    assert status == 400 and "name of a model" in doc["error"], doc
    assert call(gw.http_port, "GET", "/v2/routes/a")[0] == 404


INVALID_PUTS = [
    ({"split": [{"target": "ghost", "weight": 1}]}, "unknown target model 'ghost'"),
    ({"split": [{"target": "a", "weight": -1}]}, "weight must be a positive number"),
    ({"split": [{"target": "a", "weight": 0}]}, "weight must be a positive number"),
    ({"split": [{"target": "a", "weight": "ten"}]}, "weight must be a number"),
    ({"split": []}, "split must be a non-empty list"),
    ({"split": [{"target": "a:x", "weight": 1}]}, "target must be 'model' or 'model:version'"),
    ({"split": "a", "sticky": "cookie:uid"}, "sticky must be 'header:<name>'"),
    ({"split": "a", "shadow": {"target": "ghost"}}, "unknown target model 'ghost'"),
    ({"split": "a", "shadow": {"target": "b", "fraction": 1.5}}, "fraction must be within 0..1"),
    ({"split": "a", "shadow": {"target": "b", "max_in_flight": 0}}, "max_in_flight must be a positive integer"),
    ({"name": "other", "split": "a"}, "differs from the path"),
    ({"split": "a", "weights": 1}, "unknown key"),
]


def test_route_changes_are_validated_atomic_and_survive_bad_ones(repo, tmp_path):
    config = tmp_path / "gateway.yaml"
    write_routes(config, [route("live", {"a": 1}), route("other", {"b": 1})])
    check = lambda answer: _scaled_target(*answer, X)  # noqa: E731
    with (GatewayProcess(repo, ["--config", str(config)]) as g, Background(g, "live", X, check) as load,
          closing(Clients(g)) as clients):
        port = g.http_port

        def serving(expected: str) -> None:
            for transport in TRANSPORTS:
                assert _scaled_target(*clients.infer(transport, "live", X), X) == expected

        def routes() -> list:
            return call(port, "GET", "/v2/routes")[1]

        def seen(target: str) -> bool:  # the background load has been answered by ``target`` lately
            return target in load.answers[-5:]

        assert wait_until(lambda: seen("a"), timeout=20)
        serving("a")
        # A valid change takes effect with the answer to the PUT; the rest of the table stays.
        status, doc = call(port, "PUT", "/v2/routes/live", {"split": [{"target": "b", "weight": 1}]})
        assert status == 200 and doc == route("live", {"b": 1.0}), doc
        serving("b")
        assert wait_until(lambda: seen("b"), timeout=20)
        assert call(port, "GET", "/v2/routes/other") == (200, route("other", {"b": 1.0}))
        table = routes()
        for body, message in INVALID_PUTS:
            status, doc = call(port, "PUT", "/v2/routes/live", body)
            assert status == 400 and message in doc["error"], (body, status, doc)
            assert routes() == table
        status, doc = call(port, "PUT", "/v2/routes/fresh", {"split": [{"target": "ghost", "weight": 1}]})
        assert status == 400 and call(port, "GET", "/v2/routes/fresh")[0] == 404
        serving("b")
        # DELETE removes one route; the name is then unknown to inference too.
        assert call(port, "DELETE", "/v2/routes/other")[0] == 200
        assert call(port, "DELETE", "/v2/routes/other")[0] == 404
        assert [r["name"] for r in routes()] == ["live"]
        with pytest.raises(InferenceServerException, match="other"):
            clients.infer("grpc", "other", X)
        serving("b")
        # SIGHUP re-reads the file: its routes replace the table, runtime changes included.
        write_routes(config, [route("live", {"c": 1}), route("added", {"a": 1})])
        g.signal(signal.SIGHUP)
        assert wait_until(lambda: {r["name"] for r in routes()} == {"live", "added"}, timeout=20), routes()
        serving("c")
        assert wait_until(lambda: seen("c"), timeout=20)
        # An invalid file leaves the table alone and the log says why.
        table = routes()
        for n, text in enumerate(["routes:\n  - {name: live, split: ghost}\n", "routes: [unclosed\n",
                                  "routes:\n  - {name: a, split: b}\n"]):
            config.write_text(text, encoding="utf-8")
            g.signal(signal.SIGHUP)
            assert wait_until(lambda n=n: g.log.count("SIGHUP: routes not changed") > n, timeout=20), g.log[-2000:]
            assert routes() == table
            serving("c")
        reasons = [line for line in g.log.splitlines() if "SIGHUP: routes not changed" in line]
        for reason, expected in zip(reasons, ["unknown target model 'ghost'", "not valid YAML", "name of a model"],
                                    strict=True):
            assert expected in reason, reason
    # Every request to the route while it changed was answered, by one of its targets, consistently.
    assert not load.errors, load.errors[:5]
    assert set(load.answers) == {"a", "b", "c"} and load.answers[-1] == "c"


def test_a_route_named_like_a_model_stops_the_gateway_at_startup(repo, tmp_path):
    config = write_routes(tmp_path / "gateway.yaml", [route("a", {"b": 1})])
    g = GatewayProcess(repo, ["--config", str(config)])
    try:
        g.start()
        assert g.proc is not None and g.proc.wait(30) != 0
    finally:
        g.kill()
    assert "name of a model" in g.log, g.log[-2000:]


def test_a_model_that_appears_under_a_route_name_is_not_hidden_silently(tmp_path):
    """Routes may not hide models; a model added to the repository later with a route's name is
    hidden by the route (it answers instead), so the gateway must at least say so."""
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "b", scale=2.0)
    config = write_routes(tmp_path / "gateway.yaml", [route("late", {"b": 1})])
    args = ["--config", str(config), "--model-control-mode", "poll", "--repository-poll-secs", "0.2"]
    with GatewayProcess(repo, args) as g:
        modelzoo.build_scaled(repo, "late", scale=5.0)
        assert wait_until(lambda: "model late version 1 ready" in g.log, timeout=30), g.log[-2000:]
        with closing(Clients(g)) as clients:
            assert _scaled_target(*clients.infer("grpc", "late", X), X) == "b"  # the route still answers
    warnings = [line for line in g.log.splitlines() if ("WARNING" in line or "ERROR" in line) and "late" in line]
    assert any("route" in line for line in warnings), "model 'late' is hidden by route 'late' without a word"
