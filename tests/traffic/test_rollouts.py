"""Rollouts end to end (issue 18 item 6): real gateway processes walking a route's candidate from
shadow to 100 %, or back, on the evidence of real traffic (a few client threads on HTTP and gRPC)
to real ONNX models; the operator actions, conflicting route changes, restarts with a state
directory, the metrics and the CloudEvents webhook.

One gateway (``gw``) serves a route per scenario, each with its own candidate where its counts
are asserted; the restart test starts gateways of its own. Traffic comes
in bursts from the test (the rollout's state is polled between bursts), or as a steady load from
threads while the rollout walks (``Load``). Every reply is checked: its ``model_name`` says who
answered and its ``y`` must be ``x * scale`` of that model.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

import modelzoo
from gateway import GatewayProcess, wait_until
from rollout_support import (
    ALL_GATES,
    GATE_NAMES,
    NEVER,
    SCALES,
    Load,
    Webhook,
    act,
    build_crash_version,
    burst,
    decisions,
    drive,
    entry,
    rollout_metrics,
    route,
    summary,
    where,
    write_config,
)
from routing_helpers import call, metric, metrics

# -- the shared gateway ------------------------------------------------------------------------------
ROUTES = [
    route("walk", "prim", candidate="good", min_comparisons=400, gates=ALL_GATES),
    route("reject", "prim", candidate="bad", min_comparisons=400, gates=ALL_GATES),
    route("flaky", "prim", candidate="flaky_c", min_comparisons=100),
    route("quiet_hold", "prim", candidate="good", max_step_s=1),
    route("quiet_recover", "prim", candidate="good", max_step_s=1, min_comparisons=60),
    route("quiet_rollback", "prim", candidate="good", max_step_s=1, on_timeout="rollback"),
    route("gone", "prim", candidate="gone_c"),
    route("pinned", "prim", candidate="pin_c:1"),
    route("ops", "prim", candidate="ops_c"),
    route("ops_abort", "prim", candidate="abort_c"),
    route("guard_put", "prim", candidate="good"),
    route("guard_del", "prim", candidate="good"),
    route("guard_hup", "prim", candidate="good"),
    route("guard_bad", "prim", candidate="good"),
    route("hooked", "prim", candidate="good"),
    {"name": "plain", "split": [{"target": "prim2", "weight": 100}]},  # no rollout
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("rollouts")
    for name, scale in SCALES.items():
        modelzoo.build_scaled(repo, name, scale=scale)
    return repo


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "gateway.yaml", ROUTES, webhook.url)


@pytest.fixture(scope="module")
def gw(repo: Path, config: Path):
    args = ["--config", str(config), "--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, args) as g:
        yield g


# -- 1. an agreeing candidate walks every step to 100 % ------------------------------------------------
def test_an_agreeing_candidate_completes_every_step_without_a_failed_request(gw):
    with Load(gw, "walk") as load:
        assert wait_until(lambda: summary(gw, "walk")["phase"] == "completed", timeout=60), summary(gw, "walk")
        after = len(load)
        assert wait_until(lambda: len(load) >= after + 60, timeout=30)
    assert not load.failures, load.failures[:3]
    outcomes = load.outcomes
    assert set(outcomes) == {"prim", "good"}, {o: outcomes.count(o) for o in set(outcomes)}  # no error:*
    # The shadow step needs 400 comparisons, each of a request the primary answered: all of them before
    # any live answer of the candidate; once completed, the candidate answers everything.
    assert outcomes[:300] == ["prim"] * 300
    assert outcomes[-30:] == ["good"] * 30
    first_good, last_prim = outcomes.index("good"), len(outcomes) - 1 - outcomes[::-1].index("prim")
    assert first_good < last_prim, "no live step in which both answered"

    doc = summary(gw, "walk")
    assert where(doc) == ("completed", 3, 100, False)
    history = doc["history"]
    assert [entry(h) for h in history] == [
        ("advance", 0, 1, 10, "running", "gates", False),
        ("advance", 1, 2, 50, "running", "gates", False),
        ("complete", 2, 3, 100, "completed", "gates", False),
    ]
    for h in history:
        assert {g["name"]: g["verdict"] for g in h["gates"]} == dict.fromkeys(GATE_NAMES, "pass"), h
    assert [h["time"] for h in history] == sorted(h["time"] for h in history)

    m = rollout_metrics(gw, "walk")
    assert (m["candidate_weight"], m["step"], m["completed"], m["running"]) == (100, 3, 1, 0), m
    assert (m["advance"], m["complete"], m["rollback"], m["hold"]) == (2, 1, 0, 0), m
    samples = metrics(gw)
    for gate in GATE_NAMES:
        assert metric(samples, "onnxgate_rollout_gate_verdict", route="walk", gate=gate) == 1, gate


def shadow_calls(gw: GatewayProcess, model: str) -> tuple[float, float]:
    """(mirrored calls, live requests) the model has seen."""
    m = metrics(gw)
    total = metric(m, "onnxgate_requests_total", model=model)
    mirrored = metric(m, "onnxgate_requests_total", model=model, protocol="shadow")
    return mirrored, total - mirrored


# -- 2. a disagreeing candidate fails in the shadow step ----------------------------------------------
def test_a_disagreeing_candidate_is_rolled_back_in_shadow_and_never_answers_a_live_request(gw):
    seen = drive(gw, "reject", lambda s: s["phase"] != "running")
    doc = summary(gw, "reject")
    assert where(doc) == ("rolled_back", 0, 0, False), doc
    [h] = doc["history"]
    assert entry(h) == ("rollback", 0, 0, 0, "rolled_back", "gates", True), h
    verdicts = {g["name"]: g["verdict"] for g in h["gates"]}
    assert verdicts["agreement"] == "fail" and verdicts["error_rate"] != "fail", h["gates"]
    assert "agreement" in h["reason"] and doc["reason"] == h["reason"]
    mirrored, live = shadow_calls(gw, "bad")
    assert mirrored >= 1 and live == 0, (mirrored, live)
    # Rolled back: no live share and no more mirroring.
    seen += burst(gw, "reject")
    mirrored_then = shadow_calls(gw, "bad")
    seen += burst(gw, "reject", per_thread=20)
    assert set(seen) == {"prim"}, {o: seen.count(o) for o in set(seen)}
    assert shadow_calls(gw, "bad") == mirrored_then
    doc = summary(gw, "reject")
    assert doc["phase"] == "rolled_back" and len(doc["history"]) == 1, doc["history"]
    m = rollout_metrics(gw, "reject")
    assert (m["candidate_weight"], m["step"], m["rolled_back"], m["running"], m["rollback"]) == (0, 0, 1, 0, 1), m


# -- 3. a candidate failing at a live step is rolled back at once ---------------------------------------
def test_a_candidate_that_starts_failing_at_a_live_step_is_rolled_back_and_stays_out(gw, repo):
    before = drive(gw, "flaky", lambda s: s["step_index"] == 2)
    assert set(before) <= {"prim", "flaky_c"} and "flaky_c" in before, set(before)
    doc = summary(gw, "flaky")
    assert (doc["phase"], doc["candidate_weight"]) == ("running", 50), doc
    assert doc["comparisons"] < 100, "the 50 % step must not be about to pass"
    # A new version of the candidate that fails inside ONNX Runtime for every request.
    build_crash_version(repo, "flaky_c", 2)
    status, body = call(gw.http_port, "POST", "/v2/repository/models/flaky_c/load", {})
    assert status == 200, body
    during = drive(gw, "flaky", lambda s: s["phase"] != "running")
    failed = [o for o in during if o.startswith("error:")]
    assert failed and set(failed) <= {"error:500", "error:StatusCode.INTERNAL"}, set(during)
    assert set(during) - set(failed) <= {"prim"}, set(during)
    doc = summary(gw, "flaky")
    assert where(doc) == ("rolled_back", 2, 0, False), doc
    assert decisions(doc) == ["advance", "advance", "rollback"], doc["history"]
    last = doc["history"][-1]
    assert entry(last) == ("rollback", 2, 2, 0, "rolled_back", "gates", True), last
    gate = {g["name"]: g for g in last["gates"]}["error_rate"]
    assert gate["verdict"] == "fail" and gate["fail_bound"] > 0.05, gate
    # It holds there: every request succeeds on the primary, nothing more is decided.
    after = burst(gw, "flaky", per_thread=20)
    assert after == ["prim"] * len(after)
    assert summary(gw, "flaky")["history"] == doc["history"]
    m = rollout_metrics(gw, "flaky")
    assert (m["candidate_weight"], m["step"], m["rolled_back"], m["rollback"], m["advance"]) == (0, 2, 1, 1, 2), m


def unload_at_half(gw: GatewayProcess, name: str, candidate: str) -> list[str]:
    """Promote ``name`` to its 50 % step, unload its candidate, then send bursts (at most 15) until the
    rollout leaves ``running``; every outcome."""
    assert [act(gw, name, "promote")[0] for _ in range(2)] == [200, 200]
    assert summary(gw, name)["candidate_weight"] == 50
    assert set(burst(gw, name)) == {"prim", candidate.partition(":")[0]}
    status, body = call(gw.http_port, "POST", f"/v2/repository/models/{candidate.partition(':')[0]}/unload", {})
    assert status == 200, body
    seen: list[str] = []
    for _ in range(15):
        if summary(gw, name)["phase"] != "running":
            break
        seen += burst(gw, name)
    return seen


def test_a_candidate_unloaded_at_a_live_step_is_rolled_back(gw):
    seen = unload_at_half(gw, "gone", "gone_c")
    assert set(seen) - {"prim"} <= {"error:503", "error:StatusCode.UNAVAILABLE"}, set(seen)
    doc = summary(gw, "gone")
    assert where(doc) == ("rolled_back", 2, 0, False), doc
    assert decisions(doc) == ["promote", "promote", "rollback"]
    assert set(burst(gw, "gone", per_thread=20)) == {"prim"}


def test_a_candidate_pinned_to_a_version_that_is_unloaded_at_a_live_step_is_rolled_back(gw):
    try:
        seen = unload_at_half(gw, "pinned", "pin_c:1")
        # a route left as it was, naming a version gone since, does not block changes to the others
        other = {"split": [{"target": "prim", "weight": 1}]}
        assert call(gw.http_port, "PUT", "/v2/routes/after_unload", other)[0] == 200
        assert call(gw.http_port, "DELETE", "/v2/routes/after_unload")[0] == 200
    finally:
        assert call(gw.http_port, "POST", "/v2/repository/models/pin_c/load", {})[0] == 200
    failed = [o for o in seen if o.startswith("error:")]
    assert failed and set(seen) - set(failed) == {"prim"}, set(seen)
    doc = summary(gw, "pinned")
    assert doc["candidate_errors"] > 0, f"{len(failed)} requests the candidate failed, none counted against it"
    assert where(doc) == ("rolled_back", 2, 0, False), doc


# -- 4. too little traffic -------------------------------------------------------------------------
def test_without_traffic_a_step_holds_at_max_step_s_with_an_alert(gw):
    assert wait_until(lambda: summary(gw, "quiet_hold")["phase"] != "running", timeout=20)
    doc = summary(gw, "quiet_hold")
    assert where(doc) == ("holding", 0, 0, True), doc
    [h] = doc["history"]
    assert entry(h) == ("hold", 0, 0, 0, "holding", "gates", True), h
    assert "too little evidence" in h["reason"] and f"0 of {NEVER} comparisons" in h["reason"], h["reason"]
    assert {g["verdict"] for g in h["gates"]} == {"pending"}, h["gates"]
    m = rollout_metrics(gw, "quiet_hold")
    assert (m["holding"], m["running"], m["hold"], m["step"], m["candidate_weight"]) == (1, 0, 1, 0, 0), m


def test_a_step_held_for_too_little_traffic_is_still_judged_and_advances_once_traffic_comes(gw):
    assert wait_until(lambda: summary(gw, "quiet_recover")["phase"] == "holding", timeout=20)
    assert decisions(summary(gw, "quiet_recover")) == ["hold"]
    seen = drive(gw, "quiet_recover", lambda s: s["step_index"] == 1)
    assert set(seen) <= {"prim", "good"}, set(seen)
    doc = summary(gw, "quiet_recover")
    assert [entry(h) for h in doc["history"]][:2] == [
        ("hold", 0, 0, 0, "holding", "gates", True),
        ("advance", 0, 1, 10, "running", "gates", False),
    ]


def test_without_traffic_a_step_rolls_back_at_max_step_s_when_on_timeout_says_so(gw):
    assert wait_until(lambda: summary(gw, "quiet_rollback")["phase"] != "running", timeout=20)
    doc = summary(gw, "quiet_rollback")
    assert where(doc) == ("rolled_back", 0, 0, False), doc
    [h] = doc["history"]
    assert entry(h) == ("rollback", 0, 0, 0, "rolled_back", "gates", True), h
    assert "too little evidence" in h["reason"], h["reason"]
    # Rolled back: promote and pause are refused; resume starts over at step 0; abort ends it.
    for action in ("promote", "pause"):
        status, body = act(gw, "quiet_rollback", action)
        assert status == 409 and "rolled_back" in body["error"], (action, status, body)
    status, d = act(gw, "quiet_rollback", "resume")
    assert status == 200 and entry(d) == ("resume", 0, 0, 0, "running", "operator", False), d
    status, d = act(gw, "quiet_rollback", "abort")
    assert status == 200 and (d["decision"], d["phase"], d["weight"]) == ("abort", "aborted", 0), d
    doc = summary(gw, "quiet_rollback")
    assert decisions(doc)[:2] == ["rollback", "resume"] and decisions(doc)[-1] == "abort", decisions(doc)
    assert where(doc) == ("aborted", 0, 0, False)


# -- 6. operator actions ---------------------------------------------------------------------------
def test_pause_resume_promote_one_step_then_to_100_and_what_each_phase_refuses(gw):
    status, body = act(gw, "ops", "resume")
    assert status == 409 and "cannot resume" in body["error"], (status, body)
    status, d = act(gw, "ops", "pause", {"reason": "looking at the dashboards"})
    assert status == 200 and entry(d) == ("pause", 0, 0, 0, "paused", "operator", False), d
    assert d["reason"] == "looking at the dashboards"
    doc = summary(gw, "ops")
    assert where(doc) == ("paused", 0, 0, True) and doc["reason"] == "looking at the dashboards", doc
    assert act(gw, "ops", "pause")[0] == 409
    assert rollout_metrics(gw, "ops")["paused"] == 1
    status, d = act(gw, "ops", "resume")
    assert status == 200 and entry(d) == ("resume", 0, 0, 0, "running", "operator", False), d
    status, d = act(gw, "ops", "promote")
    assert status == 200 and entry(d) == ("promote", 0, 1, 10, "running", "operator", False), d
    seen = burst(gw, "ops", per_thread=60)
    live = seen.count("ops_c")
    assert seen.count("prim") + live == len(seen) and 0 < live < 0.3 * len(seen), live  # 10 % of 180: 18 +- 4
    m = rollout_metrics(gw, "ops")
    assert (m["step"], m["candidate_weight"], m["running"], m["promote"], m["pause"], m["resume"]) == (
        1,
        10,
        1,
        1,
        1,
        1,
    ), m
    status, body = act(gw, "ops", "promote", {"full": "yes"})
    assert status == 400 and summary(gw, "ops")["step_index"] == 1, body
    status, d = act(gw, "ops", "promote", {"full": True})
    assert status == 200 and entry(d) == ("promote", 1, 3, 100, "completed", "operator", False), d
    assert set(burst(gw, "ops")) == {"ops_c"}
    for action in ("pause", "resume", "promote", "abort"):
        status, body = act(gw, "ops", action)
        assert status == 409 and "completed" in body["error"], (action, status, body)
    doc = summary(gw, "ops")
    assert where(doc) == ("completed", 3, 100, False)
    assert decisions(doc) == ["pause", "resume", "promote", "promote"], doc["history"]
    m = rollout_metrics(gw, "ops")
    assert (m["step"], m["candidate_weight"], m["completed"], m["running"], m["promote"]) == (3, 100, 1, 0, 2), m


def test_abort_takes_the_candidate_out_for_good(gw):
    assert act(gw, "ops_abort", "promote")[0] == 200
    status, d = act(gw, "ops_abort", "abort", {"reason": "wrong model"})
    assert status == 200 and entry(d) == ("abort", 1, 1, 0, "aborted", "operator", False), d
    doc = summary(gw, "ops_abort")
    assert where(doc) == ("aborted", 1, 0, False) and doc["reason"] == "wrong model", doc
    assert set(burst(gw, "ops_abort", per_thread=20)) == {"prim"}
    for action in ("pause", "resume", "promote", "abort"):
        status, body = act(gw, "ops_abort", action)
        assert status == 409 and "aborted" in body["error"], (action, status, body)
    m = rollout_metrics(gw, "ops_abort")
    assert (m["aborted"], m["running"], m["candidate_weight"], m["abort"]) == (1, 0, 0, 1), m


def test_unknown_actions_routes_and_routes_without_a_rollout_are_404(gw):
    assert act(gw, "ops_abort", "restart")[0] == 404
    for path in ("/v2/routes/nowhere/rollout", "/v2/routes/plain/rollout"):
        assert call(gw.http_port, "GET", path)[0] == 404, path
    for name in ("nowhere", "plain"):
        assert act(gw, name, "pause")[0] == 404, name


# -- 7. route changes under a running rollout --------------------------------------------------------
def route_doc(gw: GatewayProcess, name: str) -> tuple[int, Any]:
    return call(gw.http_port, "GET", f"/v2/routes/{name}")


def test_a_put_or_delete_of_a_route_under_a_running_rollout_is_refused_unless_it_aborts_the_rollout(gw):
    status, original = route_doc(gw, "guard_put")
    assert status == 200 and original["split"] == [{"target": "prim", "weight": 100.0}], original
    changed = {k: v for k, v in original.items() if k != "name"} | {"split": [{"target": "prim2", "weight": 100}]}
    status, body = call(gw.http_port, "PUT", "/v2/routes/guard_put", changed)
    assert status == 409 and "under a rollout" in body["error"] and "abort_rollout" in body["error"], (status, body)
    assert route_doc(gw, "guard_put") == (200, original)
    assert summary(gw, "guard_put")["phase"] == "running"
    status, body = call(gw.http_port, "DELETE", "/v2/routes/guard_del")
    assert status == 409 and "under a rollout" in body["error"], (status, body)
    assert route_doc(gw, "guard_del")[0] == 200 and summary(gw, "guard_del")["phase"] == "running"
    assert set(burst(gw, "guard_put")) == set(burst(gw, "guard_del")) == {"prim"}

    status, body = call(gw.http_port, "PUT", "/v2/routes/guard_put?abort_rollout=true", changed)
    assert status == 200 and body["split"] == [{"target": "prim2", "weight": 100.0}], (status, body)
    assert route_doc(gw, "guard_put")[1]["split"] == body["split"]
    doc = summary(gw, "guard_put")
    assert where(doc) == ("aborted", 0, 0, False), doc
    assert entry(doc["history"][-1]) == ("abort", 0, 0, 0, "aborted", "operator", False)
    assert "abort_rollout" in doc["history"][-1]["reason"]
    assert set(burst(gw, "guard_put")) == {"prim2"}

    status, body = call(gw.http_port, "DELETE", "/v2/routes/guard_del?abort_rollout=true")
    assert status == 200, (status, body)
    assert route_doc(gw, "guard_del")[0] == 404
    assert call(gw.http_port, "GET", "/v2/routes/guard_del/rollout")[0] == 404
    assert set(burst(gw, "guard_del", per_thread=2)) == {"error:404", "error:StatusCode.NOT_FOUND"}


def test_an_invalid_put_with_abort_rollout_is_refused_without_aborting_the_rollout(gw):
    status, original = route_doc(gw, "guard_bad")
    assert status == 200 and summary(gw, "guard_bad")["phase"] == "running"
    ghost = {k: v for k, v in original.items() if k != "name"} | {"split": [{"target": "ghost", "weight": 100}]}
    status, body = call(gw.http_port, "PUT", "/v2/routes/guard_bad?abort_rollout=true", ghost)
    assert status == 400 and "ghost" in body["error"], (status, body)
    assert route_doc(gw, "guard_bad") == (200, original)
    doc = summary(gw, "guard_bad")
    assert doc["phase"] == "running" and "abort" not in decisions(doc), doc["history"]


def test_a_sighup_that_changes_a_route_under_a_running_rollout_changes_no_route(gw, config):
    text = config.read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    [hup] = [r for r in doc["routes"] if r["name"] == "guard_hup"]
    hup["split"] = [{"target": "prim2", "weight": 100}]
    doc["routes"].append({"name": "added", "split": [{"target": "prim2", "weight": 1}]})
    _, table = call(gw.http_port, "GET", "/v2/routes")
    refusals = gw.log.count("SIGHUP: routes not changed")
    config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    try:
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: gw.log.count("SIGHUP: routes not changed") > refusals, timeout=20), gw.log[-2000:]
    finally:
        config.write_text(text, encoding="utf-8")
    [line] = [ln for ln in gw.log.splitlines() if "SIGHUP: routes not changed" in ln][refusals:]
    assert "guard_hup" in line and "rollout" in line, line
    assert call(gw.http_port, "GET", "/v2/routes") == (200, table)
    assert route_doc(gw, "added")[0] == 404
    assert summary(gw, "guard_hup")["phase"] == "running"
    assert set(burst(gw, "guard_hup")) == {"prim"}


# -- 5. a restart mid-rollout ----------------------------------------------------------------------------
def test_a_restart_mid_rollout_resumes_at_the_same_step_and_phase_with_its_history(repo, tmp_path):
    state_dir = tmp_path / "state"
    config = write_config(
        tmp_path / "gateway.yaml",
        [route("resumed", "prim", candidate="good", min_comparisons=100)],
        state_dir=str(state_dir),
    )
    with GatewayProcess(repo, ["--config", str(config)]) as g:
        drive(g, "resumed", lambda s: s["step_index"] == 1)
        mirrored = burst(g, "resumed", per_thread=4).count("prim")  # at 10 %: evidence of the live step
        assert wait_until(lambda: summary(g, "resumed")["comparisons"] >= mirrored, timeout=20)
        before = summary(g, "resumed")
    assert g.proc is not None and g.proc.returncode == 0, g.log[-2000:]
    assert where(before) == ("running", 1, 10, True) and 0 < before["comparisons"] < 100, before
    assert decisions(before) == ["advance"]
    assert len(list(state_dir.glob("*.rollout.json"))) == 1

    with GatewayProcess(repo, ["--config", str(config)]) as g:
        after = summary(g, "resumed")
        assert where(after) == where(before), after
        assert after["history"] == before["history"]
        assert after["comparisons"] >= before["comparisons"], "the step's evidence was lost"
        assert "rollout resumed: resumed at step 1" in g.log, g.log[-2000:]
        m = rollout_metrics(g, "resumed")
        assert (m["step"], m["candidate_weight"], m["running"]) == (1, 10, 1), m
        seen = drive(g, "resumed", lambda s: s["phase"] == "completed")
        assert set(seen) <= {"prim", "good"} and "good" in seen, set(seen)
        doc = summary(g, "resumed")
    assert doc["history"][:1] == before["history"]
    assert [entry(h) for h in doc["history"][1:]] == [
        ("advance", 1, 2, 50, "running", "gates", False),
        ("complete", 2, 3, 100, "completed", "gates", False),
    ]


# -- 8. the webhook ------------------------------------------------------------------------------------
def test_the_webhook_gets_one_cloudevent_per_decision(gw, webhook):
    for action in ("pause", "resume", "promote", "abort"):
        assert act(gw, "hooked", action, {"reason": f"webhook test: {action}"})[0] == 200, action
    assert wait_until(lambda: len(webhook.of("hooked")) >= 4, timeout=20), webhook.of("hooked")
    events = webhook.of("hooked")
    history = summary(gw, "hooked")["history"]
    assert len(events) == len(history) == 4, events
    for event, h in zip(events, history, strict=True):
        assert event["specversion"] == "1.0"
        assert event["type"] == f"dev.onnxgate.rollout.{h['decision']}"
        assert (event["source"], event["subject"]) == ("/v2/routes/hooked/rollout", "hooked")
        assert event["datacontenttype"] == "application/json" and event["time"].endswith("Z"), event
        assert event["data"] == {"route": "hooked", "candidate": "good", **h}, (event["data"], h)
    assert [e["data"]["decision"] for e in events] == ["pause", "resume", "promote", "abort"]
    assert [e["data"]["reason"] for e in events] == [f"webhook test: {a}" for a in ("pause", "resume")] + [
        "promoted by an operator from step 0 (shadow)",
        "webhook test: abort",
    ]
    assert {ctype for ctype, _ in webhook.events} == {"application/cloudevents+json"}


def test_every_decision_of_every_route_reached_the_webhook_once_and_in_order(gw, webhook):
    """After the tests above: each route's events are its history, one for one (ids all distinct)."""
    _, table = call(gw.http_port, "GET", "/v2/routes")
    names = [r["name"] for r in table if "rollout" in r]

    def delivered(name: str) -> bool:
        history = summary(gw, name)["history"]
        return [{k: v for k, v in e["data"].items() if k not in ("route", "candidate")} for e in webhook.of(name)] == (
            history
        )

    assert wait_until(lambda: all(delivered(n) for n in names), timeout=20), [n for n in names if not delivered(n)]
    gone = [r["name"] for r in ROUTES if "rollout" in r and r["name"] not in names]
    assert set(gone) <= {"guard_del"}, gone
    for name in gone:  # deleted with ?abort_rollout=true: its abort was its last decision
        assert [e["data"]["decision"] for e in webhook.of(name)] == ["abort"]
    ids = [e["id"] for _, e in webhook.events]
    assert len(set(ids)) == len(ids)
    assert sum(len(summary(gw, n)["history"]) for n in names) + sum(len(webhook.of(n)) for n in gone) == len(ids)
