"""The console's JSON (``GET /v2/models/summary``) and its static files, against a real gateway.

The summary lists every model and version with its state, reason, provider, instances, queue and
its traffic over the window between two calls; a model whose name and load-failure reason hold
markup comes back as plain JSON strings (the page shows them as text: test_console_browser).
The static files are public, typed, hardened (CSP, nosniff, no referrer) and only the known ones
are served: anything else under /console is 404, traversal included.
"""

from __future__ import annotations

import http.client
import json
import time

import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess
from onnxgate.frontends.http_console import CSP

MARKUP = "<img src=x onerror=alert(1)>"  # a directory name may hold it (no slash)
X = np.arange(8, dtype=np.float32).reshape(2, 4)
BODY = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]})


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("console") / "repo"
    modelzoo.build_scaled(repo, "scaled")
    modelzoo.corrupt_model(repo, MARKUP)
    with GatewayProcess(repo) as g:
        yield g


def get(gw: GatewayProcess, path: str, method: str = "GET", body: str = "") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request(method, path, body=body.encode() or None, headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data


def summary(gw: GatewayProcess) -> dict:
    status, headers, data = get(gw, "/v2/models/summary")
    assert status == 200 and headers["content-type"] == "application/json", data
    return json.loads(data)


def test_summary_lists_models_versions_and_traffic_over_the_window(gw):
    first = summary(gw)
    assert first["ready"] is True and first["draining"] is False  # as GET /v2/health/ready
    by_name = {m["name"]: m for m in first["models"]}
    assert set(by_name) == {"scaled", MARKUP}
    (v1,) = by_name["scaled"]["versions"]
    assert v1["version"] == 1 and v1["state"] == "READY" and v1["reason"] == ""
    assert v1["provider"] == "CPUExecutionProvider" and v1["instances"] >= 1 and v1["queue_depth"] == 0
    assert by_name["scaled"]["ready_versions"] == [1]
    for _ in range(20):
        assert get(gw, "/v2/models/scaled/infer", "POST", BODY)[0] == 200
    time.sleep(1.1)  # past the spacing of snapshots
    second = summary(gw)
    assert second["window_s"] > 1.0
    model = next(m for m in second["models"] if m["name"] == "scaled")
    (v1,) = model["versions"]
    window = second["window_s"]
    if first["window_s"] == 0:  # this module is the first to ask: the window began with the first call
        assert v1["request_rate"] == pytest.approx(20 / window, rel=0.05)
        assert v1["row_rate"] == pytest.approx(40 / window, rel=0.05)
    assert v1["failure_rate"] == 0 and v1["inference_count"] >= 40
    assert v1["latency_mean_ms"] > 0 and 0 < model["latency_p50_ms"] <= model["latency_p99_ms"]
    assert (v1["latency_p50_ms"], v1["latency_p99_ms"]) == (model["latency_p50_ms"], model["latency_p99_ms"])
    assert v1["execute_p50_ms"] is not None and v1["queue_p99_ms"] is not None
    sizes = {b["size"]: b for b in v1["batch_sizes"]}
    assert sum(b["window"] for b in sizes.values()) >= 1 and all(s % 2 == 0 for s in sizes)  # rows of 2
    assert model["request_rate"] == pytest.approx(v1["request_rate"])


def test_markup_in_a_name_and_a_reason_is_plain_json_data(gw):
    status, headers, data = get(gw, "/v2/models/summary")
    assert status == 200 and headers["content-type"] == "application/json"
    broken = next(m for m in json.loads(data)["models"] if m["name"] == MARKUP)
    reasons = [broken["reason"], *(v["reason"] for v in broken["versions"])]
    assert any(MARKUP in r for r in reasons), reasons  # the failure names the model's path
    assert all(v["state"] != "READY" and v["request_rate"] in (None, 0) for v in broken["versions"])


@pytest.mark.parametrize(("path", "kind"), [
    ("/console", "text/html"), ("/console/", "text/html"), ("/console/index.html", "text/html"),
    ("/console/app.js", "text/javascript"), ("/console/style.css", "text/css"),
])
def test_static_files_are_typed_public_and_hardened(gw, path, kind):
    status, headers, data = get(gw, path)
    assert status == 200 and headers["content-type"].split(";")[0] == kind and data
    assert headers["content-security-policy"] == CSP
    assert "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


def test_the_page_has_no_inline_script_or_style_and_no_remote_resource(gw):
    page = get(gw, "/console")[2].decode()
    assert "<script src=\"/console/app.js\"" in page and "style=" not in page and "<style" not in page
    assert page.count("<script") == 1 and " on" not in page.replace("\n", " ").split("<body")[1].split(">")[0]
    for name in ("/console", "/console/app.js", "/console/style.css"):
        text = get(gw, name)[2].decode().replace('"http://www.w3.org/2000/svg"', "")  # a namespace, not a fetch
        assert "http://" not in text and "https://" not in text, name  # no CDN: works offline
    script = get(gw, "/console/app.js")[2].decode()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "localStorage" not in script and "sessionStorage" in script


@pytest.mark.parametrize("path", [
    "/console/nope.js", "/console/..%2Fhttp_app.py", "/console/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/console/../v2", "/console/console_static", "/console/__init__.py", "/console/index.html%00.js",
    "/console/a/b",
])
def test_only_known_files_are_served(gw, path):
    status, _, data = get(gw, path)
    assert status in (404, 405), (path, status)
    assert b"import" not in data and b"[project]" not in data


def test_unknown_console_file_is_404_with_the_same_headers(gw):
    status, headers, _ = get(gw, "/console/nope.js")
    assert status == 404 and headers["content-security-policy"] == CSP
    assert headers["x-content-type-options"] == "nosniff"


def test_the_sample_log_counts_are_in_the_summary(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "scaled")
    config = {"sample_log": {"default": {"rate": 1.0}, "sink": {"type": "jsonl", "path": str(tmp_path / "log")}}}
    (tmp_path / "gateway.yaml").write_text(json.dumps(config))
    with GatewayProcess(repo, ["--config", str(tmp_path / "gateway.yaml")]) as g:
        assert summary(g)["sample_log"]["records_written"] == 0
        for _ in range(5):
            assert get(g, "/v2/models/scaled/infer", "POST", BODY)[0] == 200
        deadline = time.monotonic() + 20
        while (log := summary(g)["sample_log"])["records_written"] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log["records_written"] == 5 and log["drift"] == [] and log["queue_depth"] == 0
        assert set(log["records_dropped"].values()) == {0} and "queue_full" in log["records_dropped"]


def test_without_a_sample_log_it_is_null(gw):
    assert summary(gw)["sample_log"] is None
