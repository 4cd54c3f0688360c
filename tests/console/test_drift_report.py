"""The live drift report (``GET /v2/drift/{model}/report``) against a real gateway.

A gateway with a sample log and drift on real ONNX models is sent traffic whose second feature
is shifted; once the window holds ``min_rows`` rows the report is HTML with every feature, the
shifted one marked drifted, under the hardening headers and a CSP that runs no script. A model
and a feature named with markup come back escaped. The report is refused while the window is
short (503), for a model without drift (404), without drift configured (503), without a token
(401) and with a token lacking ``read`` (403); it renders off the event loop (health answers
meanwhile) and one at a time (a second request meanwhile is 429). The summary's drift rows
carry each model's thresholds from its config.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.client
import json
import threading
from urllib.parse import quote

import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.core.monitoring.drift_html import STYLE, style_hash
from onnxgate.frontends.http_console import REPORT_CSP, REPORT_STYLE

TOKENS = {"all": "tok-drift-all-0123", "infer": "tok-drift-infer-4567"}
MODEL_MARKUP = "<img src=x onerror=alert(1)>"  # a directory name may hold it (no slash)
FEATURE_MARKUP = "<b onmouseover=alert(2)>f"  # an input name (and so a feature's)
WIDE = 12  # features of the "wide" model: a histogram pair each, so its report takes a while to render


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("drift-report")
    repo = root / "repo"
    for name in ("scored", "idle", "plain"):
        modelzoo.build_scaled(repo, name)
    modelzoo.build_rowwise(repo, "wide")
    modelzoo.build_identity(repo, MODEL_MARKUP, input_name=FEATURE_MARKUP)  # float32 [batch, 1] -> y
    rng = np.random.default_rng(0)
    np.savez(root / "scored.npz", x=rng.normal(0, 1, (4000, 4)).astype(np.float32))
    np.savez(root / "wide.npz", x=rng.normal(0, 1, (4000, WIDE)).astype(np.float32))
    np.savez(root / "markup.npz", **{FEATURE_MARKUP: rng.normal(0, 1, (4000, 1)).astype(np.float32)})
    window = {"window": 400, "min_rows": 200}
    config = {
        "sample_log": {"default": {"rate": 1.0}, "sink": {"type": "none"}},
        "drift": {"interval_s": 0.5, "models": {
            "scored": {"reference": str(root / "scored.npz"), "psi_threshold": 0.25, **window},
            "idle": {"reference": str(root / "scored.npz"), **window},
            "wide": {"reference": str(root / "wide.npz"), **window},
            MODEL_MARKUP: {"reference": str(root / "markup.npz"), **window},
        }},
        "security": {"tokens": [
            {"name": "all", "sha256": hashlib.sha256(TOKENS["all"].encode()).hexdigest(), "scopes": ["infer", "read"]},
            {"name": "infer", "sha256": hashlib.sha256(TOKENS["infer"].encode()).hexdigest(), "scopes": ["infer"]},
        ]},
    }
    (root / "gateway.yaml").write_text(json.dumps(config))
    with GatewayProcess(repo, ["--config", str(root / "gateway.yaml")]) as g:
        g.sent = set()
        g.root = root
        yield g


def call(gw: GatewayProcess, path: str, method: str = "GET", body: str = "",
         token: str | None = TOKENS["all"]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body.encode() or None, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data


def report_path(model: str) -> str:
    return f"/v2/drift/{quote(model, safe='')}/report"


def infer(gw: GatewayProcess, model: str, name: str, x: np.ndarray) -> None:
    body = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    status, _, data = call(gw, f"/v2/models/{quote(model, safe='')}/infer", "POST", body)
    assert status == 200, data


def window_rows(gw: GatewayProcess, model: str) -> int:
    summary = json.loads(call(gw, "/v2/models/summary")[2])
    return next(d["window_rows"] for d in summary["sample_log"]["drift"] if d["model"] == model)


def filled(gw: GatewayProcess, model: str, render: bool = True) -> bytes:
    """Send ``model`` a window of traffic (once), then (``render``) the report once the window is
    full enough; else wait until the gauges say it is."""
    if model not in gw.sent:
        rng = np.random.default_rng(1)
        if model == "scored":
            x = rng.normal(0, 1, (400, 4)).astype(np.float32)
            x[:, 1] += 3.0  # the second feature drifts, far past the threshold
            name = "x"
        elif model == "wide":
            x, name = rng.normal(0, 1, (400, WIDE)).astype(np.float32), "x"
        else:
            x, name = rng.normal(0, 1, (400, 1)).astype(np.float32), FEATURE_MARKUP
        for chunk in np.array_split(x, 4):
            infer(gw, model, name, chunk)
        gw.sent.add(model)
    if not render:
        assert wait_until(lambda: window_rows(gw, model) >= 200, timeout=30)
        return b""
    answers: list[tuple[int, dict, bytes]] = []
    assert wait_until(lambda: answers.append(call(gw, report_path(model))) or answers[-1][0] != 503, timeout=30), (
        answers[-1][2])  # 503 until the sample logger's thread has put min_rows rows in the window
    status, _, page = answers[-1]
    assert status == 200, page
    return page


def test_the_report_names_every_feature_and_marks_the_drifted_one(gw):
    page = filled(gw, "scored").decode()
    assert page.startswith("<!doctype html>") and "<h1>Drift report: scored</h1>" in page
    for i in range(4):
        assert f"<td>x[{i}]</td>" in page
    assert '<tr class="drift"><td>x[1]</td>' in page  # the shifted feature, and it alone
    assert '<tr class="ok"><td>x[0]</td>' in page and "1 of 4 features drifted</b>: x[1]" in page
    assert "Thresholds: PSI &ge; 0.25." in page  # the model's config; the live window uses PSI alone
    assert page.count('src="data:image/png;base64,') == 4  # a histogram pair per feature
    assert "scored.npz" in page and str(gw.root) not in page  # the reference's name, not its path
    assert "<script" not in page.lower()


def test_the_report_is_served_hardened(gw):
    filled(gw, "scored")
    status, headers, _ = call(gw, report_path("scored"))
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == REPORT_CSP
    assert "default-src 'none'" in REPORT_CSP and "script-src" not in REPORT_CSP and "sandbox" in REPORT_CSP
    assert "unsafe-inline" not in REPORT_CSP and "frame-ancestors 'none'" in REPORT_CSP
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"


def test_the_report_style_is_the_one_the_csp_allows():
    assert style_hash() == REPORT_STYLE  # http_console's copy of the hash follows drift_html.STYLE
    digest = hashlib.sha256(STYLE.encode()).digest()
    assert REPORT_STYLE.strip("'").removeprefix("sha256-") == base64.b64encode(digest).decode()


def test_markup_in_a_model_and_a_feature_name_is_escaped(gw):
    page = filled(gw, MODEL_MARKUP).decode()
    assert MODEL_MARKUP not in page and FEATURE_MARKUP not in page
    assert f"<h1>Drift report: {html.escape(MODEL_MARKUP)}</h1>" in page
    assert f"<td>{html.escape(FEATURE_MARKUP)}[0]</td>" in page
    assert f'alt="{html.escape(FEATURE_MARKUP)}[0]"' in page


def test_a_window_short_of_min_rows_is_503(gw):
    status, headers, data = call(gw, report_path("idle"))  # configured, never sent a request
    assert status == 503 and headers["content-type"] == "application/json"
    assert "min_rows (200)" in json.loads(data)["error"]


@pytest.mark.parametrize("model", ["plain", "nosuch"])
def test_a_model_without_drift_is_404(gw, model):
    status, _, data = call(gw, report_path(model))
    assert status == 404 and "no live drift" in json.loads(data)["error"]


def test_without_a_token_401_and_without_read_403(gw):
    status, headers, _ = call(gw, report_path("scored"), token=None)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    status, _, data = call(gw, report_path("scored"), token=TOKENS["infer"])
    assert status == 403 and "read" in json.loads(data)["error"]


def test_rendering_leaves_the_loop_free_and_runs_one_at_a_time(gw):
    filled(gw, "wide", render=False)
    done = threading.Event()
    first: list[int] = []
    # the first request is sent whole before any other is made (a thread that sent it later than
    # the loop below its first probe would find that probe rendering, and be refused itself)
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=60)
    conn.request("GET", report_path("wide"), headers={"Authorization": f"Bearer {TOKENS['all']}"})

    def render() -> None:
        reply = conn.getresponse()
        reply.read()
        first.append(reply.status)
        conn.close()
        done.set()

    worker = threading.Thread(target=render)
    worker.start()
    live, second = [], []
    try:
        while not done.is_set():  # while the first report renders: the loop answers, a second is refused
            live.append(call(gw, "/v2/health/live", token=None)[0])
            status, headers, data = call(gw, report_path("wide"))
            if not done.is_set():
                second.append((status, headers.get("retry-after"), json.loads(data)["reason"] if status == 429
                               else ""))
    finally:
        worker.join(60)
    assert first == [200]
    assert live and set(live) == {200}
    assert second, "the report rendered before a second request could be sent"
    assert set(second) == {(429, "1", "report_in_progress")}, second
    assert call(gw, report_path("wide"))[0] == 200  # and the next one renders again


def test_the_summary_has_each_drift_models_thresholds(gw):
    filled(gw, "scored")

    assert wait_until(lambda: window_rows(gw, "scored") >= 200, timeout=30)
    summary = json.loads(call(gw, "/v2/models/summary")[2])
    drift = {d["model"]: d for d in summary["sample_log"]["drift"]}
    assert set(drift) == {"scored", "idle", "wide", MODEL_MARKUP}  # every configured model, traffic or not
    scored = drift["scored"]
    assert (scored["psi_threshold"], scored["ks_pvalue"], scored["chi2_pvalue"]) == (0.25, None, None)
    assert (scored["min_rows"], scored["window"]) == (200, 400)
    assert scored["alert"] is True and {f["feature"] for f in scored["features"]} == {f"x[{i}]" for i in range(4)}
    assert drift["idle"]["window_rows"] == 0 and drift["idle"]["psi_threshold"] == 0.2


def test_without_drift_configured_it_is_503(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "scaled")
    with GatewayProcess(repo) as g:  # loopback, no tokens
        status, _, data = call(g, report_path("scaled"), token=None)
        assert status == 503 and "not configured" in json.loads(data)["error"]
