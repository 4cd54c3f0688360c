"""Rollouts (issue 18): a candidate walked from shadow through live weights to 100 %, or back.

The engine driven with a fake clock and synthetic evidence (seeded): every step's decision,
failures and timeouts, operator actions, the state file across a restart, and the config's
error messages. Nothing here reads the wall clock."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from onnxgate.core.traffic.rollout import HISTORY_KEEP, Rollout, RolloutConflict
from onnxgate.core.traffic.rollout_config import RolloutConfig
from onnxgate.core.traffic.rollout_gates import Evidence
from onnxgate.core.traffic.rollout_state import StateStore
from onnxgate.core.traffic.routes import Target
from onnxgate.errors import Conflict, InvalidInput

WHERE = "route 'fraud' rollout"
V1, V2 = Target("fraud_v1"), Target("fraud_v2")
BASE = ((V1, 100.0),)
GATES = {"agreement_min": 0.99, "abs_diff_p99_max": 0.05, "error_rate_max": 0.001, "latency_p99_ratio_max": 1.3}


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def config(**overrides: Any) -> RolloutConfig:
    doc = {"candidate": "fraud_v2", "min_dwell_s": 60, "max_step_s": 600, "min_comparisons": 500, "gates": GATES}
    doc.update(overrides)
    return RolloutConfig.from_dict(doc, WHERE)


def traffic(n: int, rng: random.Random, agree: float = 1.0, error_rate: float = 0.0, ratio: float = 1.0) -> Evidence:
    """``n`` mirrored requests: each compared (4 argmax rows) and counted as a candidate request."""
    e = Evidence()
    for _ in range(n):
        latency = rng.lognormvariate(-5, 0.3)
        rows_agree = sum(rng.random() < agree for _ in range(4))
        e.add_comparison(4, rows_agree, rng.random() * 0.002, latency, latency * ratio * rng.uniform(0.95, 1.05))
        e.add_candidate(rng.random() >= error_rate)
    return e


def run(
    rollout: Rollout, clock: Clock, rng: random.Random, ticks: int, n: int = 1000, every_s: float = 20, **kw: Any
) -> list[dict]:
    """``ticks`` rounds of: ``n`` requests' evidence, ``every_s`` seconds, a tick."""
    decisions = []
    for _ in range(ticks):
        rollout.add(traffic(n, rng, **kw))
        clock.t += every_s
        if (d := rollout.tick()) is not None:
            decisions.append(d)
    return decisions


def test_an_agreeing_candidate_walks_every_step_to_completion():
    clock, rng = Clock(), random.Random(1)
    r = Rollout("fraud", config(), clock)
    assert (r.phase, r.step_index, r.candidate_weight, r.mirroring, r.active) == ("running", 0, 0, True, True)
    assert r.split(BASE) == BASE  # shadow: no live weight
    weights, splits = [], []
    decisions = []
    for _ in range(40):
        r.add(traffic(1000, rng))
        clock.t += 20
        if (d := r.tick()) is not None:
            decisions.append(d)
            weights.append(r.candidate_weight)
            splits.append(r.split(BASE))
        if r.phase == "completed":
            break
    # passing the 50 % step completes: at 100 % the candidate is the primary, nothing is left to compare
    assert [d["decision"] for d in decisions] == ["advance", "advance", "advance", "complete"]
    assert [(d["from_step"], d["to_step"]) for d in decisions] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert weights == [d["weight"] for d in decisions] == [5, 25, 50, 100]
    assert splits[1] == ((V1, 75.0), (V2, 25.0)) and splits[3] == ((V2, 100.0),)
    assert r.split(BASE) == ((V2, 100.0),) and not r.mirroring and not r.active
    # each step dwelt min_dwell_s: 3 ticks of 1000 requests (the error-rate gate needs ~3000)
    times = [clock.t - 60 * 4 + 60 * (i + 1) for i in range(4)]
    assert [d["time"] for d in decisions] == times
    for d in decisions:
        assert d["by"] == "gates" and not d["alert"] and len(d["gates"]) == 4
        assert all(g["verdict"] == "pass" for g in d["gates"])
        assert "passed after 60 s" in d["reason"] and "error_rate 0 over 3000 requests" in d["reason"]
    assert r.history == decisions and r.tick() is None


def test_a_disagreeing_candidate_fails_in_shadow_and_never_gets_weight():
    clock, rng = Clock(), random.Random(2)
    r = Rollout("fraud", config(), clock)
    decisions = run(r, clock, rng, ticks=20, agree=0.9)
    assert [d["decision"] for d in decisions] == ["rollback"]  # at once, before min_dwell_s
    (d,) = decisions
    assert d["time"] - (clock.t - 20 * 20) == 20 and d["from_step"] == 0 and d["weight"] == 0 and d["alert"]
    assert "agreement" in d["reason"] and "agreement_min 0.99" in d["reason"] and "upper bound" in d["reason"]
    assert r.phase == "rolled_back" and r.candidate_weight == 0 and not r.mirroring
    assert r.split(BASE) == BASE
    before = r.evidence.comparisons
    r.add(traffic(10, rng))
    assert r.evidence.comparisons == before  # not mirroring: ignored


def test_errors_at_the_25_percent_step_roll_back_on_the_next_tick():
    clock, rng = Clock(), random.Random(3)
    r = Rollout("fraud", config(), clock)
    run(r, clock, rng, ticks=6)
    assert (r.step_index, r.candidate_weight) == (2, 25)
    r.add(traffic(1000, rng, error_rate=0.02))
    clock.t += 1
    d = r.tick()
    assert d is not None and d["decision"] == "rollback" and (d["from_step"], d["weight"]) == (2, 0)
    assert "error_rate" in d["reason"] and "error_rate_max 0.001" in d["reason"]
    assert {g["name"]: g["verdict"] for g in d["gates"]}["error_rate"] == "fail"
    assert r.phase == "rolled_back" and r.split(BASE) == BASE
    assert [h["decision"] for h in r.history] == ["advance", "advance", "rollback"]


def test_too_little_traffic_holds_at_max_step_s_then_advances_when_evidence_arrives():
    clock, rng = Clock(), random.Random(4)
    r = Rollout("fraud", config(), clock)
    decisions = run(r, clock, rng, ticks=40, n=10)  # 400 comparisons in 800 s
    assert [d["decision"] for d in decisions] == ["hold"]
    (d,) = decisions
    assert d["time"] == clock.t - 800 + 600 and d["alert"] and d["weight"] == 0
    assert d["reason"].startswith("too little evidence after 600 s") and "of 500 comparisons" in d["reason"]
    assert r.phase == "holding" and r.mirroring and r.candidate_weight == 0
    clock.t += 3600
    assert r.tick() is None  # holding: no second alert
    assert run(r, clock, rng, ticks=3) and r.history[-1]["decision"] == "advance"
    assert (r.phase, r.step_index, r.candidate_weight) == ("running", 1, 5)


def test_a_timeout_hold_that_then_fails_rolls_back():
    clock, rng = Clock(), random.Random(5)
    r = Rollout("fraud", config(), clock)
    run(r, clock, rng, ticks=31, n=5)
    assert r.phase == "holding"
    r.add(traffic(500, rng, agree=0.5))
    assert r.tick()["decision"] == "rollback" and r.phase == "rolled_back"


def test_on_fail_hold_stays_until_an_operator_resumes_with_fresh_evidence():
    clock, rng = Clock(), random.Random(6)
    r = Rollout("fraud", config(on_fail="hold"), clock)
    run(r, clock, rng, ticks=3)
    d = run(r, clock, rng, ticks=1, ratio=3.0)[0]
    assert d["decision"] == "hold" and d["alert"] and "latency_p99_ratio" in d["reason"]
    assert (r.phase, r.step_index, r.candidate_weight) == ("holding", 1, 5)
    assert run(r, clock, rng, ticks=10) == []  # good evidence later does not lift a failed gate
    r.resume("latency fixed")
    assert r.phase == "running" and r.evidence == Evidence() and r.step_started == clock.t
    assert [d["decision"] for d in run(r, clock, rng, ticks=3)] == ["advance"]


def test_pause_resume_promote_abort():
    clock, rng = Clock(), random.Random(7)
    r = Rollout("fraud", config(), clock)
    d = r.pause("change freeze")
    assert (d["decision"], d["by"], d["reason"], r.phase) == ("pause", "operator", "change freeze", "paused")
    assert run(r, clock, rng, ticks=10) == [] and r.mirroring  # no judging, evidence still gathers
    assert r.evidence.comparisons == 10_000
    with pytest.raises(RolloutConflict, match="paused: cannot pause") as info:
        r.pause()
    assert isinstance(info.value, Conflict)  # 409 at the API
    clock.t += 5
    r.resume()
    assert r.phase == "running" and r.step_started == clock.t and r.evidence.comparisons == 10_000
    clock.t += 59
    assert r.tick() is None  # the dwell restarted at resume
    clock.t += 1
    assert r.tick()["decision"] == "advance"

    d = r.promote()
    assert (d["decision"], d["from_step"], d["to_step"], d["weight"]) == ("promote", 1, 2, 25)
    assert r.evidence == Evidence() and r.phase == "running"
    d = r.promote(full=True)
    assert (d["phase"], d["weight"], r.candidate_weight) == ("completed", 100, 100)
    for action in (r.promote, r.abort, r.resume, r.pause):
        with pytest.raises(RolloutConflict, match="completed"):
            action()

    r = Rollout("fraud", config(), clock)
    run(r, clock, rng, ticks=1, agree=0.5)
    assert r.phase == "rolled_back"
    with pytest.raises(RolloutConflict):
        r.promote()
    d = r.resume()
    assert (d["to_step"], r.phase, r.mirroring, r.evidence) == (0, "running", True, Evidence())
    d = r.abort("candidate withdrawn")
    assert (r.phase, r.candidate_weight, r.mirroring, r.active) == ("aborted", 0, False, False)
    assert d["reason"] == "candidate withdrawn" and r.split(BASE) == BASE
    with pytest.raises(RolloutConflict, match="aborted"):
        r.resume()


def test_split_scales_the_base_into_the_rest():
    clock = Clock()
    r = Rollout("fraud", config(steps=[10, 100]), clock)
    a, b = Target("a"), Target("b", "3")
    assert r.split(((a, 9.0), (b, 1.0))) == ((a, 81.0), (b, 9.0), (V2, 10.0))
    assert r.split(((a, 1.0), (V2, 1.0))) == ((a, 45.0), (V2, 55.0))  # a candidate already there: one entry
    r.promote()  # into the 100 % step: completed, the candidate alone
    assert r.candidate_weight == 100 and r.phase == "completed"
    assert r.split(((a, 9.0), (b, 1.0))) == ((V2, 100.0),)


def test_history_is_bounded():
    r = Rollout("fraud", config(), Clock())
    for _ in range(HISTORY_KEEP):
        r.pause()
        r.resume()
    assert len(r.history) == len(r.to_state()["history"]) == HISTORY_KEEP


def test_summary():
    clock, rng = Clock(), random.Random(8)
    r = Rollout("fraud", config(), clock)
    run(r, clock, rng, ticks=4)
    s = orjson.loads(orjson.dumps(r.summary()))
    assert s["route"] == "fraud" and s["candidate"] == "fraud_v2" and s["phase"] == "running"
    assert s["steps"] == ["shadow", 5, 25, 50, 100] and (s["step_index"], s["candidate_weight"]) == (1, 5)
    assert s["elapsed_s"] == 20 and s["comparisons"] == 1000 and s["min_comparisons"] == 500
    assert (s["min_dwell_s"], s["max_step_s"]) == (60, 600)
    assert [g["name"] for g in s["gates"]] == ["agreement", "abs_diff_p99", "error_rate", "latency_p99_ratio"]
    assert [h["decision"] for h in s["history"]] == ["advance"]


def test_state_survives_a_restart_through_the_state_store(tmp_path: Path):
    clock, rng = Clock(), random.Random(9)
    r = Rollout("fraud", config(), clock)
    run(r, clock, rng, ticks=7)  # two steps passed, one tick into the third
    assert (r.step_index, r.evidence.comparisons) == (2, 1000)
    store = StateStore(tmp_path / "rollouts")
    store.save("fraud", r.to_state())
    assert [p.name for p in (tmp_path / "rollouts").iterdir() if p.name.startswith(".tmp")] == []

    state = store.load("fraud")
    again = Rollout("fraud", config(), clock, state=state)
    assert again.resumed and again.matches(state)
    assert (again.phase, again.step_index, again.step_started) == (r.phase, r.step_index, r.step_started)
    assert again.evidence == r.evidence and again.history == r.history
    assert again.to_state() == r.to_state()
    # both go on alike
    ev = traffic(2000, rng)
    for x in (r, again):
        x.add(ev.copy())
    clock.t += 60
    first, second = r.tick(), again.tick()
    assert first == second and first is not None and first["decision"] == "advance"

    other = config(candidate="fraud_v3")
    fresh = Rollout("fraud", other, clock, state=state)
    assert not fresh.matches(state) and not fresh.resumed and fresh.step_index == 0
    assert not Rollout("fraud", config(steps=[10, 100]), clock, state=state).resumed
    assert not Rollout("fraud", config(), clock, state={**state, "phase": "sideways"}).resumed
    assert not Rollout("fraud", config(), clock, state={**state, "evidence": {"rows": 1}}).resumed

    store.delete("fraud")
    assert store.load("fraud") is None and store.routes() == []
    store.delete("fraud")  # nothing to delete is fine


def test_state_store_file_names_are_safe_and_distinct(tmp_path: Path):
    store = StateStore(tmp_path)
    names = ["../../etc/passwd", "..", ".", "a/b", "A/B", "a_b", "ä b\x00c", "x" * 1000, ""]
    for i, name in enumerate(names):
        store.save(name, {"i": i})
    files = sorted(tmp_path.iterdir())
    assert len(files) == len(names) and all(f.parent == tmp_path and len(f.name) < 200 for f in files)
    assert [store.load(n) for n in names] == [{"i": i} for i in range(len(names))]
    assert sorted(store.routes()) == sorted(names)


def test_a_corrupt_state_file_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    store = StateStore(tmp_path)
    store.save("fraud", {"ok": True})
    for content in (b"{not json", b"[1, 2]", b'{"route": "other", "state": {}}'):
        store.path("fraud").write_bytes(content)
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            assert store.load("fraud") is None
        assert "fraud" in caplog.text
    assert store.load("never saved") is None


def test_config_defaults_and_round_trip():
    c = RolloutConfig.from_dict({"candidate": "fraud_v2:2", "gates": {"error_rate_max": 0.01}}, WHERE)
    assert (c.candidate, c.steps, c.min_dwell_s, c.max_step_s) == (
        Target("fraud_v2", "2"),
        (0, 5, 25, 50, 100),
        60,
        3600,
    )
    assert (c.min_comparisons, c.confidence, c.on_fail, c.on_timeout, c.webhook) == (
        500,
        0.95,
        "rollback",
        "hold",
        None,
    )
    full = {
        "candidate": "fraud_v2",
        "steps": ["shadow", 1, 100],
        "min_dwell_s": 0,
        "max_step_s": 10,
        "min_comparisons": 1,
        "confidence": 0.99,
        "gates": GATES,
        "on_fail": "hold",
        "on_timeout": "rollback",
        "webhook": "https://alerts.local/rollouts",
        "mlflow": {"promote_alias": "champion", "rollback_tag": "bad"},
    }
    c = RolloutConfig.from_dict(full, WHERE)
    assert c.to_dict() == full and RolloutConfig.from_dict(c.to_dict(), WHERE) == c
    assert (c.steps, c.mlflow_promote_alias, c.mlflow_rollback_tag) == ((0, 1, 100), "champion", "bad")
    with pytest.raises(InvalidInput, match="already a target of the split"):
        c.check_split(((V2, 1.0),), WHERE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"candidat": "x"}, r"unknown key\(s\) \['candidat'\]"),
        ({"candidate": None}, "candidate is required"),
        ({"candidate": "a:b:c"}, "target must be 'model' or 'model:version'"),
        ({"steps": [5, "shadow", 100]}, r"steps\[1\]: 'shadow' may only be the first step"),
        ({"steps": ["shadow", 50, 25, 100]}, "strictly increasing"),
        ({"steps": ["shadow", 50]}, "the last step must be 100"),
        ({"steps": [0, 100]}, r"steps\[0\] must be 'shadow' or an integer percent 1..100, got 0"),
        ({"steps": [5, 101]}, r"steps\[1\] must be"),
        ({"steps": [True, 100]}, r"steps\[0\] must be"),
        ({"steps": []}, "steps must be a non-empty list"),
        ({"min_dwell_s": -1}, "min_dwell_s must be >= 0"),
        ({"min_dwell_s": "60"}, "min_dwell_s must be a finite number"),
        ({"max_step_s": 30}, r"max_step_s must be positive and >= min_dwell_s \(60.0\)"),
        ({"min_comparisons": 0}, "min_comparisons must be an integer >= 1"),
        ({"confidence": 1}, "confidence must be between 0.5 and 1"),
        ({"confidence": 0.5}, "confidence must be between 0.5 and 1"),
        ({"gates": {}}, "gates must set at least one of"),
        ({"gates": None}, "gates must be a mapping"),
        ({"gates": {"agreement": 0.9}}, r"gates: unknown key\(s\) \['agreement'\]"),
        ({"gates": {"agreement_min": 1.5}}, "gates.agreement_min must be within 0..1, got 1.5"),
        ({"gates": {"abs_diff_p99_max": -0.1}}, "gates.abs_diff_p99_max must be >= 0"),
        ({"gates": {"error_rate_max": 2}}, "gates.error_rate_max must be within 0..1"),
        ({"gates": {"latency_p99_ratio_max": 0}}, "gates.latency_p99_ratio_max must be > 0"),
        ({"gates": {"latency_p99_ratio_max": float("inf")}}, "latency_p99_ratio_max must be a finite number"),
        ({"on_fail": "explode"}, "on_fail must be 'rollback' or 'hold', got 'explode'"),
        ({"on_timeout": "rollforward"}, "on_timeout must be 'rollback' or 'hold'"),
        ({"webhook": "ftp://alerts.local"}, "webhook must be an http\\(s\\) URL"),
        ({"webhook": "http://"}, "webhook must be an http\\(s\\) URL"),
        ({"mlflow": {"alias": "x"}}, "mlflow must be {promote_alias, rollback_tag}"),
        ({"mlflow": {"promote_alias": ""}}, "mlflow.promote_alias must be a non-empty string"),
    ],
)
def test_config_errors_name_the_route_and_the_field(change: dict, message: str):
    doc = {"candidate": "fraud_v2", "gates": GATES, **change}
    with pytest.raises(InvalidInput, match=message) as info:
        RolloutConfig.from_dict(doc, WHERE)
    assert info.value.message.startswith(WHERE)


def test_a_rollout_section_that_is_not_a_mapping():
    with pytest.raises(InvalidInput, match=f"^{WHERE}: rollout must be a mapping"):
        RolloutConfig.from_dict(["fraud_v2"], WHERE)  # type: ignore[arg-type]
