"""The MLflow Model Registry as a repository (issue 8), against a real ``mlflow server`` on loopback
(SQLite backend, local artifact store) shared by the module: versions registered through the MLflow
client, aliases resolved to cached ONNX files and a generated config.pbtxt, the alias moved; the
``registry`` config section; and, once lifecycle serves ``mlflow://``, the real gateway swapping
versions under load with zero failed requests when the alias moves."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import modelzoo
import registry_helpers as rh
import swap_helpers as sh
from gateway import wait_until
from onnxgate.core.registry.config import RegistryConfig, open_repository
from onnxgate.core.registry.local import Repository
from onnxgate.core.registry.mlflow_repository import MlflowModelSpec, MlflowRepository
from onnxgate.core.registry.object_store import RemoteError, RemoteRepository
from onnxgate.core.serving.source import ModelSource, model_fingerprints
from onnxgate.errors import ConfigError


def _mlflow() -> Any:
    return rh.need("mlflow", "pip install mlflow (the full package: the tests run `mlflow server`)")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory):
    """One tracking server for the module; registered models: fraud v1..v2 (y = x * version, logged
    with mlflow.onnx), churn v1..v2 (raw model.onnx artifacts), alias fraud@champion -> 1."""
    mlflow = _mlflow()
    mlflow_onnx = rh.need("mlflow.onnx", "pip install mlflow")
    tmp = tmp_path_factory.mktemp("mlflow")
    try:
        server = rh.start_mlflow(tmp)
    except RuntimeError as exc:
        rh.skip(f"mlflow server did not start: {exc}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        client = mlflow.MlflowClient()
        for version in (1, 2):
            model_dir = modelzoo.build_scaled(tmp / f"src{version}", version=1, scale=float(version))
            with mlflow.start_run():
                mlflow_onnx.log_model(onnx.load(str(model_dir / "1" / "model.onnx")), name="model",
                                      registered_model_name="fraud")
        client.create_registered_model("churn")
        for version in (1, 2):
            model_dir = modelzoo.build_scaled(tmp / f"raw{version}", version=1, scale=float(version))
            with mlflow.start_run() as run:
                mlflow.log_artifact(str(model_dir / "1" / "model.onnx"), artifact_path="onnx")
            client.create_model_version("churn", f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id)
        client.set_registered_model_alias("fraud", "champion", "1")
        yield server.url
    server.stop()


def client() -> Any:
    return _mlflow().MlflowClient()


def run(model_file: Path) -> np.ndarray:
    return ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"]).run(["y"], {"x": sh.X})[0]


def params(source: ModelSource) -> dict[str, str]:
    return {k: v.string_value for k, v in source.read_config().parameters.items()}


def test_alias_resolves_and_follows_moves(mlflow_uri, tmp_path):
    repo = MlflowRepository([MlflowModelSpec("fraud", alias="champion")], tmp_path / "cache", retain_s=0)
    src = repo.scan()["fraud"]
    config = src.read_config()
    assert src.versions == (1,) and list(config.version_policy.specific.versions) == [1]
    run_id = client().get_model_version("fraud", "1").run_id
    assert params(src) == {"mlflow_model": "fraud", "mlflow_alias": "champion", "mlflow_version": "1",
                           "mlflow_run_id": run_id}
    assert np.array_equal(run(src.model_file(1, config)), sh.X)
    before = model_fingerprints(src)
    assert model_fingerprints(repo.scan()["fraud"]) == before, "nothing moved: the cache is left alone"
    client().set_registered_model_alias("fraud", "champion", "2")
    try:
        moved = repo.find("fraud")
        assert moved is not None and moved.versions == (2,) and params(moved)["mlflow_version"] == "2"
        assert model_fingerprints(moved) != before, "poll mode sees the move"
        assert np.array_equal(run(moved.path / "2" / "model.onnx"), sh.X * 2)
        assert not (moved.path / "1").exists(), "with retain_s 0 the version left behind is deleted"
    finally:
        client().set_registered_model_alias("fraud", "champion", "1")
    assert repo.find("churn") is None


def test_fixed_versions_raw_artifacts_and_serve_as(mlflow_uri, tmp_path):
    specs = [MlflowModelSpec("churn", versions=(1, 2, 9)),
             MlflowModelSpec("fraud", alias="champion", serve_as="fraud_shadow", config="max_batch_size: 8")]
    repo = MlflowRepository(specs, tmp_path / "cache")
    sources = repo.scan()
    assert set(sources) == {"churn", "fraud_shadow"}
    churn = sources["churn"]
    assert churn.versions == (1, 2), "version 9 does not exist: served without it"
    assert params(churn)["mlflow_version"] == "2,1" and params(churn)["mlflow_alias"] == ""
    assert np.array_equal(run(churn.path / "2" / "model.onnx"), sh.X * 2)
    shadow = sources["fraud_shadow"]
    assert shadow.read_config().max_batch_size == 8 and shadow.versions == (1,)


def test_damaged_cache_and_lost_alias(mlflow_uri, tmp_path):
    repo = MlflowRepository([MlflowModelSpec("fraud", alias="champion")], tmp_path / "cache")
    src = repo.scan()["fraud"]
    good = (src.path / "1" / "model.onnx").read_bytes()
    (src.path / "1" / "model.onnx").write_bytes(b"garbage")
    repo.scan()
    assert (src.path / "1" / "model.onnx").read_bytes() == good, "a damaged version is fetched again"
    client().delete_registered_model_alias("fraud", "champion")
    try:
        assert repo.scan()["fraud"] == src, "an alias that cannot be resolved keeps the last state"
        fresh = MlflowRepository([MlflowModelSpec("fraud", alias="champion")], tmp_path / "cache2").scan()["fraud"]
        assert fresh.versions == (), "nothing resolved yet: no versions (the manager reports the model)"
    finally:
        client().set_registered_model_alias("fraud", "champion", "1")


def test_registry_config_section():
    cfg = RegistryConfig.from_dict({"cache_dir": "/var/cache/og", "settle_s": 1, "marker": "READY",
                                    "mlflow": {"models": [{"name": "fraud", "alias": "champion"},
                                                          {"name": "churn", "versions": [4, 3]}]}})
    assert cfg.settle_s == 1.0 and cfg.marker == "READY" and cfg.cache_dir == "/var/cache/og"
    assert cfg.mlflow_models == (MlflowModelSpec("fraud", alias="champion"), MlflowModelSpec("churn", versions=(3, 4)))
    assert RegistryConfig.from_dict(None) == RegistryConfig()
    bad = [
        ({"nope": 1}, "unknown key"),
        ({"settle_s": -1}, "settle_s"),
        ({"marker": "a/b"}, "marker"),
        ({"mlflow": {"models": [{"name": "a", "alias": "x", "versions": [1]}]}}, "not both"),
        ({"mlflow": {"models": [{"name": "a"}]}}, "either an alias or versions"),
        ({"mlflow": {"models": [{"name": "a", "versions": [0]}]}}, "positive integers"),
        ({"mlflow": {"models": [{"name": "a", "alias": "x"}, {"name": "a", "alias": "y"}]}}, "serve_as"),
        ({"mlflow": {"models": [{"name": "a", "alias": "x", "config": "max_batch_size: 'x'"}]}}, "config"),
        ({"mlflow": {"models": [{"name": "a", "alias": "x", "config": 'name: "b"'}]}}, "another model"),
        ({"mlflow": {"models": [{"name": "a/b", "alias": "x"}]}}, "serve_as"),
    ]
    for doc, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            RegistryConfig.from_dict(doc)


def test_open_repository_picks_by_scheme(tmp_path, monkeypatch):
    assert isinstance(open_repository(str(tmp_path)), Repository)
    if __import__("importlib").util.find_spec("fsspec") is not None:
        remote = open_repository("memory://somewhere", RegistryConfig(cache_dir=str(tmp_path / "c")))
        assert isinstance(remote, RemoteRepository)
        remote.close()
    with pytest.raises(RemoteError, match=r"registry\.mlflow\.models"):
        open_repository("mlflow://")
    with pytest.raises(RemoteError, match="mlflow://"):
        open_repository("mlflow://host:5000", RegistryConfig(mlflow_models=(MlflowModelSpec("a", alias="b"),)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RemoteError, match="MLFLOW_TRACKING_URI"):
        open_repository("mlflow://", RegistryConfig(mlflow_models=(MlflowModelSpec("a", alias="b"),)))


# -- the sandbox: an MLmodel's paths stay in the artifacts, the cache deletes only what it made ---------------
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_mlmodel_data_outside_the_artifacts_is_refused_and_nothing_outside_moves(mlflow_uri, tmp_path):
    """An MLmodel whose ``flavors.onnx.data`` leads out of the downloaded artifacts (an absolute
    path, ``..``) is not served, and the files it names stay where they are: before, the directory
    of the named file was moved into the cache (and deleted from it later)."""
    mlflow = _mlflow()
    victim = modelzoo.build_scaled(tmp_path / "outside", version=1, scale=7.0) / "1"
    (victim / "weights.bin").write_bytes(b"neighbour")
    before = _files(victim)
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "decoy.txt").write_text("no .onnx file here")
    client().create_registered_model("evil")
    for data in (str(victim / "model.onnx"), "../../../../outside/scaled/1/model.onnx", "../model.onnx"):
        (art / "MLmodel").write_text(json.dumps({"flavors": {"onnx": {"data": data}}}))  # JSON is YAML
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(art), artifact_path="model")
        client().create_model_version("evil", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    repo = MlflowRepository([MlflowModelSpec("evil", versions=(1, 2, 3))], tmp_path / "cache", retain_s=0)
    try:
        src = repo.scan()["evil"]
        assert src.versions == (), "a version whose MLmodel leads out of its artifacts is not served"
        assert _files(victim) == before, "files outside the artifacts were moved"
        assert not list((tmp_path / "cache").rglob("*.onnx")), "the outside model was copied into the cache"
    finally:
        repo.close()


def test_onnx_file_is_resolved_inside_the_artifacts(tmp_path):
    from onnxgate.core.registry.mlflow_repository import _onnx_file

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"not yours")
    art = tmp_path / "art"
    (art / "model").mkdir(parents=True)
    (art / "model" / "out").symlink_to(outside, target_is_directory=True)
    for data in ("out/model.onnx", str(outside / "model.onnx"), "../../outside/model.onnx"):
        (art / "model" / "MLmodel").write_text(json.dumps({"flavors": {"onnx": {"data": data}}}))
        with pytest.raises(RemoteError, match="inside the model version's artifacts"):
            _onnx_file(art)
    (art / "model" / "MLmodel").write_text(json.dumps({"flavors": {"onnx": {"data": "net.onnx"}}}))
    (art / "model" / "net.onnx").write_bytes(b"mine")
    assert _onnx_file(art) == (art / "model" / "net.onnx").resolve()
    (art / "model" / "MLmodel").unlink()
    (art / "model" / "net.onnx").unlink()
    (art / "model" / "link.onnx").symlink_to(outside / "model.onnx")
    with pytest.raises(RemoteError, match=r"no \.onnx files"):  # the only .onnx is a link out: not a candidate
        _onnx_file(art)


def test_the_cache_deletes_only_what_it_made(mlflow_uri, tmp_path):
    """Entries of the cache directory it did not make (a link to a directory elsewhere, a directory
    someone put there) survive scans that prune models no longer configured; the cache's own go."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "1").mkdir(parents=True)
    (elsewhere / "1" / "model.onnx").write_bytes(b"keep me")
    (elsewhere / "1" / ".onnxgate-remote.json").write_text('{"files": {}}')  # looks cached: still not ours
    cache = tmp_path / "cache"
    repo = MlflowRepository([MlflowModelSpec("fraud", alias="champion"), MlflowModelSpec("churn", versions=(1,))],
                            cache, retain_s=0)
    try:
        assert set(repo.scan()) == {"fraud", "churn"}
    finally:
        repo.close()
    (cache / "linked").symlink_to(elsewhere, target_is_directory=True)
    (cache / "foreign" / "1").mkdir(parents=True)
    (cache / "foreign" / "1" / "data").write_bytes(b"keep me too")
    (cache / "fraud" / ".tmp-linked").symlink_to(elsewhere, target_is_directory=True)  # swept at start: unlinked
    repo = MlflowRepository([MlflowModelSpec("fraud", alias="champion")], cache, retain_s=0)
    try:
        assert set(repo.scan()) == {"fraud"}
        assert repo.scan()["fraud"].versions == (1,)
    finally:
        repo.close()
    assert (elsewhere / "1" / "model.onnx").read_bytes() == b"keep me"
    assert (cache / "foreign" / "1" / "data").read_bytes() == b"keep me too"
    assert (cache / "linked").is_symlink() and not (cache / "fraud" / ".tmp-linked").exists()
    assert not (cache / "churn").exists(), "the cache's own directory of a model no longer configured is removed"


# -- the real gateway (needs lifecycle to build MlflowRepository for mlflow://) -------------------------------
def test_gateway_follows_alias_under_load(mlflow_uri, tmp_path):
    config = rh.write_config(tmp_path / "gateway.yaml", f"registry:\n  cache_dir: {tmp_path / 'cache'}\n  retain_s: 1\n"
                             "  mlflow:\n    models:\n      - {name: fraud, alias: champion}\n")
    args = ["--model-control-mode", "poll", "--repository-poll-secs", "0.25", "--config", str(config)]
    gw = rh.start_gateway("mlflow://", args, {"MLFLOW_TRACKING_URI": mlflow_uri}, "model repository mlflow://")
    try:
        with sh.Load(gw, "fraud") as load:
            timeline = sh.Timeline("1")
            load.wait_answers(10)
            timeline.mark("1", "2")
            client().set_registered_model_alias("fraud", "champion", "2")
            assert wait_until(lambda: sh.serving(gw, "fraud") == {"2"}, 60), sh.states(gw, "fraud")
            load.wait_answers(20, timeline.mark("2"), "2")
            timeline.mark("2", "1")
            client().set_registered_model_alias("fraud", "champion", "1")
            assert wait_until(lambda: sh.serving(gw, "fraud") == {"1"}, 60), sh.states(gw, "fraud")
            load.wait_answers(20, timeline.mark("1"), "1")
            calls = sh.assert_clean(load, timeline)
        assert {c.version for c in calls} == {"1", "2"}
        with urllib.request.urlopen(f"http://{gw.http_url}/v2/models/fraud/config", timeout=10) as resp:
            parameters = json.loads(resp.read())["parameters"]
        assert parameters["mlflow_version"]["string_value"] == "1"
        assert parameters["mlflow_alias"]["string_value"] == "champion"
        assert parameters["mlflow_run_id"]["string_value"] == client().get_model_version("fraud", "1").run_id
    finally:
        client().set_registered_model_alias("fraud", "champion", "1")
        gw.stop()


def test_the_core_never_imports_mlflow():
    code = ("import sys, onnxgate.config, onnxgate.lifecycle, onnxgate.core.registry.config, "
            "onnxgate.core.registry.mlflow_repository, onnxgate.core.registry.object_store; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'fsspec', 's3fs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_completed_rollout_moves_the_alias_and_a_rolled_back_one_tags_its_version(mlflow_uri, tmp_path):
    """Route 'scoring' walks fraud@champion (v1) to fraud v2 (y = 2x: the same argmax) and moves
    champion to 2; route 'churning' rolls churn v2 back against v1 (|2x - x| breaks abs_diff)
    and tags churn v2."""
    config = rh.write_config(tmp_path / "gateway.yaml", f"""
registry:
  cache_dir: {tmp_path / 'cache'}
  mlflow:
    models:
      - {{name: fraud, alias: champion}}
      - {{name: fraud, versions: [2], serve_as: fraud_next}}
      - {{name: churn, versions: [1], serve_as: churn_a}}
      - {{name: churn, versions: [2], serve_as: churn_b}}
rollouts: {{evaluate_every_s: 0.2}}
routes:
  - name: scoring
    split: [{{target: fraud, weight: 1}}]
    rollout:
      candidate: fraud_next
      steps: [shadow, 100]
      min_dwell_s: 0.5
      min_comparisons: 30
      gates: {{agreement_min: 0.8}}
      mlflow: {{promote_alias: champion}}
  - name: churning
    split: [{{target: churn_a, weight: 1}}]
    rollout:
      candidate: churn_b
      steps: [shadow, 100]
      min_dwell_s: 0.5
      min_comparisons: 30
      gates: {{abs_diff_p99_max: 0.001}}
      mlflow: {{rollback_tag: rollout_failed}}
""")
    gw = rh.start_gateway("mlflow://", ["--config", str(config)], {"MLFLOW_TRACKING_URI": mlflow_uri},
                          "model repository mlflow://")
    body = json.dumps({"inputs": [{"name": "x", "shape": list(sh.X.shape), "datatype": "FP32",
                                   "data": sh.X.ravel().tolist()}]}).encode()

    def phase(route: str) -> str:
        for name in ("scoring", "churning"):  # traffic for both routes, then the one asked about
            request = urllib.request.Request(f"http://{gw.http_url}/v2/models/{name}/infer", body, method="POST")
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.status == 200
        with urllib.request.urlopen(f"http://{gw.http_url}/v2/routes/{route}/rollout", timeout=10) as reply:
            return json.loads(reply.read())["phase"]

    try:
        assert wait_until(lambda: phase("scoring") == "completed", 60)
        assert wait_until(lambda: client().get_model_version_by_alias("fraud", "champion").version == "2", 30)
        assert wait_until(lambda: phase("churning") == "rolled_back", 60)
        assert wait_until(lambda: "rollout_failed" in client().get_model_version("churn", "2").tags, 30)
        reason = client().get_model_version("churn", "2").tags["rollout_failed"]
        assert "abs_diff_p99" in reason
        assert "rollout_failed" not in client().get_model_version("churn", "1").tags
    finally:
        client().set_registered_model_alias("fraud", "champion", "1")
        with contextlib.suppress(Exception):  # not there when the test failed before the rollback
            client().delete_model_version_tag("churn", "2", "rollout_failed")
        gw.stop()
