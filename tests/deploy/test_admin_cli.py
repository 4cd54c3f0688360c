"""The operator CLI, ``onnxgate models list|load|unload|rollback``, run as a subprocess against a
real gateway: its table and ``--json`` output, what it changes on the gateway, and its exit codes
(0 done, 1 refused by the gateway with the gateway's message on stderr, 2 gateway unreachable).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
import swap_helpers as sh
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
        (["unload", "nosuch"], "404: unknown model 'nosuch'"),
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
