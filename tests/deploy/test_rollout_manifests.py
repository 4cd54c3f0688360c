"""The rollout manifests (deploy/kubernetes/rollouts) and the rollouts' state volume, checked offline.

External gates (README "Rollouts", docs/rollouts-promql.md): an Argo Rollouts AnalysisTemplate and
Flagger MetricTemplates with a Canary. They go through the openAPIV3Schema of their published CRDs
(tests/deploy/schemas, read closed as in test_observability_manifests), each validator shown to
reject a broken manifest, and through what the controllers check beyond the schema (Argo's metric
limits, every template argument declared; Flagger's templates and variables all given). Their
PromQL must parse (promtool check rules) and, evaluated by promtool on synthetic series, give the
verdicts the gateway's own gates (rollout_gates.evaluate) give on the same evidence. Every metric
they read is one the gateway exports, and the abs-diff edge they name is a bucket edge.

The state volume: every pod that runs the gateway with the shared config (Deployment, Knative
Service, KServe ServingRuntime) mounts a writable volume of its own at rollouts.state_dir (the
root filesystem is read-only), never a claim its replicas would share.
"""

from __future__ import annotations

import copy
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString
from test_observability import _run as promtool
from test_observability import exported, metric_names
from test_observability_manifests import K8S_VERSION, _docs, _offline, by_kind_and_name, crd_errors

from onnxgate.core.metrics import _ABS_DIFF_BUCKETS, _EXEC_BUCKETS, Metrics
from onnxgate.core.traffic.rollout_config import Gates
from onnxgate.core.traffic.rollout_gates import Evidence, evaluate
from onnxgate.core.traffic.rollouts import Rollouts

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
ROLLOUTS = K8S / "rollouts"


@cache
def documents() -> dict[str, dict]:
    """Every manifest under rollouts/, by ``kind/name``."""
    return by_kind_and_name(ROLLOUTS)


def _doc(kind: str, name: str) -> dict:
    return copy.deepcopy(documents()[f"{kind}/{name}"])


def analysis() -> dict:
    return _doc("AnalysisTemplate", "onnxgate-rollout-gates")


def canary() -> dict:
    return _doc("Canary", "onnxgate")


def metric_templates() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents().values() if d["kind"] == "MetricTemplate"}


# -- the CRD schemas ---------------------------------------------------------------------------------


def test_the_manifests_validate_against_their_published_crds(monkeypatch):
    _offline(monkeypatch)
    kinds = {d["kind"] for d in documents().values()}
    assert kinds == {"AnalysisTemplate", "MetricTemplate", "Canary"}
    assert len(metric_templates()) == 5
    for key, doc in documents().items():
        assert crd_errors(doc) == [], key


def _broken_variants() -> list[tuple[str, dict, str]]:
    out = []
    at = analysis()
    m = at["spec"]["metrics"][1]
    m["successCondtion"] = m.pop("successCondition")
    out.append(("AnalysisTemplate: misspelled field", at, "successCondtion"))
    at = analysis()
    at["spec"]["metrics"][0]["interval"] = 60
    out.append(("AnalysisTemplate: wrong type", at, "is not of type 'string'"))
    at = analysis()
    at["spec"]["metrics"][0]["provider"]["prometheus"]["qurey"] = "up"
    out.append(("AnalysisTemplate: misspelled provider field", at, "qurey"))
    mt = next(iter(metric_templates().values()))
    mt = copy.deepcopy(mt)
    mt["spec"]["provider"]["type"] = "prometeus"
    out.append(("MetricTemplate: a provider Flagger lacks", mt, "is not one of"))
    mt = copy.deepcopy(next(iter(metric_templates().values())))
    del mt["spec"]["query"]
    out.append(("MetricTemplate: no query", mt, "'query' is a required property"))
    c = canary()
    c["spec"]["analysis"]["metrics"][0]["thresholdRange"] = {"minimum": 500}
    out.append(("Canary: misspelled thresholdRange field", c, "minimum"))
    c = canary()
    c["spec"]["targetRef"]["kind"] = "StatefulSet"
    out.append(("Canary: a target kind Flagger does not roll", c, "is not one of"))
    return out


@pytest.mark.parametrize("what,doc,expected", _broken_variants(), ids=[v[0] for v in _broken_variants()])
def test_the_crd_schemas_reject_a_broken_manifest(what: str, doc: dict, expected: str):
    errors = crd_errors(doc)
    assert errors and any(expected in e for e in errors), f"{what}: {errors}"


# -- what the controllers check beyond the schemas -----------------------------------------------------

_ARG = re.compile(r"\{\{\s*args\.([A-Za-z0-9_.-]+?)\s*\}\}")
_VARIABLE = re.compile(r"\{\{\s*variables\.([A-Za-z0-9_]+)\s*\}\}")


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def test_argo_metrics_pass_the_controllers_validation():
    """argo-rollouts v1.9.1 utils/analysis/factory.go ValidateMetric, and every {{args.x}} declared."""
    spec = analysis()["spec"]
    names = [m["name"] for m in spec["metrics"]]
    assert len(names) == len(set(names))
    assert names == ["comparisons", "agreement", "abs-diff-p99", "error-rate", "latency-p99-ratio"]
    declared = {a["name"] for a in spec["args"]}
    assert len(declared) == len(spec["args"])
    used = set(_ARG.findall(yaml.safe_dump(spec["metrics"])))
    assert used == declared, (used ^ declared)
    assert {a["name"] for a in spec["args"] if "value" not in a} == {"route", "baseline", "candidate"}
    for m in spec["metrics"]:
        count, failure_limit = _int(m.get("count")), _int(m.get("failureLimit"))
        success_limit, inconclusive_limit = _int(m.get("consecutiveSuccessLimit")), _int(m.get("inconclusiveLimit"))
        assert count >= failure_limit + success_limit and count >= inconclusive_limit, m["name"]
        assert count <= 1 or m.get("interval"), m["name"]
        assert success_limit == 1 and failure_limit == 0 and inconclusive_limit == count, (
            f"{m['name']}: passes at its first pass, fails at its first fail, waits while undecided")
        assert set(m["provider"]) == {"prometheus"}
        assert m["provider"]["prometheus"]["address"] == "{{args.prometheus-address}}"
        if m["name"] != "comparisons":
            assert (m["successCondition"], m["failureCondition"]) == ("result[0] == 1", "result[0] == -1")


def test_the_canary_uses_the_templates_with_every_variable_they_need():
    spec = canary()["spec"]
    deployment = _docs(K8S / "deployment.yaml")[0]
    assert spec["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert spec["service"]["port"] == {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    templates = metric_templates()
    metrics = spec["analysis"]["metrics"]
    assert {m["templateRef"]["name"] for m in metrics} == set(templates), "each template used, none missing"
    for m in metrics:
        template = templates[m["templateRef"]["name"]]
        needed = set(_VARIABLE.findall(template["spec"]["query"]))
        assert needed <= set(m["templateVariables"]), (m["name"], needed - set(m["templateVariables"]))
        assert set(m["thresholdRange"]) in ({"min"}, {"max"}), m["name"]
        assert re.fullmatch(r"\d+[smh]", m["interval"]), m["name"]
    # the same thresholds as the AnalysisTemplate's defaults
    args = {a["name"]: a.get("value") for a in analysis()["spec"]["args"]}
    ranges = {m["name"]: next(iter(m["thresholdRange"].values())) for m in metrics}
    assert ranges == {"comparisons": int(args["min-comparisons"]), "agreement": float(args["agreement-min"]),
                      "abs-diff-p99": 0.01, "error-rate": float(args["error-rate-max"]),
                      "latency-p99-ratio": float(args["latency-p99-ratio-max"])}
    (abs_diff,) = [m for m in metrics if m["name"] == "abs-diff-p99"]
    assert abs_diff["templateVariables"]["abs_diff_le"] == args["abs-diff-le"]


# -- the PromQL ------------------------------------------------------------------------------------


def argo_query(metric: str, **args: str) -> str:
    """The AnalysisTemplate's query of ``metric``, its {{args.x}} filled from ``args`` over the defaults."""
    spec = analysis()["spec"]
    values = {a["name"]: a.get("value") for a in spec["args"]} | args
    (m,) = [m for m in spec["metrics"] if m["name"] == metric]
    text = _ARG.sub(lambda g: values[g.group(1)], m["provider"]["prometheus"]["query"])
    assert "{{" not in text, text
    return text


def flagger_query(template: str, **variables: str) -> str:
    text = _VARIABLE.sub(lambda g: variables[g.group(1)], metric_templates()[template]["spec"]["query"])
    assert "{{" not in text, text
    return text


DEFAULTS = {"route": "fraud", "baseline": "fraud_v1", "candidate": "fraud_v2", "window": "10m"}


def all_queries() -> list[str]:
    flagger = {**DEFAULTS, "abs_diff_le": "0.05"}
    return ([argo_query(m["name"], **DEFAULTS) for m in analysis()["spec"]["metrics"]]
            + [flagger_query(name, **flagger) for name in metric_templates()])


def test_promtool_parses_every_query(tmp_path: Path):
    rules = [{"record": f"rollout:query_{i}", "expr": q} for i, q in enumerate(all_queries())]
    path = tmp_path / "rollout-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "rollout", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_every_metric_the_queries_read_is_exported():
    """Families, samples or not, of a fresh gateway registry (the rollouts' own metrics on it too)."""
    metrics = Metrics(CollectorRegistry())
    Rollouts(metrics)
    possible, _ = exported(generate_latest(metrics.registry).decode())
    used = set().union(*(metric_names(q) for q in all_queries()))
    assert used and not used - possible, sorted(used - possible)
    edges = {floatToGoString(b) for b in _ABS_DIFF_BUCKETS}
    le = next(a["value"] for a in analysis()["spec"]["args"] if a["name"] == "abs-diff-le")
    assert le in edges, f"abs-diff-le {le} is no le of onnxgate_shadow_abs_diff: {sorted(edges)}"
    assert {"0.001", "0.0015", "0.002"} <= {floatToGoString(b) for b in _EXEC_BUCKETS}  # the scenarios' edges


# Evidence over the 10 minutes of the window: rows agreeing / not, the candidate's successes / errors,
# per-request max abs diffs at or under 0.05 / above it, comparisons; the candidate's execution times
# all in (0.0015, 0.002] s, the baseline's in (0.001, 0.0015] (p99 ratio 1.334), judged at 1.5 or 1.3.
SCENARIOS = {
    "good": {"agree": 1000, "disagree": 0, "ok": 5000, "errors": 0, "under": 1000, "over": 0, "compared": 1000,
             "latency_max": "1.5"},
    "bad": {"agree": 950, "disagree": 50, "ok": 950, "errors": 50, "under": 900, "over": 100, "compared": 1000,
            "latency_max": "1.3"},
    "few": {"agree": 20, "disagree": 0, "ok": 100, "errors": 0, "under": 20, "over": 0, "compared": 20,
            "latency_max": "1.5"},
}
GATES = Gates(agreement_min=0.99, abs_diff_p99_max=0.05, error_rate_max=0.001)
CODE = {"pass": 1, "pending": 0, "fail": -1}


def _gateway_verdicts(s: dict) -> dict[str, int]:
    """The gateway's verdicts on the same evidence."""
    ev = Evidence()
    for i in range(s["compared"]):
        ev.comparisons += 1
        ev.abs_diff.add(0.001 if i < s["under"] else 0.5)
    ev.rows, ev.rows_agree = s["agree"] + s["disagree"], s["agree"]
    ev.candidate_requests, ev.candidate_errors = s["ok"] + s["errors"], s["errors"]
    return {g.name: CODE[g.verdict] for g in evaluate(ev, GATES, 0.95)}


def _series(route: str, s: dict) -> list[dict]:
    """Counters rising evenly over 20 minutes (per minute: the window's evidence / 10)."""
    cand, base = f"{route}_v2", f"{route}_v1"
    pair = f'route="{route}", primary="{base}", shadow="{cand}"'

    def rising(series: str, per_window: int) -> dict:
        assert per_window % 10 == 0
        return {"series": series, "values": f"0+{per_window // 10}x20"}

    out = [
        rising(f'onnxgate_shadow_argmax_rows_total{{{pair}, output="y", agree="true"}}', s["agree"]),
        rising(f'onnxgate_shadow_argmax_rows_total{{{pair}, output="y", agree="false"}}', s["disagree"]),
        rising(f'onnxgate_requests_total{{model="{cand}", version="1", protocol="shadow", outcome="success"}}',
               s["ok"]),
        rising(f'onnxgate_requests_total{{model="{cand}", version="1", protocol="shadow", outcome="invalid_input"}}',
               1000),  # the caller's fault: not the candidate's
        rising(f'onnxgate_shadow_abs_diff_count{{{pair}, output="y", stat="max"}}', s["under"] + s["over"]),
        rising(f'onnxgate_shadow_abs_diff_bucket{{{pair}, output="y", stat="max", le="0.05"}}', s["under"]),
        rising(f'onnxgate_shadow_requests_total{{{pair}, outcome="compared"}}', s["compared"]),
    ]
    if s["errors"]:  # the error series exists only once the candidate has failed
        out.append(rising(f'onnxgate_requests_total{{model="{cand}", version="1", protocol="shadow", '
                          f'outcome="error"}}', s["errors"]))
    for model, lowest in ((cand, "0.002"), (base, "0.0015")):
        for le in ("0.001", "0.0015", "0.002", "+Inf"):
            n = s["compared"] if le == "+Inf" or float(le) >= float(lowest) else 0
            out.append(rising(f'onnxgate_compute_duration_seconds_bucket{{model="{model}", version="1", le="{le}"}}',
                              n))
    return out


def test_the_queries_give_the_gateways_verdicts(tmp_path: Path):
    """promtool evaluates every AnalysisTemplate query (a verdict: 1, 0, -1) and every Flagger query
    against its threshold on synthetic series, 10 minutes of evidence in the window; where the gateway
    has the same gate, its verdict on the same evidence is the expected one."""
    series, tests = [], []

    def expect(expr: str, value: int) -> None:
        tests.append({"expr": expr, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": value}]})

    for route, s in SCENARIOS.items():
        series += _series(route, s)
        gateway = _gateway_verdicts(s)
        args = {"route": route, "baseline": f"{route}_v1", "candidate": f"{route}_v2", "window": "10m",
                "latency-p99-ratio-max": s["latency_max"]}
        latency = 0 if s["compared"] < 500 else (1 if s["latency_max"] == "1.5" else -1)
        verdicts = {"agreement": gateway["agreement"], "abs-diff-p99": gateway["abs_diff_p99"],
                    "error-rate": gateway["error_rate"], "latency-p99-ratio": latency}
        assert verdicts["agreement"] == {"good": 1, "bad": -1, "few": 0}[route], "scenarios far from the edges"
        for metric, value in verdicts.items():
            expect(argo_query(metric, **args), value)
        expect(argo_query("comparisons", **args), s["compared"])
        variables = {**args, "abs_diff_le": "0.05"}
        passes = {"onnxgate-rollout-comparisons": f">= bool {500}", "onnxgate-rollout-agreement-lower": ">= bool 0.99",
                  "onnxgate-rollout-abs-diff-exceedance-upper": "<= bool 0.01",
                  "onnxgate-rollout-error-rate-upper": "<= bool 0.001",
                  "onnxgate-rollout-latency-p99-ratio": f"<= bool {s['latency_max']}"}
        flagger = {"onnxgate-rollout-comparisons": s["compared"] >= 500,
                   "onnxgate-rollout-agreement-lower": gateway["agreement"] == 1,
                   "onnxgate-rollout-abs-diff-exceedance-upper": gateway["abs_diff_p99"] == 1,
                   "onnxgate-rollout-error-rate-upper": gateway["error_rate"] == 1,
                   "onnxgate-rollout-latency-p99-ratio": s["latency_max"] == "1.5"}
        for template, op in passes.items():
            expect(f"({flagger_query(template, **variables)}) {op}", int(flagger[template]))
    # nothing seen at all: every gate undecided, nothing compared (Argo); Flagger gets no value
    for metric in ("comparisons", "agreement", "abs-diff-p99", "error-rate", "latency-p99-ratio"):
        expect(argo_query(metric, route="quiet", baseline="quiet_v1", candidate="quiet_v2"), 0)
    tests.append({"expr": flagger_query("onnxgate-rollout-agreement-lower", route="quiet", candidate="quiet_v2",
                                        baseline="quiet_v1", window="10m"), "eval_time": "20m", "exp_samples": []})
    (tmp_path / "none.yaml").write_text("groups: []\n")
    doc = {"rule_files": ["none.yaml"], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "rollout-queries.test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1_000_000))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def test_the_verdict_test_would_see_a_wrong_bound(tmp_path: Path, monkeypatch):
    """Not vacuous: the agreement query with its bound's sign flipped (the upper bound judged as the
    lower) gives another verdict, and promtool says so."""
    original = analysis

    def flipped() -> dict:
        doc = original()
        (m,) = [m for m in doc["spec"]["metrics"] if m["name"] == "agreement"]
        query = m["provider"]["prometheus"]["query"]
        m["provider"]["prometheus"]["query"] = query.replace("- 1.645 * sqrt", "+ 1.645 * sqrt", 1)
        assert m["provider"]["prometheus"]["query"] != query
        return doc

    monkeypatch.setattr(sys.modules[__name__], "analysis", flipped)
    with pytest.raises(AssertionError, match=r"FAILED|expected"):
        test_the_queries_give_the_gateways_verdicts(tmp_path)


# -- the rollouts' state volume ----------------------------------------------------------------------


def _gateway_pods() -> list[tuple[str, dict]]:
    """(what, pod spec) of every manifest that runs the gateway on the shared config."""
    (deployment,) = _docs(K8S / "deployment.yaml")
    (knative,) = _docs(K8S / "autoscaling" / "knative-service.yaml")
    (runtime,) = _docs(K8S / "kserve" / "servingruntime.yaml")
    return [("Deployment", deployment["spec"]["template"]["spec"]),
            ("Knative Service", knative["spec"]["template"]["spec"]), ("ServingRuntime", runtime["spec"])]


def _state_dir(tmp_path: Path) -> str:
    from onnxgate.config import load

    (cm,) = _docs(K8S / "config.yaml")
    text = cm["data"]["gateway.yaml"]
    tokens = tmp_path / "tokens.yaml"
    (secret,) = _docs(K8S / "secrets" / "tokens.yaml")
    tokens.write_text(secret["stringData"]["tokens.yaml"])
    config = tmp_path / "gateway.yaml"
    config.write_text(text.replace("/etc/onnxgate/tokens/tokens.yaml", str(tokens)))
    rollouts = load(str(config), {}).rollouts
    assert rollouts.state_dir.startswith("/"), rollouts
    return rollouts.state_dir


def test_every_gateway_pod_has_its_own_writable_state_directory(tmp_path: Path):
    state_dir = _state_dir(tmp_path)
    for what, pod in _gateway_pods():
        for c in pod["containers"]:
            mounts = [m for m in c["volumeMounts"] if state_dir.rstrip("/").startswith(m["mountPath"].rstrip("/"))]
            assert mounts, f"{what}: {state_dir} is on no volume (the root filesystem is read-only)"
            (mount,) = [m for m in mounts if m["mountPath"].rstrip("/") == state_dir.rstrip("/")]
            assert not mount.get("readOnly") and "subPath" not in mount, what
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert set(volume) == {"name", "emptyDir"}, f"{what}: one per pod, never a claim replicas share"
        pod_check = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                     "spec": {"containers": pod["containers"], "volumes": pod["volumes"]}}
        kubernetes_validate.validate(pod_check, K8S_VERSION, strict=True)
    (deployment,) = _docs(K8S / "deployment.yaml")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["replicas"] > 1, "why the state may not be shared"


def test_the_alert_rule_watches_the_phases_that_wait_for_an_operator():
    from onnxgate.core.traffic.rollout import PHASES

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "onnxgate-alerts.yaml").read_text())
    (alert,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "OnnxgateRolloutNeedsAttention"]
    assert 'phase=~"rolled_back|holding"' in alert["expr"] and "route" in alert["expr"]
    assert "{{ $labels.route }}" in alert["annotations"]["summary"]
    assert {"rolled_back", "holding"} <= set(PHASES)
