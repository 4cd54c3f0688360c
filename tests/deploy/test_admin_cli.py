"""The operator CLI, ``onnxgate models list|load|unload|rollback`` and ``onnxgate routes
list|get|put|delete``, run as a subprocess against a real gateway: its table and ``--json``
output, what it changes on the gateway, and its exit codes (0 done, 1 refused by the gateway with
the gateway's message on stderr, and a hint about the token for 401/403, 2 gateway unreachable
or the command unusable). Against a gateway with tokens (``secured``): ``--token-file`` and
``ONNXGATE_TOKEN``; over https with ``--ca-file`` (and a client certificate for mTLS).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import auth_helpers
import modelzoo
import swap_helpers as sh
import tls_helpers
from gateway import GatewayProcess


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("cli_repo")
    for v in (1, 2):
        modelzoo.build_scaled(repo, version=v, scale=float(v))
    modelzoo.build_mlp(repo, "other")
    return repo


EXPLICIT = ["--model-control-mode", "explicit", "--load-model", "scaled"]


@pytest.fixture(scope="module")
def shared(repo):
    """Explicit mode, only ``scaled`` loaded at start (``other`` is listed as not loaded); for the
    tests that change nothing (each checks that)."""
    with GatewayProcess(repo, EXPLICIT) as gw:
        yield gw


@pytest.fixture
def gw(repo):
    """Like ``shared``, for one test that changes what serves."""
    with GatewayProcess(repo, EXPLICIT) as gw:
        yield gw


def cli(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxgate", "models", *args, "--url", url],
                          capture_output=True, text=True, timeout=120)


def url(gw: GatewayProcess) -> str:
    return f"http://{gw.http_url}"


def table(stdout: str) -> list[list[str]]:
    """Table lines split into cells, checking the columns line up under the header."""
    lines = stdout.rstrip("\n").split("\n")
    header = lines[0]
    assert header.split() == ["MODEL", "VERSION", "STATE", "REASON"], stdout
    starts = [header.index(h) for h in ("VERSION", "STATE", "REASON")]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b] for a, b in zip([0, *starts], [*starts, None], strict=True)]
        aligned = all(not c.strip() or not c[0].isspace() for c in cells) and all(
            line[s - 1] == " " for s in starts if len(line) > s)
        assert aligned, f"misaligned row {line!r}:\n{stdout}"
        rows.append([c.strip() for c in cells])
    return rows


def answer_version(gw: GatewayProcess) -> str:
    client = httpclient.InferenceServerClient(gw.http_url)
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(sh.X)
    result = client.infer("scaled", [x])
    version = result.get_response()["model_version"]
    assert np.array_equal(result.as_numpy("y"), sh.X * float(version))
    return version


def test_list_table_and_json(shared):
    out = cli("list", url=url(shared))
    assert out.returncode == 0 and out.stderr == "", out
    assert table(out.stdout) == [["other", "", "UNAVAILABLE", "not loaded"], ["scaled", "2", "READY", ""]]
    out = cli("list", "--json", url=url(shared))
    assert out.returncode == 0, out
    assert json.loads(out.stdout) == sh.http_post(shared, "/v2/repository/index")[1]


@pytest.mark.parametrize("args", [["--json", "list"], ["--url", "{url}", "list", "--json"], ["--url", "{url}",
                                                                                             "--json", "list"]])
def test_options_before_the_action(shared, args):
    """cli.py's help promises --url and --json work before or after the action."""
    argv = [sys.executable, "-m", "onnxgate", "models", *(a.format(url=url(shared)) for a in args)]
    if "--url" not in args:
        argv += ["--url", url(shared)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("["), (
        f"`onnxgate models {' '.join(args)}` lost an option given before the action: {out}. cli._models_parser: "
        "p.set_defaults(url=..., json=False) rewrites the default of the --url/--json Action objects, which "
        "parents=[common] shares with every action's parser, so the action's parser resets them")
    assert json.loads(out.stdout) == sh.http_post(shared, "/v2/repository/index")[1]


def test_load_pin_rollback_unpin(gw):
    out = cli("load", "scaled", "--version", "1", url=url(gw))
    assert out.returncode == 0, out
    assert table(out.stdout) == [["scaled", "1", "READY", ""]], "only the named model's rows"
    assert answer_version(gw) == "1"
    out = cli("rollback", "scaled", "--json", url=url(gw))
    assert out.returncode == 0, out
    assert json.loads(out.stdout) == [{"name": "scaled", "version": "2", "state": "READY"}]
    assert answer_version(gw) == "2"
    assert cli("load", "scaled", "--version", "1", url=url(gw)).returncode == 0
    out = cli("load", "scaled", url=url(gw))  # a plain load unpins: latest 1 again
    assert out.returncode == 0 and table(out.stdout) == [["scaled", "2", "READY", ""]], out
    out = cli("load", "other", "--json", url=url(gw))  # not loaded at start
    assert out.returncode == 0 and json.loads(out.stdout) == [{"name": "other", "version": "1", "state": "READY"}]


def test_unload_then_load(gw):
    out = cli("unload", "scaled", url=url(gw))
    assert out.returncode == 0, out
    assert table(out.stdout) == [["scaled", "", "UNAVAILABLE", "unloaded"]]
    with pytest.raises(InferenceServerException) as err:
        answer_version(gw)
    assert err.value.status() == "503" and "'scaled'" in err.value.message(), err.value
    out = cli("load", "scaled", "--json", url=url(gw))
    assert out.returncode == 0 and json.loads(out.stdout) == [{"name": "scaled", "version": "2", "state": "READY"}]
    assert answer_version(gw) == "2"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["load", "nosuch"], "404: model 'nosuch' is not in the repository"),
        (["rollback", "scaled"], "400: model 'scaled' has no previous version to roll back to"),
        (["load", "scaled", "--version", "9"], "no version matches the version policy"),
        (["load", "scaled", "--version", "0"], "'version' must be a positive integer"),
        (["unload", "nosuch"], "404: Request for unknown model: 'nosuch' is not found"),
    ],
)
def test_refused_exit_1_with_the_gateways_message(shared, args, needle):
    out = cli(*args, url=url(shared))
    assert (out.returncode, out.stdout) == (1, ""), out
    assert out.stderr.startswith("onnxgate: ") and needle in out.stderr, out.stderr
    out = cli(*args, "--json", url=url(shared))
    assert (out.returncode, out.stdout) == (1, ""), f"--json: errors belong on stderr, not in the data: {out}"
    assert needle in json.loads(out.stderr)["error"], out.stderr
    assert sh.serving(shared, "scaled") == {"2"}, "a refused command changed what serves"


def test_unreachable_exit_2():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for extra in ([], ["--json"]):
        out = cli("list", *extra, url=f"http://127.0.0.1:{port}")
        assert out.returncode == 2 and out.stdout == "", out
        assert "cannot reach the gateway" in out.stderr and str(port) in out.stderr, out.stderr


def test_not_a_gateway_exit_2(shared):
    out = cli("list", url=f"http://127.0.0.1:{shared.metrics_port}")  # Prometheus answers 200, not JSON
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
    assert "did not answer like an onnxgate gateway" in out.stderr, out.stderr


def test_url_without_scheme(shared):
    """``host:port`` as tritonclient spells it (and ``GatewayProcess.http_url``) means HTTP."""
    out = cli("list", "--json", url=shared.http_url)
    assert out.returncode == 0, out
    assert {r["name"] for r in json.loads(out.stdout)} == {"other", "scaled"}


def test_none_mode_refuses_changes(repo):
    with GatewayProcess(repo) as gw:
        for args in (["load", "scaled"], ["load", "scaled", "--version", "1"], ["rollback", "scaled"]):
            out = cli(*args, url=url(gw))
            assert out.returncode == 1, out
            assert "model control mode 'none' does not allow loading" in out.stderr, out.stderr
            assert "--model-control-mode explicit or poll" in out.stderr, out.stderr
        out = cli("unload", "scaled", url=url(gw))
        assert out.returncode == 1 and "does not allow unloading" in out.stderr, out
        out = cli("list", url=url(gw))
        assert out.returncode == 0, out
        assert ["scaled", "2", "READY", ""] in table(out.stdout)
        assert answer_version(gw) == "2"


# -- tokens, TLS and routes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    return auth_helpers.make_tokens()


@pytest.fixture(scope="module")
def secured(repo, tokens, tmp_path_factory):
    """Like ``gw`` with a security config: ``infer``/``read``/``admin`` tokens, ``ops`` with all three."""
    config = auth_helpers.write_security_config(tmp_path_factory.mktemp("cli_secured"), tokens)
    with GatewayProcess(repo, [*EXPLICIT, "--config", str(config)]) as gw:
        yield gw


@pytest.fixture(scope="module")
def token_files(tokens, tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("cli_tokens")
    return {name: str(auth_helpers.write_token_file(directory, name, t)) for name, t in tokens.items()}


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m onnxgate ARGS``; ``ONNXGATE_TOKEN`` only when ``env`` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "ONNXGATE_TOKEN"} | (env or {})
    return subprocess.run([sys.executable, "-m", "onnxgate", *args], capture_output=True, text=True, timeout=120,
                          env=environ, input=stdin)


def hint(out: subprocess.CompletedProcess) -> str:
    """The one hint line after the error line."""
    lines = out.stderr.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith("onnxgate: ") and lines[1].startswith("onnxgate: hint: "), out
    return lines[1]


def test_models_list_with_a_token_file_or_the_environment(secured, tokens, token_files):
    for name in ("read", "ops"):
        out = run_cli("models", "list", "--json", "--token-file", token_files[name], "--url", url(secured))
        assert out.returncode == 0 and out.stderr == "", out
        assert {"name": "scaled", "version": "2", "state": "READY"} in json.loads(out.stdout)
    out = run_cli("models", "list", "--url", url(secured), env={"ONNXGATE_TOKEN": tokens["read"]})
    assert out.returncode == 0 and ["scaled", "2", "READY", ""] in table(out.stdout), out


def test_models_without_a_token_401_with_a_hint(secured, tokens, token_files):
    out = run_cli("models", "list", "--url", url(secured))
    assert (out.returncode, out.stdout) == (1, ""), out
    assert "401" in out.stderr.split("\n")[0]
    assert "--token-file" in hint(out) and "ONNXGATE_TOKEN" in hint(out)
    out = run_cli("models", "list", "--json", "--url", url(secured))
    doc = json.loads(out.stderr)
    assert out.returncode == 1 and doc["error"].startswith("401") and "--token-file" in doc["hint"], out
    wrong = tokens["ops"] + "x"
    out = run_cli("models", "list", "--url", url(secured), env={"ONNXGATE_TOKEN": wrong})
    assert out.returncode == 1 and "does not accept the token from ONNXGATE_TOKEN" in hint(out), out
    assert wrong not in out.stderr


def test_models_change_needs_admin_403_with_a_hint(secured, token_files):
    out = run_cli("models", "load", "scaled", "--token-file", token_files["read"], "--url", url(secured))
    assert (out.returncode, out.stdout) == (1, ""), out
    assert "403" in out.stderr and f"--token-file {token_files['read']}" in hint(out) and "'admin'" in hint(out)
    out = run_cli("models", "load", "scaled", "--version", "1", "--token-file", token_files["ops"],
                  "--url", url(secured))
    assert out.returncode == 0 and table(out.stdout) == [["scaled", "1", "READY", ""]], out
    # admin alone may change but not read the index: done, said on stderr
    out = run_cli("models", "load", "scaled", "--token-file", token_files["admin"], "--url", url(secured))
    assert out.returncode == 0 and out.stdout == "" and "done" in out.stderr, out
    out = run_cli("models", "list", "--json", "--token-file", token_files["ops"], "--url", url(secured))
    assert {"name": "scaled", "version": "2", "state": "READY"} in json.loads(out.stdout), out


def test_token_file_problems_exit_2(secured, tmp_path):
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    for path, needle in ((str(empty), "is empty"), (str(tmp_path / "missing"), "cannot read the token file")):
        out = run_cli("models", "list", "--token-file", path, "--url", url(secured))
        assert out.returncode == 2 and needle in out.stderr, out
    out = run_cli("models", "list", "--token", "secret-on-the-command-line", "--url", url(secured))
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr, "a token option would show in ps"


ROUTE_YAML = """\
split:
  - {target: scaled:2, weight: 90}
  - {target: other, weight: 10}
sticky: header:x-user-id
"""


def test_routes_put_get_list_delete(secured, tokens, token_files, tmp_path):
    ops = ["--token-file", token_files["ops"], "--url", url(secured)]
    out = run_cli("routes", "list", *ops)
    assert out.returncode == 0 and out.stdout.split() == ["ROUTE", "SPLIT", "STICKY", "SHADOW"], out
    yaml_file = tmp_path / "canary.yaml"
    yaml_file.write_text(ROUTE_YAML)
    out = run_cli("routes", "put", "canary", "--file", str(yaml_file), *ops)
    assert out.returncode == 0, out
    header, row = out.stdout.rstrip("\n").split("\n")
    assert header.split() == ["ROUTE", "SPLIT", "STICKY", "SHADOW"]
    assert row.split() == ["canary", "scaled:2", "(90),", "other", "(10)", "header:x-user-id"], out.stdout
    want = {"name": "canary", "split": [{"target": "scaled:2", "weight": 90.0}, {"target": "other", "weight": 10.0}],
            "sticky": "header:x-user-id"}
    out = run_cli("routes", "get", "canary", "--json", *ops)
    assert out.returncode == 0 and json.loads(out.stdout) == want, out
    out = run_cli("routes", "list", "--json", "--token-file", token_files["read"],
                  "--url", url(secured))
    assert out.returncode == 0 and json.loads(out.stdout) == [want], out
    json_doc = {"name": "canary", "split": [{"target": "scaled", "weight": 1}],
                "shadow": {"target": "other", "fraction": 0.5, "max_in_flight": 8}}
    out = run_cli("routes", "put", "canary", "--file", "-", "--json", *ops, stdin=json.dumps(json_doc))
    assert out.returncode == 0, out
    assert json.loads(out.stdout)["shadow"] == {"target": "other", "fraction": 0.5, "max_in_flight": 8}
    client = httpclient.InferenceServerClient(secured.http_url)
    headers = {"Authorization": f"Bearer {tokens['ops']}"}
    assert client.get_model_metadata("canary", headers=headers)["name"] == "canary"
    out = run_cli("routes", "delete", "canary", *ops)
    assert out.returncode == 0 and out.stdout.strip() == "route 'canary' deleted", out
    out = run_cli("routes", "get", "canary", *ops)
    assert out.returncode == 1 and "404" in out.stderr and "canary" in out.stderr, out
    out = run_cli("routes", "delete", "canary", "--json", *ops)
    assert out.returncode == 1 and "404" in json.loads(out.stderr)["error"], out


def test_routes_refusals(secured, token_files, tmp_path):
    route = tmp_path / "r.json"
    route.write_text(json.dumps({"split": [{"target": "scaled", "weight": 1}]}))
    out = run_cli("routes", "list", "--url", url(secured))
    assert out.returncode == 1 and "401" in out.stderr and "--token-file" in hint(out), out
    out = run_cli("routes", "put", "r", "--file", str(route), "--token-file", token_files["read"],
                  "--url", url(secured))
    assert out.returncode == 1 and "403" in out.stderr and "'admin'" in hint(out), out
    route.write_text(json.dumps({"split": [{"target": "nosuch", "weight": 1}]}))
    out = run_cli("routes", "put", "r", "--file", str(route), "--token-file", token_files["ops"],
                  "--url", url(secured))
    assert out.returncode == 1 and out.stderr.startswith("onnxgate: 400") and "nosuch" in out.stderr, out
    for text, needle in (("[1, 2]", "must hold one route"), ("{: :", "is not YAML or JSON")):
        route.write_text(text)
        out = run_cli("routes", "put", "r", "--file", str(route), "--token-file", token_files["ops"],
                      "--url", url(secured))
        assert out.returncode == 2 and needle in out.stderr, out
    out = run_cli("routes", "list", "--json", "--token-file", token_files["ops"], "--url", url(secured))
    assert json.loads(out.stdout) == [], "a refused put changed the routes"


def test_https_with_a_ca_file(repo, tokens, token_files, tmp_path):
    pki = tls_helpers.make_pki(tmp_path / "pki")
    config = auth_helpers.write_security_config(tmp_path, tokens)
    args = [*EXPLICIT, "--config", str(config), "--tls-cert-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key), "--tls-client-ca-file", str(pki.ca.cert)]
    with GatewayProcess(repo, args) as gw:
        https = ["--url", f"https://{gw.http_url}", "--token-file", token_files["read"]]
        mtls = ["--cert-file", str(pki.client.cert), "--key-file", str(pki.client.key)]
        out = run_cli("models", "list", "--json", "--ca-file", str(pki.ca.cert), *mtls, *https)
        assert out.returncode == 0 and {r["name"] for r in json.loads(out.stdout)} == {"other", "scaled"}, out
        out = run_cli("routes", "list", "--ca-file", str(pki.ca.cert), *mtls, *https)
        assert out.returncode == 0, out
        out = run_cli("models", "list", "--ca-file", str(pki.ca.cert), *https)  # no client certificate
        assert out.returncode == 1 and "401" in out.stderr and "certificate" in out.stderr, out
        out = run_cli("models", "list", *mtls, "--ca-file", str(pki.other_ca.cert), *https)
        assert out.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out
    out = run_cli("models", "list", "--ca-file", str(pki.ca.cert), "--url", "http://127.0.0.1:1")
    assert out.returncode == 2 and "need an https:// --url" in out.stderr, out
