"""Rollouts under ``--workers 2``: worker 0 judges on both workers' evidence, every worker serves
its step, and an operator's action is applied wherever it arrives (README "Rollouts")."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import modelzoo
from gateway import GatewayProcess, wait_until

BODY = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))}]})


def _call(gw: GatewayProcess, method: str, path: str, body: str = "") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)  # a new connection: either worker
    try:
        conn.request(method, path, body or None)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


def test_workers_share_one_rollout(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "v1", scale=2.0)
    modelzoo.build_scaled(repo, "v2", scale=2.0)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""
rollouts: {{state_dir: {tmp_path / 'state'}, evaluate_every_s: 0.2}}
routes:
  - name: fraud
    split: [{{target: v1, weight: 100}}]
    rollout:
      candidate: v2
      steps: [shadow, 10, 50, 100]
      min_dwell_s: 0.5
      min_comparisons: 150
      gates: {{agreement_min: 0.9, error_rate_max: 0.05}}
""", encoding="utf-8")
    with GatewayProcess(repo, ["--config", str(config), "--workers", "2"]) as gw:
        # paused at once: the action reaches one worker, and the judging one applies it
        status, decision = _call(gw, "POST", "/v2/routes/fraud/rollout/pause", '{"reason": "hold on"}')
        assert status == 200 and decision["decision"] == "pause", decision
        assert wait_until(  # each on a new connection: every worker answers the same
            lambda: all(_call(gw, "GET", "/v2/routes/fraud/rollout")[1]["phase"] == "paused" for _ in range(6)), 5)
        status, refused = _call(gw, "POST", "/v2/routes/fraud/rollout/pause")
        assert status == 409 and "paused" in refused["error"], refused
        assert _call(gw, "POST", "/v2/routes/fraud/rollout/resume")[0] == 200

        answered: dict[str, int] = {}
        failed = []

        def completed() -> bool:
            for _ in range(50):
                status, reply = _call(gw, "POST", "/v2/models/fraud/infer", BODY)
                if status != 200:
                    failed.append((status, reply))
                else:
                    answered[reply["model_name"]] = answered.get(reply["model_name"], 0) + 1
            return _call(gw, "GET", "/v2/routes/fraud/rollout")[1]["phase"] == "completed"

        assert wait_until(completed, timeout=90, interval=0.01)
        assert failed == []
        assert answered.get("v1", 0) > 0 and answered.get("v2", 0) > 0
        # the other worker follows within one judgement: every answer, from either, is the same
        def everywhere(phase: str) -> bool:
            return all(_call(gw, "GET", "/v2/routes/fraud/rollout")[1]["phase"] == phase for _ in range(6))

        assert wait_until(lambda: everywhere("completed"), timeout=10)
        history = _call(gw, "GET", "/v2/routes/fraud/rollout")[1]["history"]
        assert [d["decision"] for d in history] == ["pause", "resume", "advance", "advance", "complete"]
        # every worker serves the completed split: the candidate alone
        replies = [_call(gw, "POST", "/v2/models/fraud/infer", BODY)[1]["model_name"] for _ in range(20)]
        assert set(replies) == {"v2"}


def test_a_rollout_put_into_a_gateway_started_without_one_is_judged(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "v1", scale=2.0)
    modelzoo.build_scaled(repo, "v2", scale=2.0)
    config = tmp_path / "gateway.yaml"
    config.write_text("rollouts: {evaluate_every_s: 0.1}\n", encoding="utf-8")
    with GatewayProcess(repo, ["--config", str(config)]) as gw:
        route = {"split": [{"target": "v1", "weight": 1}],
                 "rollout": {"candidate": "v2", "steps": ["shadow", 100], "min_dwell_s": 0.2, "min_comparisons": 20,
                             "gates": {"agreement_min": 0.5}}}
        assert _call(gw, "PUT", "/v2/routes/late", json.dumps(route))[0] == 200

        def completed() -> bool:
            for _ in range(10):
                assert _call(gw, "POST", "/v2/models/late/infer", BODY)[0] == 200
            return _call(gw, "GET", "/v2/routes/late/rollout")[1]["phase"] == "completed"

        assert wait_until(completed, timeout=30, interval=0.01)
