"""The Grafana dashboard and the Prometheus rules in deploy/, checked against a running gateway.

``promtool`` (Debian's ``prometheus`` package) checks the rules file, runs its unit tests (each
alert fires on a bad series and not on a good one) and parses every dashboard query. Every metric
name the dashboard, the rules, the prometheus-adapter config and the KEDA triggers use must be a
series a real gateway exports (with a shadow route, the sample log and live drift configured):
the names are read out of the PromQL, and the exposition's families give the series names
(counters ``_total``, histograms ``_bucket``/``_sum``/``_count``). Without promtool the promtool
tests skip, unless ``ONNXGATE_REQUIRE_PROMTOOL=1`` (CI) makes them fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "onnxgate-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "onnxgate-alerts.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "onnxgate-alerts.test.yaml"
AUTOSCALING = ROOT / "deploy" / "kubernetes" / "autoscaling"


# -- PromQL ---------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])(?:0x[0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: not functions, aggregations, keywords,
    label names (in matchers and grouping lists), strings, numbers or durations."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"#[^\n]*", " ", text)  # comments (strings are gone)
    assert "__name__" not in text, f"select metrics by name, not by __name__: {expr}"
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        following = text[m.end():].lstrip()[:1]
        if following != "(" and m.group() not in _KEYWORDS:
            names.add(m.group())
    return names


def test_metric_names_reads_promql_as_promql():
    expr = """
      histogram_quantile(0.99, sum by (model, le) (rate(a_seconds_bucket{protocol!="shadow", m=~"x|y"}[5m])))
        > on () group_left () b:slo_seconds  # a comment naming c_total
      and on (model) sum without (pid) (max_over_time(c_total[1h:5m] offset 1h)) > 1e-3
      or vector(0.25) + count(d{le="+Inf"}) * -2 unless e_ratio > bool 0x1f
    """
    assert metric_names(expr) == {"a_seconds_bucket", "b:slo_seconds", "c_total", "d", "e_ratio"}
    assert metric_names('sum(rate(x_total{job="$job"}[$__rate_interval]))') == {"x_total"}
    assert metric_names("label_replace(up, 'a', '$1', 'b', '(.*)')") == {"up"}


# -- what deploy/ uses -----------------------------------------------------------------------


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard()["panels"]) for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert m, f"variable {var['name']}: {query}"
            exprs.append(m.group(1))
    return exprs


@cache
def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def adapter_rules() -> list[dict]:
    (cm,) = _docs(AUTOSCALING / "prometheus-adapter-config.yaml")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def autoscaling_exprs() -> list[str]:
    """PromQL in the prometheus-adapter rules (with its templates filled in) and the KEDA triggers."""
    out = []
    for rule in adapter_rules():
        out.append(rule["seriesQuery"])
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group()
        filled = rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'pod="p"')
        out.append(filled.replace("<<.GroupBy>>", "pod"))
    (scaled,) = _docs(AUTOSCALING / "keda-scaledobject.yaml")
    out += [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    return out


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard, rules, autoscaling)."""
    where: dict[str, set[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", [r["expr"] for r in rules()]),
                          ("autoscaling", autoscaling_exprs())):
        for expr in exprs:
            for name in metric_names(str(expr)):
                where.setdefault(name, set()).add(source)
    return where


def gateway_names() -> set[str]:
    """The used names the gateway must export: all but the rules' own recorded series."""
    used = used_names()
    unknown = {n for n in used if ":" in n} - recorded()
    assert not unknown, f"recording-rule names that no rule records: {unknown}"
    names = set(used) - recorded()
    assert all(n.startswith("onnxgate_") for n in names), sorted(n for n in names if not n.startswith("onnxgate_"))
    return names


def test_deploy_uses_the_signals_it_promises():
    used = used_names()
    dash = {n for n, w in used.items() if "dashboard" in w}
    for name in ("onnxgate_requests_total", "onnxgate_request_duration_seconds_bucket",
                 "onnxgate_queue_wait_seconds_bucket", "onnxgate_compute_duration_seconds_bucket",
                 "onnxgate_batch_rows_sum", "onnxgate_queue_depth", "onnxgate_queued_rows",
                 "onnxgate_requests_in_flight", "onnxgate_instance_busy_ratio", "onnxgate_rejected_requests_total",
                 "onnxgate_deadline_misses_total", "onnxgate_shadow_argmax_rows_total",
                 "onnxgate_shadow_abs_diff_bucket",
                 "onnxgate_drift_psi", "onnxgate_drift_alert", "onnxgate_sample_log_records_total",
                 "onnxgate_sample_log_dropped_total", "onnxgate_model_ready"):
        assert name in dash, f"the dashboard shows no {name}"
    autoscaling = {n for n, w in used.items() if "autoscaling" in w}
    assert {"onnxgate_requests_in_flight", "onnxgate_queued_rows", "onnxgate_instance_busy_ratio"} <= autoscaling
    assert len(gateway_names()) >= 20


# -- the dashboard ---------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard_on_a_datasource_variable():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36 and d.get("id") is None
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    panels = list(_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    per_model = [t["expr"] for p in graphs for t in p["targets"] if "$model" in t["expr"]]
    assert len(per_model) >= len(graphs) - 3, "panels follow the model variable"


# -- promtool --------------------------------------------------------------------------------


def _promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if path is None:
        if os.environ.get("ONNXGATE_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is required (ONNXGATE_REQUIRE_PROMTOOL=1): apt-get install prometheus")
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    done = _run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_fire_on_bad_series_and_not_on_good_ones():
    done = _run("test", "rules", str(RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = yaml.safe_load(RULES_TEST.read_text())["tests"]
    alerts = {a["alertname"] for t in tested for a in t.get("alert_rule_test", [])}
    assert len(alerts) >= 5 and alerts <= {r["alert"] for r in rules() if "alert" in r}


def test_promtool_unit_tests_catch_a_broken_threshold(tmp_path: Path):
    """The unit tests are not vacuous: the same tests fail on rules whose thresholds are wrong."""
    broken = RULES.read_text().replace("ratio_rate5m > 0.01\n", "ratio_rate5m > 0.5\n")
    broken = broken.replace("(onnxgate_model_ready) == 0", "(onnxgate_model_ready) == 2")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    done = _run("test", "rules", str(tmp_path / RULES_TEST.name))
    assert done.returncode != 0
    for alert in ("OnnxgateHighErrorRatio", "OnnxgateShedding", "OnnxgateModelUnavailable"):
        assert f"alertname: {alert}," in done.stdout + done.stderr, alert


def test_promtool_parses_every_dashboard_query(tmp_path: Path):
    """Grafana's variables filled in, each panel query becomes a recording rule for promtool to parse."""
    exprs = [t["expr"] for p in _panels(dashboard()["panels"]) for t in p.get("targets", [])]
    filled = [e.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$instance", ".*") for e in exprs]
    assert not [e for e in filled if "$" in e], "a dashboard variable promtool would not know"
    queries = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(filled)]
    group = {"name": "dashboard", "rules": queries}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    done = _run("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (model (rate(onnxgate_requests_total[5m]))"}]}]}))
    assert _run("check", "rules", str(tmp_path / "bad.yaml")).returncode != 0


# -- the rules' shape -----------------------------------------------------------------------


def test_every_alert_has_a_severity_a_duration_and_annotations():
    alerts = [r for r in rules() if "alert" in r]
    assert {"OnnxgateHighErrorRatio", "OnnxgateLatencyP99OverSLO", "OnnxgateShedding", "OnnxgateModelUnavailable",
            "OnnxgateInputDrift", "OnnxgateSampleLogDrops"} <= {a["alert"] for a in alerts}
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning", "info"), a["alert"]
        assert {"summary", "description"} <= set(a["annotations"]), a["alert"]
        if "model" in used_labels(a["expr"]):
            assert "{{ $labels.model }}" in a["annotations"]["summary"], a["alert"]
        if a["alert"] != "OnnxgateModelLoadFailures":  # a failed load is an event, not a state
            assert re.fullmatch(r"\d+[smh]", a.get("for", "")), f"{a['alert']} needs a for:"
    slo = [r for r in rules() if r.get("record") == "onnxgate:slo_latency_p99_seconds"]
    assert len(slo) == 1 and re.fullmatch(r"vector\([0-9.]+\)", slo[0]["expr"].strip())


def used_labels(expr: str) -> set[str]:
    """Label names an expression keeps or matches on (good enough for the annotation check)."""
    return set(re.findall(r"\b([a-z_]+)\s*(?:=~|!=|!~|=)", expr)) | {
        w.strip() for g in re.findall(r"\b(?:by|on)\s*\(([^()]*)\)", expr) for w in g.split(",") if w.strip()}


# -- a running gateway exports every name -------------------------------------------------------


def _config(root: Path) -> Path:
    repo = root / "repo"
    modelzoo.build_scaled(repo, "primary", scale=2.0)
    modelzoo.build_scaled(repo, "candidate", scale=3.0)
    reference = root / "reference.npz"
    np.savez(reference, x=np.random.default_rng(0).normal(0, 1, (1000, 4)).astype(np.float32))
    config = root / "gateway.yaml"
    config.write_text(
        f"""
routes:
  - name: scoring
    split: [{{target: primary, weight: 1}}]
    shadow: {{target: candidate, fraction: 1.0}}
sample_log:
  default: {{rate: 1.0}}
  sink: {{type: jsonl, path: {root / "sample-log"}}}
drift:
  interval_s: 0.2
  models:
    primary: {{reference: {reference}, window: 40, min_rows: 8}}
"""
    )
    return config


def _traffic(gw: GatewayProcess) -> None:
    """Requests on both protocols, through the shadowed route and to a name the gateway lacks."""
    rng = np.random.default_rng(1)
    for kind, mod in (("http", httpclient), ("grpc", grpcclient)):
        client = mod.InferenceServerClient(gw.http_url if kind == "http" else gw.grpc_url)
        for i in range(12):
            x = rng.normal(0, 1, (4, 4)).astype(np.float32)
            inp = mod.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("scoring" if i % 2 else "primary", [inp])
        inp = mod.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
        with pytest.raises(InferenceServerException, match="no_such_model"):
            client.infer("no_such_model", [inp])


def _scrape(gw: GatewayProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()


def exported(text: str) -> tuple[set[str], set[str]]:
    """(series names the families can have, names of samples present) of an exposition."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",)}
    possible, present = set(), set()
    for family in text_string_to_metric_families(text):
        base = family.name.removesuffix("_total") if family.type == "counter" else family.name
        possible |= {base + s for s in suffixes.get(family.type, ("",))}
        present |= {s.name for s in family.samples}
    return possible | present, present


def _exposition(tmp_path: Path, args: tuple[str, ...]) -> tuple[set[str], set[str]]:
    config = _config(tmp_path)
    with GatewayProcess(tmp_path / "repo", ["--config", str(config), *args]) as gw:
        _traffic(gw)

        def settled() -> bool:  # the shadow copies compared and a drift window computed
            _, present = exported(_scrape(gw))
            return {"onnxgate_shadow_abs_diff_bucket", "onnxgate_drift_psi"} <= present

        assert wait_until(settled, timeout=30), "no shadow comparison or drift gauge after the traffic"
        return exported(_scrape(gw))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], set[str]]:
    return _exposition(tmp_path_factory.mktemp("single"), ())


def test_every_metric_the_deploy_files_use_is_exported_by_a_gateway(single_process):
    possible, _ = single_process
    missing = {n: sorted(w) for n, w in used_names().items() if n in gateway_names() and n not in possible}
    assert not missing, f"used in deploy/ but not exported by the gateway: {missing}"


def test_the_check_would_see_a_misspelled_metric(single_process):
    possible, _ = single_process
    assert "onnxgate_requests_total" in possible and "onnxgate_request_duration_seconds_bucket" in possible
    for wrong in ("onnxgate_requests", "onnxgate_request_duration_seconds", "onnxgate_queue_rows",
                  "onnxgate_request_duration_seconds_total"):
        assert wrong not in possible, wrong


def test_under_workers_the_supervisor_exports_the_same_names(single_process, tmp_path: Path):
    """Under --workers the multiprocess collector shows only families that have samples, so the
    names checked are those a single process had samples for after the same traffic."""
    _, had_samples = single_process
    _, workers = _exposition(tmp_path, ("--workers", "2"))
    expected = gateway_names() & had_samples
    assert len(expected) >= 0.8 * len(gateway_names()), sorted(gateway_names() - had_samples)
    missing = sorted(expected - workers)
    assert not missing, f"exported by one process but not by the supervisor under --workers 2: {missing}"
