"""End to end: a gateway process on a repository full of odd, partial and broken models.

Config completion, config/graph disagreements, broken files, version directories and version
policies, seen through tritonclient over gRPC and HTTP; plus the CLI's config file handling.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess

MLP_X = 'input [{ name: "x" data_type: TYPE_FP32 dims: [16] }]\n'

# model -> (builder, config.pbtxt text or None, needles the UNAVAILABLE reason must contain)
BAD = {
    "bad_dtype": (modelzoo.build_mlp, 'input [{ name: "x" data_type: TYPE_INT32 dims: [16] }]',
                  ["'x'", "TYPE_INT32", "TYPE_FP32"]),
    "bad_dims": (modelzoo.build_mlp, 'input [{ name: "x" data_type: TYPE_FP32 dims: [15] }]', ["'x'", "[15]", "[16]"]),
    "bad_rank": (modelzoo.build_mlp, 'max_batch_size: 8\ninput [{ name: "x" data_type: TYPE_FP32 dims: [1, 16] }]',
                 ["'x'", "[1, 16]", "[16]"]),
    "bad_input_name": (modelzoo.build_mlp, 'input [{ name: "image" data_type: TYPE_FP32 dims: [16] }]',
                       ["'image'", "['x']"]),
    "bad_batching": (modelzoo.build_no_batch, "max_batch_size: 4", ["max_batch_size 4", "'x'", "[3, 4]"]),
    "bad_name": (modelzoo.build_mlp, 'name: "someone_else"', ["'someone_else'", "'bad_name'"]),
    "unparseable": (modelzoo.build_mlp, "max_batch_size: { oops", ["config.pbtxt"]),
    "not_utf8": (modelzoo.build_mlp, None, ["config.pbtxt", "UTF-8"]),
    "corrupt": (None, None, ["model.onnx"]),
    "no_file": (None, None, ["missing", "model.onnx"]),
    "no_versions": (None, "max_batch_size: 4", ["no version"]),
    "custom_file_missing": (modelzoo.build_mlp, 'default_model_filename: "net.onnx"', ["net.onnx"]),
}

# model -> (config.pbtxt, versions on disk, versions that must serve)
POLICIES = {
    "default_latest": ("", (1, 2, 3), (3,)),
    "latest2": ("version_policy: { latest { num_versions: 2 } }", (1, 2, 3), (2, 3)),
    "specific13": ("version_policy: { specific { versions: [1, 3] } }", (1, 2, 3), (1, 3)),
    "all3": ("version_policy: { all { } }", (1, 2, 3), (1, 2, 3)),
}


def build_repo(repo: Path) -> None:
    modelzoo.build_mlp(repo, "auto_mlp")
    modelzoo.build_no_batch(repo, "auto_fixed")
    modelzoo.write_config(modelzoo.build_mlp(repo, "only_mbs"), "max_batch_size: 4\n")
    modelzoo.write_config(modelzoo.build_add_sub(repo, "some_inputs"), 'input [{ name: "INPUT1" dims: [16] }]\n')
    for name, (build, text, _) in BAD.items():
        if build is not None:
            build(repo, name)
        if text is not None:
            modelzoo.write_config(repo / name, text)
    (repo / "not_utf8" / "config.pbtxt").write_bytes(b'name: "not_utf8"\n# caf\xe9\n')
    modelzoo.corrupt_model(repo, "corrupt")
    (repo / "no_file" / "1").mkdir(parents=True)
    (repo / "no_versions" / "README").write_text("nothing here")
    for name, (text, versions, _) in POLICIES.items():
        for v in versions:
            modelzoo.build_scaled(repo, name, version=v, scale=float(v))
        modelzoo.write_config(repo / name, text)
    # Version dirs that are not plain positive integers are ignored, whatever they hold.
    for v in (1, 2):
        modelzoo.build_scaled(repo, "odd_dirs", version=v, scale=float(v))
    for odd in ("abc", "v3", "03", "0", "1.5", "-4", "\u00b3"):
        shutil.copytree(repo / "odd_dirs" / "2", repo / "odd_dirs" / odd)
    modelzoo.write_config(repo / "odd_dirs", "version_policy: { all { } }\n")
    # Highest version is broken: a request without a version goes to the highest *ready* one.
    for v in (1, 2):
        modelzoo.build_scaled(repo, "highest_ready", version=v, scale=float(v))
    modelzoo.corrupt_model(repo, "highest_ready", version=3)
    modelzoo.write_config(repo / "highest_ready", "version_policy: { all { } }\n")
    # default_model_filename
    model_dir = modelzoo.build_mlp(repo, "custom_file")
    (model_dir / "1" / "model.onnx").rename(model_dir / "1" / "net.onnx")
    modelzoo.write_config(model_dir, 'default_model_filename: "net.onnx"\n')


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    repo = tmp_path_factory.mktemp("odd_repo")
    build_repo(repo)
    proc = GatewayProcess(repo).start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log[-3000:]


@pytest.fixture(scope="module")
def clients(gw):
    return {
        "http": httpclient.InferenceServerClient(gw.http_url),
        "grpc": grpcclient.InferenceServerClient(gw.grpc_url),
    }


PROTOCOLS = ["http", "grpc"]
MODS = {"http": httpclient, "grpc": grpcclient}


def index(clients, protocol) -> dict[tuple[str, str], tuple[str, str]]:
    if protocol == "http":
        rows = clients["http"].get_model_repository_index()
        return {(r["name"], r.get("version", "")): (r["state"], r.get("reason", "")) for r in rows}
    rows = clients["grpc"].get_model_repository_index().models
    return {(r.name, r.version): (r.state, r.reason) for r in rows}


def infer(clients, protocol, model, arr, version="", name="x", out="y"):
    mod = MODS[protocol]
    inp = mod.InferInput(name, list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return clients[protocol].infer(model, [inp], model_version=version).as_numpy(out)


def config(clients, protocol, model) -> dict:
    if protocol == "http":
        return clients["http"].get_model_config(model)
    return clients["grpc"].get_model_config(model, as_json=True)["config"]


def io(cfg: dict, key: str) -> dict[str, tuple[str, list[int]]]:
    return {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in cfg[key]}


# -- configs completed from the graph ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_config_batchable(clients, protocol, gw):
    cfg = config(clients, protocol, "auto_mlp")
    assert int(cfg["max_batch_size"]) == 256
    assert io(cfg, "input") == {"x": ("TYPE_FP32", [16])} and io(cfg, "output") == {"y": ("TYPE_FP32", [10])}
    meta = clients[protocol].get_model_metadata("auto_mlp", as_json=True) if protocol == "grpc" else \
        clients["http"].get_model_metadata("auto_mlp")
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 16]
    want = modelzoo.reference_run(gw.repository / "auto_mlp" / "1" / "model.onnx", {"x": np.ones((3, 16), np.float32)})
    np.testing.assert_allclose(infer(clients, protocol, "auto_mlp", np.ones((3, 16), np.float32)), want["y"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_config_fixed_first_dim(clients, protocol):
    cfg = config(clients, protocol, "auto_fixed")
    assert int(cfg.get("max_batch_size", 0)) == 0
    assert io(cfg, "input") == {"x": ("TYPE_FP32", [3, 4])} and io(cfg, "output") == {"y": ("TYPE_FP32", [3, 2])}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(infer(clients, protocol, "auto_fixed", x), x @ modelzoo.NO_BATCH_WEIGHT)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_partial_config_only_max_batch_size(clients, protocol):
    cfg = config(clients, protocol, "only_mbs")
    assert int(cfg["max_batch_size"]) == 4 and io(cfg, "input") == {"x": ("TYPE_FP32", [16])}
    assert infer(clients, protocol, "only_mbs", np.ones((4, 16), np.float32)).shape == (4, 10)
    with pytest.raises(InferenceServerException) as info:
        infer(clients, protocol, "only_mbs", np.ones((5, 16), np.float32))
    assert "5" in info.value.message() and "4" in info.value.message()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_partial_config_some_inputs(clients, protocol):
    cfg = config(clients, protocol, "some_inputs")
    assert io(cfg, "input") == {"INPUT0": ("TYPE_FP32", [16]), "INPUT1": ("TYPE_FP32", [16])}
    assert io(cfg, "output") == {"OUTPUT0": ("TYPE_FP32", [16]), "OUTPUT1": ("TYPE_FP32", [16])}
    mod = MODS[protocol]
    a, b = np.full((2, 16), 3, np.float32), np.ones((2, 16), np.float32)
    inputs = [mod.InferInput("INPUT0", [2, 16], "FP32"), mod.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = clients[protocol].infer("some_inputs", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


# -- broken models: UNAVAILABLE with a reason, while the rest serve ---------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_broken_models_are_unavailable_with_reason(clients, protocol):
    rows = index(clients, protocol)
    for name, (_, _, needles) in BAD.items():
        found = {k: v for k, v in rows.items() if k[0] == name}
        assert found, f"{name} missing from the index: {sorted(rows)}"
        for (_, version), (state, reason) in found.items():
            assert state == "UNAVAILABLE", f"{name} v{version}: {state}"
            for needle in needles:
                assert needle in reason, f"{name} v{version}: reason {reason!r} does not mention {needle!r}"
        assert not clients[protocol].is_model_ready(name)
    for name in ("auto_mlp", "auto_fixed", "only_mbs", "some_inputs", "custom_file"):
        assert rows[(name, "1")][0] == "READY", (name, rows[(name, "1")])
        assert clients[protocol].is_model_ready(name)
    assert clients[protocol].is_server_ready()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", sorted(BAD))
def test_infer_on_broken_model_is_unavailable(clients, protocol, model):
    reason = " ".join(r for (n, _), (_, r) in index(clients, protocol).items() if n == model)
    with pytest.raises(InferenceServerException) as info:
        infer(clients, protocol, model, np.ones((1, 16), np.float32))
    assert info.value.status() == ("503" if protocol == "http" else "StatusCode.UNAVAILABLE"), info.value
    assert BAD[model][2][0] in info.value.message() and model in info.value.message(), (info.value, reason)
    # the rest still serve
    assert infer(clients, protocol, "auto_mlp", np.ones((1, 16), np.float32)).shape == (1, 10)


# -- versions -------------------------------------------------------------------------------------


def _ready_versions(rows, name) -> set[int]:
    return {int(v) for (n, v), (state, _) in rows.items() if n == name and state == "READY"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", sorted(POLICIES))
def test_version_policy(clients, protocol, model):
    _, on_disk, served = POLICIES[model]
    assert _ready_versions(index(clients, protocol), model) == set(served)
    x = np.ones((1, 4), np.float32)
    for v in on_disk:
        if v in served:
            assert clients[protocol].is_model_ready(model, str(v))
            np.testing.assert_array_equal(infer(clients, protocol, model, x, str(v)), x * v)
        else:
            with pytest.raises(InferenceServerException) as info:
                infer(clients, protocol, model, x, str(v))
            assert info.value.status() in ("404", "StatusCode.NOT_FOUND"), info.value
    np.testing.assert_array_equal(infer(clients, protocol, model, x), x * max(served))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_non_integer_version_dirs_are_ignored(clients, protocol):
    rows = index(clients, protocol)
    assert sorted(v for n, v in rows if n == "odd_dirs") == ["1", "2"]
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(infer(clients, protocol, "odd_dirs", x), x * 2)
    meta = clients["http"].get_model_metadata("odd_dirs")
    assert sorted(meta["versions"]) == ["1", "2"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_request_without_version_goes_to_highest_ready(clients, protocol):
    rows = index(clients, protocol)
    assert rows[("highest_ready", "3")][0] == "UNAVAILABLE" and _ready_versions(rows, "highest_ready") == {1, 2}
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(infer(clients, protocol, "highest_ready", x), x * 2)
    with pytest.raises(InferenceServerException) as info:
        infer(clients, protocol, "highest_ready", x, "3")
    assert info.value.status() in ("503", "StatusCode.UNAVAILABLE"), info.value


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_default_model_filename(clients, protocol, gw):
    x = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16)
    want = modelzoo.reference_run(gw.repository / "custom_file" / "1" / "net.onnx", {"x": x})["y"]
    np.testing.assert_allclose(infer(clients, protocol, "custom_file", x), want, rtol=1e-5, atol=1e-6)


# -- CLI: the config file and flags ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("small_repo")
    modelzoo.build_mlp(repo)
    return repo


def _mbs(gw: GatewayProcess) -> int:
    return int(httpclient.InferenceServerClient(gw.http_url).get_model_config("mlp")["max_batch_size"])


def test_config_file_values_apply_and_flags_win(small_repo, tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("server:\n  default_max_batch_size: 8\n  drain_timeout_s: 5\n")
    with GatewayProcess(small_repo, ["--config", str(path)]) as gw:
        assert _mbs(gw) == 8
    with GatewayProcess(small_repo, ["--config", str(path), "--default-max-batch-size", "4"]) as gw:
        assert _mbs(gw) == 4


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("server:\n  default_max_batch_size: 8\n  max_bach_size: 3\n", ["max_bach_size", "unknown key"]),
        ("serve:\n  http_port: 1\n", ["serve", "unknown section"]),
        ("server:\n  http_port: lots\n", ["http_port", "lots"]),
        ("server: [1, 2]\n", ["server", "mapping"]),
        ("server: {http_port: 1\n", ["not valid YAML"]),
        (None, ["cannot read config file", "bad.yaml"]),
    ],
)
def test_bad_config_file_exits_2_with_a_clear_message(tmp_path, small_repo, text, needles):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--config", str(path), "--model-repository", str(small_repo)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, f"stderr {done.stderr!r} does not mention {needle!r}"
