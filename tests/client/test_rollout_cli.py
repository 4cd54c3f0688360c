"""``onnxgate routes rollout NAME [pause|resume|promote|abort]`` and ``routes put|delete
--abort-rollout``, run as a subprocess against a real gateway with rollouts (README "Rollouts").

One gateway, with tokens, serves a route per test, each with its own candidate: two models that
agree (``modelzoo.build_scaled`` with the same scale), so the gates see real comparisons. The
rollouts never advance on their own (``min_comparisons`` is out of reach) except ``walk``'s, which
the test drives with traffic: every other step change is an operator's. Checked: the table and
``--json`` (the same document as ``GET /v2/routes/{name}/rollout``), each action's printed
decision, and the exit codes: 0 done, 1 refused by the gateway (404 no rollout, 409 a phase that
does not allow the action or a route change under a running rollout, 403 without the admin
scope), with the gateway's message and a hint on stderr, 2 for options that do not go together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

import auth_helpers
import modelzoo
from gateway import GatewayProcess, wait_until

NEVER = 1_000_000  # min_comparisons no test reaches: only an operator moves these rollouts
CANDIDATES = {"status": "cand_status", "ops": "cand_ops", "guarded": "cand_guarded", "gone": "cand_gone",
              "walk": "cand_walk", "refused": "cand_refused"}


def _rollout(candidate: str, **overrides) -> dict:
    doc = {"candidate": candidate, "steps": ["shadow", 10, 50, 100], "min_dwell_s": 0.2, "max_step_s": 600,
           "min_comparisons": NEVER, "confidence": 0.95,
           "gates": {"agreement_min": 0.9, "abs_diff_p99_max": 0.05, "error_rate_max": 0.05}}
    return doc | overrides


def _routes() -> list[dict]:
    routes = [{"name": name, "split": [{"target": "prim", "weight": 100}], "rollout": _rollout(candidate)}
              for name, candidate in CANDIDATES.items() if name != "walk"]
    # walk: passes its gates after 59 candidate requests (0 errors: the error rate's 95 % upper bound <= 0.05)
    routes.append({"name": "walk", "split": [{"target": "prim", "weight": 100}],
                   "rollout": _rollout("cand_walk", steps=["shadow", 100], min_comparisons=20,
                                       gates={"agreement_min": 0.9, "error_rate_max": 0.05})})
    routes.append({"name": "plain", "split": [{"target": "prim", "weight": 100}]})
    return routes


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("rollout_cli_repo")
    modelzoo.build_scaled(repo, "prim", scale=2.0)
    for candidate in CANDIDATES.values():
        modelzoo.build_scaled(repo, candidate, scale=2.0)
    return repo


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    return auth_helpers.make_tokens()


@pytest.fixture(scope="module")
def token_files(tokens, tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("rollout_cli_tokens")
    return {name: str(auth_helpers.write_token_file(directory, name, t)) for name, t in tokens.items()}


@pytest.fixture(scope="module")
def gw(repo, tokens, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_cli")
    extra = {"rollouts": {"state_dir": str(root / "state"), "evaluate_every_s": 0.1}, "routes": _routes()}
    config = auth_helpers.write_security_config(root, tokens, extra)
    with GatewayProcess(repo, ["--config", str(config)]) as gw:
        yield gw


def cli(gw: GatewayProcess, token_file: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m onnxgate routes ARGS --url ... --token-file ...`` (``ONNXGATE_TOKEN`` unset)."""
    env = {k: v for k, v in os.environ.items() if k != "ONNXGATE_TOKEN"}
    argv = [sys.executable, "-m", "onnxgate", "routes", *args, "--url", f"http://{gw.http_url}",
            "--token-file", token_file]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, input=stdin)


def http_get(gw: GatewayProcess, tokens: dict[str, str], path: str) -> dict:
    """``GET path`` with the read token, straight to the gateway."""
    request = urllib.request.Request(f"http://{gw.http_url}{path}",
                                     headers={"Authorization": f"Bearer {tokens['read']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def infer(gw: GatewayProcess, tokens: dict[str, str], route: str, n: int) -> None:
    """``n`` requests of 2 rows to ``route``; each answer is x * 2, whoever answered."""
    client = httpclient.InferenceServerClient(gw.http_url)
    headers = {"Authorization": f"Bearer {tokens['infer']}"}
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = rng.normal(0, 1, (2, 4)).astype(np.float32)
        inp = httpclient.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(route, [inp], headers=headers)
        assert np.allclose(result.as_numpy("y"), x * 2)


def table(text: str, header: list[str]) -> list[list[str]]:
    """The rows of the table under ``header`` in ``text``, cut at the header's column starts."""
    lines = text.split("\n")
    (at,) = [i for i, line in enumerate(lines) if line.split() == header]
    starts = [lines[at].index(h) for h in header[1:]]
    rows = []
    for line in lines[at + 1:]:
        if not line.strip():
            break
        rows.append([line[a:b].strip() for a, b in zip([0, *starts], [*starts, None], strict=True)])
    return rows


def refused(out: subprocess.CompletedProcess, status: int) -> str:
    """The error line of a refusal with ``status`` (exit 1, nothing on stdout)."""
    assert (out.returncode, out.stdout) == (1, ""), out
    first = out.stderr.split("\n")[0]
    assert first.startswith(f"onnxgate: {status}: "), out
    return first


GATES_HEADER = ["GATE", "VALUE", "BOUND", "THRESHOLD", "VERDICT", "SAMPLES"]
DECISIONS_HEADER = ["TIME", "DECISION", "STEPS", "WEIGHT", "BY", "REASON"]


def test_show_the_rollout_table_and_json(gw, tokens, token_files):
    infer(gw, tokens, "status", 40)
    read = token_files["read"]
    assert wait_until(lambda: http_get(gw, tokens, "/v2/routes/status/rollout")["comparisons"] >= 40, timeout=30)
    out = cli(gw, read, "rollout", "status")
    assert out.returncode == 0 and out.stderr == "", out
    text = out.stdout
    assert text.startswith("route 'status': candidate 'cand_status', running at step 0 (shadow) of "
                           "[shadow, 10, 50, 100]\n"), text
    assert "candidate weight 0 %, mirroring on" in text
    assert f"40 of {NEVER} comparisons, candidate 40 requests / 0 errors" in text, text
    gates = {row[0]: row for row in table(text, GATES_HEADER)}
    assert list(gates) == ["agreement", "abs_diff_p99", "error_rate"]
    # 80 rows all agreeing: 95 % lower bound 0.05 ** (1 / 80) = 0.963 >= 0.9
    assert gates["agreement"] == ["agreement", "1", "0.9632", ">= 0.9", "pass", "80 rows"]
    # the same models: no difference, but 40 comparisons are too few for a p99 upper bound (299 at 95 %)
    assert gates["abs_diff_p99"] == ["abs_diff_p99", "0", "-", "<= 0.05", "pending", "40 comparisons"]
    # 0 errors in 40: upper bound 1 - 0.05 ** (1 / 40) = 0.0722 > 0.05
    assert gates["error_rate"] == ["error_rate", "0", "0.07216", "<= 0.05", "pending", "40 requests"]
    assert "gates (one-sided 95 % bounds):" in text and "decisions: none yet" in text

    out = cli(gw, read, "rollout", "status", "--json")
    assert out.returncode == 0 and out.stderr == "", out
    doc, direct = json.loads(out.stdout), http_get(gw, tokens, "/v2/routes/status/rollout")
    for changing in ("elapsed_s",):
        doc.pop(changing), direct.pop(changing)
    assert doc == direct
    assert doc["route"] == "status" and doc["candidate"] == "cand_status" and doc["phase"] == "running"


def test_pause_resume_promote_abort(gw, token_files):
    ops = token_files["ops"]
    out = cli(gw, ops, "rollout", "ops", "pause", "--reason", "looking at the dashboards")
    assert out.returncode == 0 and out.stderr == "", out
    assert out.stdout.strip() == ("rollout of route 'ops': pause, step 0 -> 0, candidate weight 0 %, now paused: "
                                  "looking at the dashboards")
    out = cli(gw, ops, "rollout", "ops", "pause")
    line = refused(out, 409)
    assert "rollout of route 'ops' is paused: cannot pause (only when running or holding)" in line, line

    out = cli(gw, ops, "rollout", "ops", "resume", "--json")
    assert out.returncode == 0, out
    decision = json.loads(out.stdout)
    assert (decision["decision"], decision["phase"], decision["by"]) == ("resume", "running", "operator")

    out = cli(gw, ops, "rollout", "ops", "promote")
    assert out.returncode == 0, out
    assert out.stdout.startswith("rollout of route 'ops': promote, step 0 -> 1, candidate weight 10 %, now running: "
                                 "promoted by an operator from step 0 (shadow)"), out.stdout
    out = cli(gw, ops, "rollout", "ops")
    assert out.returncode == 0 and "running at step 1 (10 %)" in out.stdout and "candidate weight 10 %" in out.stdout
    decisions = table(out.stdout, DECISIONS_HEADER)
    assert [(d[1], d[2], d[3], d[4]) for d in decisions] == [
        ("pause", "0 -> 0", "0 %", "operator"), ("resume", "0 -> 0", "0 %", "operator"),
        ("promote", "0 -> 1", "10 %", "operator")]
    assert decisions[0][5] == "looking at the dashboards"
    assert all(len(d[0]) == 20 and d[0].endswith("Z") for d in decisions), decisions

    out = cli(gw, ops, "rollout", "ops", "promote", "--full", "--json")
    assert out.returncode == 0, out
    decision = json.loads(out.stdout)
    assert (decision["decision"], decision["phase"], decision["weight"], decision["to_step"]) == (
        "promote", "completed", 100, 3)
    out = cli(gw, ops, "rollout", "ops", "abort", "--reason", "too late")
    assert "cannot abort" in refused(out, 409)
    out = cli(gw, ops, "rollout", "ops", "abort", "--json")
    assert out.returncode == 1 and out.stdout == "" and json.loads(out.stderr)["error"].startswith("409: "), out


def test_more_decisions_than_shown(gw, token_files):
    ops = token_files["ops"]
    for _ in range(4):
        for action in ("pause", "resume"):
            assert cli(gw, ops, "rollout", "guarded", action).returncode == 0
    out = cli(gw, ops, "rollout", "guarded")
    assert out.returncode == 0, out
    assert "decisions (the last 5 of 8; --json has all):" in out.stdout, out.stdout
    assert [d[1] for d in table(out.stdout, DECISIONS_HEADER)] == ["resume", "pause", "resume", "pause", "resume"]
    assert len(json.loads(cli(gw, ops, "rollout", "guarded", "--json").stdout)["history"]) == 8


def test_a_route_change_under_a_running_rollout_is_409_unless_aborted(gw, token_files, tmp_path):
    ops = token_files["ops"]
    route = tmp_path / "gone.yaml"
    route.write_text("split:\n  - {target: prim, weight: 100}\n")
    out = cli(gw, ops, "put", "gone", "--file", str(route))
    line = refused(out, 409)
    assert "route 'gone' is under a rollout" in line and "abort_rollout=true" in line, line
    hint = out.stderr.strip().split("\n")[1]
    assert hint == ("onnxgate: hint: route 'gone' is under a rollout: abort it (onnxgate routes rollout gone abort) "
                    "or add --abort-rollout to put anyway"), out.stderr
    out = cli(gw, ops, "delete", "gone", "--json")
    assert out.returncode == 1 and "--abort-rollout" in json.loads(out.stderr)["hint"], out
    assert cli(gw, ops, "rollout", "gone", "--json").returncode == 0, "a refused put left the rollout alone"

    out = cli(gw, ops, "put", "gone", "--file", str(route), "--abort-rollout", "--json")
    assert out.returncode == 0, out
    assert json.loads(out.stdout) == {"name": "gone", "split": [{"target": "prim", "weight": 100.0}]}
    line = refused(cli(gw, ops, "rollout", "gone"), 404)
    assert "route 'gone' has no rollout" in line, line
    out = cli(gw, ops, "delete", "gone", "--abort-rollout")
    assert out.returncode == 0 and out.stdout.strip() == "route 'gone' deleted", out


def test_no_rollout_is_404_and_unusable_options_exit_2(gw, token_files):
    ops = token_files["ops"]
    for name, message in (("plain", "route 'plain' has no rollout"), ("nosuch", "unknown route 'nosuch'")):
        line = refused(cli(gw, ops, "rollout", name), 404)
        assert message in line, line
    refused(cli(gw, ops, "rollout", "plain", "pause"), 404)
    for args, needle in ((["status", "pause", "--full"], "--full goes with promote only"),
                         (["status", "--reason", "x"], "--reason and --full go with an action"),
                         (["status", "--full"], "--reason and --full go with an action")):
        out = cli(gw, ops, "rollout", *args)
        assert (out.returncode, out.stdout) == (2, "") and needle in out.stderr, out
    out = cli(gw, ops, "rollout", "status", "skip")
    assert out.returncode == 2 and "invalid choice: 'skip'" in out.stderr, out
    assert json.loads(cli(gw, ops, "rollout", "status", "--json").stdout)["phase"] == "running", "nothing was sent"


def test_actions_need_the_admin_scope(gw, token_files):
    out = cli(gw, token_files["read"], "rollout", "refused", "abort")
    refused(out, 403)
    assert "'admin'" in out.stderr.strip().split("\n")[1], out
    out = cli(gw, token_files["admin"], "rollout", "refused", "pause", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["phase"] == "paused", out


def test_a_walk_by_the_gates_shows_in_the_decisions(gw, tokens, token_files):
    infer(gw, tokens, "walk", 70)
    read = token_files["read"]
    assert wait_until(lambda: http_get(gw, tokens, "/v2/routes/walk/rollout")["phase"] == "completed", timeout=30)
    out = cli(gw, read, "rollout", "walk")
    assert out.returncode == 0, out
    assert "completed at step 1 (100 %)" in out.stdout and "candidate weight 100 %, mirroring off" in out.stdout
    (decision,) = table(out.stdout, DECISIONS_HEADER)
    assert decision[1:5] == ["complete", "0 -> 1", "100 %", "gates"], decision
    assert decision[5].startswith("step 0 (shadow) passed after "), decision
    infer(gw, tokens, "walk", 1)  # the candidate answers alone now
