"""The console in a real browser: headless Chromium driven by Selenium against a real gateway.

Without a token the page says it was refused (401); with the read token it lists the models and
versions with their states, and a model whose name and load-failure reason hold markup shows
them as text (no element made of them, no script run); an action with the read token is refused
(403) and the page says so; with the admin token, pinning a version from the page changes which
version answers, and editing a route's weights changes the route; a chart renders non-empty.

Needs Chromium (``chromium``), its driver (``chromedriver``, Debian's ``chromium-driver``) and
``selenium``: without them the module is skipped, unless ``ONNXGATE_REQUIRE_BROWSER=1`` (then it
fails). With ``ONNXGATE_CONSOLE_SCREENSHOTS=DIR`` it saves the page at 1280x800 and narrow there.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess

MARKUP = "<img src=x onerror=alert(1)>"
TOKENS = {"read": "tok-console-read-0123", "admin": "tok-console-admin-4567"}
X = np.arange(4, dtype=np.float32).reshape(1, 4)
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X.ravel().tolist()}]})
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


def _browser() -> tuple[str, str]:
    """Chromium and its driver, or skip (fail under ONNXGATE_REQUIRE_BROWSER=1)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium"
    else:
        missing = "" if chromium and driver else "chromium" if not chromium else "chromedriver (chromium-driver)"
    if missing:
        if os.environ.get("ONNXGATE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ONNXGATE_REQUIRE_BROWSER=1 but {missing} is not installed")
        pytest.skip(f"{missing} is not installed")
    assert chromium and driver
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see CSP violations and errors
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("console-browser")
    repo = root / "repo"
    for version in (1, 2):
        modelzoo.build_scaled(repo, "scaled", version=version, scale=float(version))
    modelzoo.write_config(repo / "scaled", "version_policy: { all { } }\n")
    modelzoo.build_scaled(repo, "a")
    modelzoo.build_scaled(repo, "b", scale=2.0)
    modelzoo.corrupt_model(repo, MARKUP)
    config = {
        "routes": [{"name": "ab", "split": [{"target": "a", "weight": 1}, {"target": "b", "weight": 1}]},
                   {"name": "sh", "split": [{"target": "a", "weight": 1}],
                    "shadow": {"target": "b", "fraction": 1.0, "max_in_flight": 8}},
                   {"name": "ro", "split": [{"target": "a", "weight": 1}],
                    "rollout": {"candidate": "b", "gates": {"agreement_min": 0.99}}}],
        "sample_log": {"default": {"rate": 1.0}, "sink": {"type": "jsonl", "path": str(root / "samples")}},
        "security": {"tokens": [
            {"name": "reader", "sha256": hashlib.sha256(TOKENS["read"].encode()).hexdigest(), "scopes": ["read"]},
            {"name": "admin", "sha256": hashlib.sha256(TOKENS["admin"].encode()).hexdigest(),
             "scopes": ["infer", "read", "admin"]},
        ]},
    }
    (root / "gateway.yaml").write_text(json.dumps(config))
    args = ["--config", str(root / "gateway.yaml"), "--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, args) as g:
        yield g


def _call(gw: GatewayProcess, method: str, path: str, body: str = "") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKENS['admin']}", "Content-Type": "application/json"}
    conn.request(method, path, body=body.encode() or None, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, json.loads(data) if data else {}


def _wait(driver, predicate, timeout: float = 15.0):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(predicate)


def _message(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "message").text


def _sign_in(driver, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "signin").click()


def _confirm(driver) -> None:
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(ec.alert_is_present())
    driver.switch_to.alert.accept()


def _card(driver, kind: str, name: str):
    from selenium.webdriver.common.by import By

    for card in driver.find_elements(By.CSS_SELECTOR, f"article.{kind}"):
        if card.get_attribute(f"data-{kind}") == name:
            return card
    raise AssertionError(f"no {kind} card named {name!r}")


def test_the_console_in_a_browser(gw, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.get(f"http://127.0.0.1:{gw.http_port}/console")
    _wait(driver, lambda d: "401" in _message(d))  # tokens are configured: the page says it needs one

    _sign_in(driver, TOKENS["read"])
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.model")) == 4)
    assert "tok-" not in driver.current_url  # the token is never in a URL
    names = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "article.model h3")]
    assert sorted(names) == sorted(["a", "b", "scaled", MARKUP])
    scaled = _card(driver, "model", "scaled")
    states = {r.get_attribute("data-version"): r.find_element(By.CSS_SELECTOR, "td:nth-child(2)").text
              for r in scaled.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert states == {"1": "READY", "2": "READY"}

    # markup in a name and a reason stays text: shown as typed, no element made of it, no alert
    broken = _card(driver, "model", MARKUP)
    assert MARKUP in broken.text and ("UNAVAILABLE" in broken.text)
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.execute_script("return document.querySelectorAll('[onerror]').length") == 0

    # an action with the read token: refused, and the page says so
    _card(driver, "model", "a").find_element(By.CSS_SELECTOR, 'button[aria-label="Unload a"]').click()
    _confirm(driver)
    _wait(driver, lambda d: "403" in _message(d))
    assert _call(gw, "GET", "/v2/models/a/ready")[0] == 200

    # with the admin token: pin scaled to version 1 from the page, and version 1 answers
    _sign_in(driver, TOKENS["admin"])
    _wait(driver, lambda d: "401" not in _message(d) and "403" not in _message(d))
    assert _call(gw, "POST", "/v2/models/scaled/infer", BODY)[1]["model_version"] == "2"
    scaled = _card(driver, "model", "scaled")
    Select(scaled.find_element(By.TAG_NAME, "select")).select_by_value("1")
    scaled.find_element(By.CSS_SELECTOR, 'button[aria-label="Pin scaled to the chosen version"]').click()
    _confirm(driver)
    _wait(driver, lambda d: "done" in _message(d))
    assert _call(gw, "POST", "/v2/models/scaled/infer", BODY)[1]["model_version"] == "1"
    # version 2 is not loaded now, and still a version the page can pin (it is in the repository)
    _wait(driver, lambda d: "2 (not loaded)" in [o.text for o in Select(
        _card(d, "model", "scaled").find_element(By.TAG_NAME, "select")).options])

    # edit the route's weights from the page
    route = _card(driver, "route", "ab")
    inputs = route.find_elements(By.CSS_SELECTOR, "form.weights input[type=number]")
    assert len(inputs) == 2
    inputs[0].clear()
    inputs[0].send_keys("3")
    route.find_element(By.CSS_SELECTOR, "form.weights button[type=submit]").click()
    _confirm(driver)
    _wait(driver, lambda d: "Save weights of ab: done" in _message(d))
    split = _call(gw, "GET", "/v2/routes/ab")[1]["split"]
    assert [(s["target"], s["weight"]) for s in split] == [("a", 3), ("b", 1)]
    # the change moved ab to the end of GET /v2/routes; the page keeps its cards by name (a card
    # that moves takes the focus from what is in it)
    assert [h.text for h in driver.find_elements(By.CSS_SELECTOR, "article.route h3")] == ["ab", "ro", "sh"]

    # traffic, and the request-rate chart draws a line
    for _ in range(20):
        assert _call(gw, "POST", "/v2/models/a/infer", BODY)[0] == 200

    def drawn(d) -> bool:
        card = _card(d, "model", "a")
        line = card.find_elements(By.CSS_SELECTOR, "svg.chart polyline")
        rate = card.find_element(By.CSS_SELECTOR, "tbody tr td:nth-child(5)").text
        return bool(line) and len((line[0].get_attribute("points") or "").split()) >= 2 and float(rate) > 0

    _wait(driver, drawn, 20)

    # a shadowed route: its comparison charts draw; the sample log's counts show
    for _ in range(10):
        assert _call(gw, "POST", "/v2/models/sh/infer", BODY)[0] == 200

    def compared(d) -> bool:
        card = _card(d, "route", "sh")
        return "10 compared" in card.text and bool(card.find_elements(By.CSS_SELECTOR, "svg.chart polyline"))

    _wait(driver, compared, 20)
    _wait(driver, lambda d: "Records written" in d.find_element(By.ID, "samples").text)
    quantiles = _card(driver, "route", "sh").find_element(By.CSS_SELECTOR, "table.quantiles")
    rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")] for r in quantiles.find_elements(By.TAG_NAME, "tr")]
    measures = {r[1]: r[2:] for r in rows if r}  # pair, measure, p50, p90, p99, max
    assert set(measures) == {"max |diff|", "mean |diff|", "latency diff (shadow - primary), ms"}, rows
    assert len([float(v) for values in measures.values() for v in values]) == 12, rows  # each quantile a number

    # the page refreshes every 2 s and keeps the keyboard where it is: a focused control stays
    # focused, and what is typed into a weight lands whole, across refreshes
    polls = "return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v2/models/summary')).length"
    pin = _card(driver, "model", "a").find_element(By.CSS_SELECTOR, 'button[aria-label="Pin a to the chosen version"]')
    driver.execute_script("arguments[0].focus()", pin)
    seen = driver.execute_script(polls)
    _wait(driver, lambda d: d.execute_script(polls) >= seen + 2, 20)
    assert driver.switch_to.active_element == pin
    weight = _card(driver, "route", "ab").find_element(By.CSS_SELECTOR, "form.weights input[type=number]")
    weight.click()
    seen = driver.execute_script(polls)
    for digit in "12345":
        weight.send_keys(digit)
        _wait(driver, lambda d, n=seen: d.execute_script(polls) > n, 20)  # a refresh between keys
        seen = driver.execute_script(polls)
    assert weight.get_attribute("value").endswith("12345"), weight.get_attribute("value")
    weight.clear()
    weight.send_keys("3")

    # a route under a rollout: its state and gates show; pause it from the page; a weight change is refused (409)
    _wait(driver, lambda d: "Rollout of b" in _card(d, "route", "ro").text)
    weight = _card(driver, "route", "ro").find_element(By.CSS_SELECTOR, "form.weights input[type=number]")
    weight.clear()
    weight.send_keys("5")
    _card(driver, "route", "ro").find_element(By.CSS_SELECTOR, "form.weights button[type=submit]").click()
    _confirm(driver)
    _wait(driver, lambda d: "Save weights of ro" in _message(d))
    assert "refused (409)" in _message(driver), _message(driver)
    _wait(driver, lambda d: weight.get_attribute("value") == "1")  # the editor shows what serves again
    _card(driver, "route", "ro").find_element(  # from the keyboard
        By.CSS_SELECTOR, 'button[aria-label="pause the rollout of route ro"]').send_keys(Keys.ENTER)
    _confirm(driver)
    _wait(driver, lambda d: "Rollout pause on ro: done" in _message(d))
    assert _call(gw, "GET", "/v2/routes/ro/rollout")[1]["phase"] == "paused"
    _wait(driver, lambda d: "Rollout of b: paused" in _card(d, "route", "ro").text)  # refreshed, focus kept
    active = driver.switch_to.active_element
    assert active.get_attribute("aria-label") == "pause the rollout of route ro", (active.tag_name, active.text[:80])
    # every control has a label (or an aria-label)
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, select, button')].filter(e => !e.getAttribute('aria-label')"
        " && !(e.id && document.querySelector(`label[for=\"${e.id}\"]`)) && !e.textContent.trim()).length")
    assert unlabelled == 0
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    problems = [e["message"] for e in driver.get_log("browser")  # CSP violations, uncaught script errors
                if e.get("source") in ("security", "javascript") or "Content Security Policy" in e["message"]]
    assert problems == [], problems  # (the refused calls above are logged as failed loads, not as script errors)
    _screenshot(driver, "console.png")  # the README shows docs/console.png

    # a weight saved from an editor opened before the route changed: the weights typed, over the
    # route as it is now (its shadow, removed meanwhile, does not come back)
    weight = _card(driver, "route", "sh").find_element(By.CSS_SELECTOR, "form.weights input[type=number]")
    weight.click()
    assert _call(gw, "PUT", "/v2/routes/sh", json.dumps({"split": [{"target": "a", "weight": 1}]}))[0] == 200
    _wait(driver, lambda d: "shadow" not in _card(d, "route", "sh").find_element(By.TAG_NAME, "p").text)
    weight.clear()
    weight.send_keys("2")
    _card(driver, "route", "sh").find_element(By.CSS_SELECTOR, "form.weights button[type=submit]").click()
    _confirm(driver)
    _wait(driver, lambda d: "Save weights of sh: done" in _message(d))
    assert _call(gw, "GET", "/v2/routes/sh")[1] == {"name": "sh", "split": [{"target": "a", "weight": 2}]}

    # signed out: nothing read with the token stays in view
    driver.find_element(By.ID, "signout").click()
    _wait(driver, lambda d: "401" in _message(d) and not d.find_elements(By.CSS_SELECTOR, "article"))


def test_the_console_on_a_narrow_window(gw, browser):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.set_window_size(400, 800)
    driver.get(f"http://127.0.0.1:{gw.http_port}/console")
    _sign_in(driver, TOKENS["read"])
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.model")) == 4)
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.route")) == 3)
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= driver.execute_script("return window.innerWidth") + 1  # nothing runs off the side
    _screenshot(driver, "console-narrow.png")


def _screenshot(driver, name: str) -> None:
    if directory := os.environ.get("ONNXGATE_CONSOLE_SCREENSHOTS"):
        Path(directory).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        size = driver.get_window_size()
        driver.set_window_size(size["width"], min(max(800, height + 120), 4000))  # the whole page
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(Path(directory) / name))
        driver.set_window_size(size["width"], size["height"])


def test_an_open_gateway_needs_no_login(tmp_path, browser):
    from selenium.webdriver.common.by import By

    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "scaled")
    with GatewayProcess(repo) as open_gw:  # loopback, no tokens
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"http://127.0.0.1:{open_gw.http_port}/console")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.model")) == 1)
        assert "No token needed" in browser.find_element(By.ID, "login").text
        assert "401" not in _message(browser)


def test_the_drift_report_opens_from_the_page(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    repo = tmp_path / "repo"
    for name in ("scored", "idle"):
        modelzoo.build_scaled(repo, name)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "reference.npz", x=rng.normal(0, 1, (4000, 4)).astype(np.float32))
    window = {"reference": str(tmp_path / "reference.npz"), "window": 400, "min_rows": 200}
    config = {
        "sample_log": {"default": {"rate": 1.0}, "sink": {"type": "none"}},
        "drift": {"interval_s": 0.5, "models": {"scored": window, "idle": window}},
        "security": {"tokens": [
            {"name": "reader", "sha256": hashlib.sha256(TOKENS["read"].encode()).hexdigest(), "scopes": ["read"]},
            {"name": "admin", "sha256": hashlib.sha256(TOKENS["admin"].encode()).hexdigest(),
             "scopes": ["infer", "read", "admin"]},
        ]},
    }
    (tmp_path / "gateway.yaml").write_text(json.dumps(config))
    with GatewayProcess(repo, ["--config", str(tmp_path / "gateway.yaml")]) as g:
        x = rng.normal(0, 1, (400, 4)).astype(np.float32)
        x[:, 1] += 3.0  # the second feature drifts
        for chunk in np.array_split(x, 4):
            body = json.dumps({"inputs": [{"name": "x", "shape": list(chunk.shape), "datatype": "FP32",
                                           "data": chunk.ravel().tolist()}]})
            assert _call(g, "POST", "/v2/models/scored/infer", body)[0] == 200
        driver = browser
        driver.get_log("browser")  # what earlier tests left
        driver.get(f"http://127.0.0.1:{g.http_port}/console")
        _sign_in(driver, TOKENS["read"])
        _wait(driver, lambda d: any("400 of 400 rows" in c.text for c in d.find_elements(
            By.CSS_SELECTOR, 'article.drift[data-drift="scored"]')), 30)
        scored = _card(driver, "drift", "scored")
        assert "Thresholds: PSI ≥ 0.2" in scored.text and "/ 0.2" in scored.text
        meters = scored.find_elements(By.TAG_NAME, "meter")
        assert len(meters) == 4 and {m.get_attribute("high") for m in meters} == {"0.2"}

        # refused (the idle model's window is empty): the page says so, beside the drift section
        idle = _card(driver, "drift", "idle")
        idle.find_element(By.CSS_SELECTOR, 'button[aria-label="Drift report of idle"]').click()
        _wait(driver, lambda d: "refused (503)" in _message(d))
        assert "min_rows" in driver.find_element(By.ID, "drift-report").text

        # from the keyboard: the report opens in a sandboxed frame, from a blob: URL (the token stays in a header)
        _card(driver, "drift", "scored").find_element(
            By.CSS_SELECTOR, 'button[aria-label="Drift report of scored"]').send_keys(Keys.ENTER)
        frame = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#drift-report iframe.report"), 30)
        assert frame.get_attribute("sandbox") == "" and frame.get_attribute("src").startswith("blob:")
        assert driver.switch_to.active_element.get_attribute("aria-label") == "Close the drift report"
        _wait(driver, lambda d: "Drift report of scored: opened" in _message(d))
        driver.switch_to.frame(frame)
        try:
            _wait(driver, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Drift report: scored")
            drifted = driver.find_element(By.CSS_SELECTOR, "tr.drift td")
            assert drifted.text == "x[1]"
            assert drifted.find_element(By.XPATH, "..").value_of_css_property("background-color") == \
                "rgba(255, 221, 221, 1)"  # the report's stylesheet applies (the CSP allows it by its hash)
            assert driver.execute_script(
                "return [...document.images].filter(i => i.complete && i.naturalWidth > 0).length") == 4
        finally:
            driver.switch_to.default_content()
        problems = [e["message"] for e in driver.get_log("browser")
                    if e.get("source") in ("security", "javascript") or "Content Security Policy" in e["message"]]
        assert problems == [], problems
        _screenshot(driver, "console-drift-report.png")


def test_weights_edited_and_a_pin_from_the_page_reach_every_worker(tmp_path, browser):
    """Under ``--workers 2`` the page's weight edit and version pin reach every worker
    (core.shared_table, serving.control_share): once the page says done, each worker (on a
    connection pinned to it) serves the new split and the pinned version."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from workers_helpers import ARGS, children, pin_each

    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "scaled", scale=3.0)  # what the pinned connections check their worker with
    modelzoo.build_scaled(repo, "a")
    modelzoo.build_scaled(repo, "b", scale=2.0)
    for version in (1, 2):
        modelzoo.build_scaled(repo, "v", version=version)
    modelzoo.write_config(repo / "v", "version_policy: { all { } }\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"routes": [
        {"name": "ab", "split": [{"target": "a", "weight": 1}, {"target": "b", "weight": 1}]}]}))
    control = ["--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, [*ARGS, *control, "--config", str(config)]) as wgw:  # loopback, no tokens
        assert wgw.proc is not None
        pinned = pin_each(wgw, children(wgw.proc.pid))
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"http://127.0.0.1:{wgw.http_port}/console")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "form.weights input[type=number]")) == 2)
        inputs = _card(browser, "route", "ab").find_elements(By.CSS_SELECTOR, "form.weights input[type=number]")
        inputs[0].clear()
        inputs[0].send_keys("5")
        _card(browser, "route", "ab").find_element(By.CSS_SELECTOR, "form.weights button[type=submit]").click()
        _confirm(browser)
        _wait(browser, lambda d: "Save weights of ab: done" in _message(d))
        for p in pinned.values():  # at once, no waiting: the change was answered once every worker served it
            split = p.call("GET", "/v2/routes/ab")["split"]
            assert [(s["target"], s["weight"]) for s in split] == [("a", 5), ("b", 1)], p.worker

        model = _card(browser, "model", "v")
        Select(model.find_element(By.TAG_NAME, "select")).select_by_value("1")
        model.find_element(By.CSS_SELECTOR, 'button[aria-label="Pin v to the chosen version"]').click()
        _confirm(browser)
        _wait(browser, lambda d: "Pin v to 1: done" in _message(d))
        for p in pinned.values():  # the pin, answered once every worker served it
            assert p.call("POST", "/v2/models/v/infer", json.loads(BODY))["model_version"] == "1", p.worker
