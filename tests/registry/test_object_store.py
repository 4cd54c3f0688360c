"""Object-store repositories (issue 8) against a real S3-compatible server on loopback (moto's standalone
server): listing, atomic and verified downloads into the cache, versions uploaded while running,
incomplete uploads, a damaged cache, cleanup, credentials kept out of logs; and, once lifecycle serves
``s3://`` locations, the real gateway following uploads under load with zero failed requests."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import registry_helpers as rh
import swap_helpers as sh
from gateway import wait_until
from onnxgate.core.registry.object_store import RemoteError, RemoteFile, RemoteRepository, redact_url
from onnxgate.core.serving.source import model_fingerprints

rh.need("s3fs", "pip install 'onnxgate[s3]'")
rh.need("moto.server", "pip install 'moto[server]'")

CONFIG_ALL = b"version_policy: { all { } }\n"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    server = rh.start_moto(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(key, raising=False)
        for key, value in rh.s3_env(server.url).items():
            mp.setenv(key, value)
        client = rh.s3_client(server.url)
        client.create_bucket(Bucket=rh.BUCKET)
        yield client, server
    server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


def run(model_file: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": sh.X})[0]


def repo(prefix: str, tmp_path: Path, **kw) -> RemoteRepository:
    kw.setdefault("settle_s", 0.0)
    return RemoteRepository(f"s3://{rh.BUCKET}/{prefix}", tmp_path / "cache", **kw)


def test_scan_and_find_mirror_the_store(s3, prefix, tmp_path):
    client, _ = s3
    v1, v2 = rh.scaled_bytes(tmp_path, 1.0), rh.scaled_bytes(tmp_path, 2.0)
    rh.upload(client, prefix, {"scaled/config.pbtxt": CONFIG_ALL, "scaled/1/model.onnx": v1,
                               "scaled/2/model.onnx": v2, "scaled/labels/y.txt": b"a\nb\n",
                               "scaled/02/model.onnx": v2, "scaled/.hidden/x": b"", "top.txt": b"not a model"})
    r = repo(prefix, tmp_path)
    sources = r.scan()
    assert set(sources) == {"scaled"}
    src = sources["scaled"]
    assert src.versions == (1, 2) and src.path == tmp_path / "cache" / "scaled"
    assert src.read_config().version_policy.WhichOneof("policy_choice") == "all"
    assert (src.path / "labels" / "y.txt").read_bytes() == b"a\nb\n"
    assert (src.path / "1" / "model.onnx").read_bytes() == v1 and (src.path / "2" / "model.onnx").read_bytes() == v2
    assert not (src.path / ".hidden").exists(), "hidden names are skipped, as on disk"
    assert (src.path / "02" / "model.onnx").is_file(), "other model-level files are mirrored, but '02' is no version"
    assert np.array_equal(run(src.model_file(2, src.read_config())), sh.X * 2)
    found = r.find("scaled")
    assert found is not None and found.versions == (1, 2) and found.path == src.path
    assert r.find("absent") is None and r.find("../scaled") is None and r.find("") is None
    before = model_fingerprints(src)
    r.scan()
    assert model_fingerprints(src) == before, "a scan that found nothing new must not touch the cache"
    r.close()
    assert (tmp_path / "cache" / "scaled").exists(), "a cache_dir given by the operator stays"


def test_policy_selects_what_is_cached_and_a_pin_fetches_more(s3, prefix, tmp_path):
    client, _ = s3
    rh.upload(client, prefix, {f"scaled/{v}/model.onnx": rh.scaled_bytes(tmp_path, float(v)) for v in (1, 2)})
    r = repo(prefix, tmp_path)
    src = r.scan()["scaled"]
    assert src.versions == (1, 2)
    assert (src.path / "2").is_dir() and not (src.path / "1").exists(), "latest 1: only version 2 is cached"
    assert np.array_equal(run(src.model_file(1, src.read_config())), sh.X), "opening version 1 fetches it"
    r.scan()
    assert (src.path / "1" / "model.onnx").is_file(), "a version opened outside the policy (a pin) stays cached"


def test_version_uploaded_while_running_appears_once_settled(s3, prefix, tmp_path):
    client, _ = s3
    rh.upload(client, prefix, {"scaled/1/model.onnx": rh.scaled_bytes(tmp_path, 1.0)})
    r = repo(prefix, tmp_path, settle_s=0.5)
    assert r.scan()["scaled"].versions == (1,)
    rh.upload(client, prefix, {"scaled/2/model.onnx": rh.scaled_bytes(tmp_path, 2.0)})
    t0 = time.monotonic()
    src = r.scan()["scaled"]
    assert time.monotonic() - t0 >= 0.5, "a new version is listed twice, settle_s apart"
    assert src.versions == (1, 2)
    assert np.array_equal(run(src.path / "2" / "model.onnx"), sh.X * 2)


def test_incomplete_uploads_are_never_used(s3, prefix, tmp_path):
    client, _ = s3
    v2 = rh.external_scaled(tmp_path, 2.0)
    rh.upload(client, prefix, {"scaled/1/model.onnx": rh.scaled_bytes(tmp_path, 1.0), "scaled/1/READY": b""})
    r = repo(prefix, tmp_path, marker="READY")
    rh.upload(client, prefix, {"scaled/2/model.onnx": v2["model.onnx"]})  # external data and marker missing
    src = r.scan()["scaled"]
    assert src.versions == (1,) and not (src.path / "2").exists()
    rh.upload(client, prefix, {"scaled/2/weights.bin": v2["weights.bin"]})
    assert r.scan()["scaled"].versions == (1,), "without its marker the version is not complete"
    rh.upload(client, prefix, {"scaled/2/READY": b""})
    src = r.scan()["scaled"]
    assert src.versions == (1, 2) and not (src.path / "2" / "READY").exists()
    assert np.array_equal(run(src.path / "2" / "model.onnx"), sh.X * 2), "served with its external data"

    # Without a marker: no model file -> not a version; a listing that changes while we look -> not yet.
    v3 = rh.external_scaled(tmp_path, 3.0)
    r2 = repo(prefix + "-settle", tmp_path / "2", settle_s=0.6)
    rh.upload(client, prefix + "-settle", {"scaled/1/model.onnx": rh.scaled_bytes(tmp_path, 1.0),
                                           "scaled/3/weights.bin": v3["weights.bin"]})
    assert r2.scan()["scaled"].versions == (1,)
    rh.upload(client, prefix + "-settle", {"scaled/3/model.onnx": v3["model.onnx"][:-1]})  # first part
    timer = threading.Timer(0.2, rh.upload, (client, prefix + "-settle", {"scaled/3/model.onnx": v3["model.onnx"]}))
    timer.start()
    src = r2.scan()["scaled"]
    timer.join()
    assert src.versions == (1,) and not (src.path / "3").exists(), "changed between the two listings"
    src = r2.scan()["scaled"]
    assert src.versions == (1, 3)
    assert np.array_equal(run(src.path / "3" / "model.onnx"), sh.X * 3)


def test_damaged_cache_is_fetched_again_and_unchanged_files_are_not(s3, prefix, tmp_path):
    client, _ = s3
    v1 = rh.external_scaled(tmp_path, 1.0)
    rh.upload(client, prefix, {f"scaled/1/{k}": b for k, b in v1.items()} | {"scaled/config.pbtxt": CONFIG_ALL})
    r = repo(prefix, tmp_path)
    path = r.scan()["scaled"].path
    (path / "1" / "model.onnx").write_bytes(b"garbage")
    (path / "1" / "weights.bin").unlink()
    (path / "config.pbtxt").write_text("garbage")
    r.scan()
    assert {f: (path / "1" / f).read_bytes() for f in v1} == v1
    assert (path / "config.pbtxt").read_bytes() == CONFIG_ALL
    inode = (path / "1" / "model.onnx").stat().st_ino
    v1_weights = rh.external_scaled(tmp_path / "b", 5.0)["weights.bin"]
    rh.upload(client, prefix, {"scaled/1/weights.bin": v1_weights})  # only the external data changes
    r.scan()
    assert (path / "1" / "model.onnx").stat().st_ino == inode, "an unchanged file is not fetched again"
    assert np.array_equal(run(path / "1" / "model.onnx"), sh.X * 5)
    assert not [p for p in path.rglob(".tmp-*")], "no staging leftovers"


def test_checksum_and_size_mismatches_are_refused(s3, prefix, tmp_path):
    client, _ = s3
    rh.upload(client, prefix, {"scaled/1/model.onnx": b"0123456789"})
    r = repo(prefix, tmp_path)
    key = f"{rh.BUCKET}/{prefix}/scaled/1/model.onnx"
    dst = tmp_path / "out"
    with pytest.raises(RemoteError, match="MD5"):
        r._download(RemoteFile(key, 10, "x", "0" * 32), dst)
    with pytest.raises(RemoteError, match="fetched 10 bytes"):
        r._download(RemoteFile(key, 11, "x"), dst)
    assert not dst.exists() and not list(tmp_path.glob(".tmp-*"))
    r._download(RemoteFile(key, 10, "x", __import__("hashlib").md5(b"0123456789").hexdigest()), dst)
    assert dst.read_bytes() == b"0123456789"


def test_versions_leave_the_cache_after_retain(s3, prefix, tmp_path):
    client, _ = s3
    rh.upload(client, prefix, {f"scaled/{v}/model.onnx": rh.scaled_bytes(tmp_path, float(v)) for v in (1, 2)}
              | {"scaled/config.pbtxt": CONFIG_ALL, "other/1/model.onnx": rh.scaled_bytes(tmp_path, 1.0)})
    r = repo(prefix, tmp_path, retain_s=0.3)
    cache = r.scan()["scaled"].path
    rh.delete(client, prefix, "scaled/1/model.onnx", "other/1/model.onnx")
    assert r.scan()["scaled"].versions == (2,)
    assert (cache / "1").is_dir(), "kept for retain_s: the swap may still need it"
    time.sleep(0.35)
    assert set(r.scan()) == {"scaled"}
    assert not (cache / "1").exists() and not (cache.parent / "other").exists()
    assert (cache / "2" / "model.onnx").is_file()


def test_any_fsspec_url_and_a_private_cache(tmp_path):
    local = tmp_path / "store"
    (local / "scaled" / "4").mkdir(parents=True)
    (local / "scaled" / "4" / "model.onnx").write_bytes(rh.scaled_bytes(tmp_path, 4.0))
    r = RemoteRepository(f"file://{local}", settle_s=0)
    src = r.scan()["scaled"]
    assert src.versions == (4,) and np.array_equal(run(src.path / "4" / "model.onnx"), sh.X * 4)
    r.close()
    assert not src.path.exists(), "a private cache goes with the repository"
    import fsspec

    fsspec.filesystem("memory").pipe(f"/{tmp_path.name}/m/1/model.onnx", b"x")
    assert RemoteRepository(f"memory://{tmp_path.name}", settle_s=0).scan()["m"].versions == (1,)
    with pytest.raises(RemoteError, match="does not exist"):
        RemoteRepository("s3://no-such-bucket-here/x", tmp_path / "c2", settle_s=0).scan()


def test_credentials_never_logged(s3, prefix, tmp_path, caplog):
    client, _ = s3
    caplog.set_level(logging.DEBUG, logger="onnxgate")
    rh.upload(client, prefix, {"scaled/1/model.onnx": rh.scaled_bytes(tmp_path, 1.0), "scaled/2/model.onnx": b"x"})
    r = RemoteRepository(f"s3://{rh.BUCKET}/{prefix}?versionId=tok3n", tmp_path / "c", settle_s=0,
                         storage_options={"secret": rh.SECRET, "key": "testing-key-id"})
    r.scan()
    with pytest.raises(RemoteError) as err:
        RemoteRepository("s3://no-such-bucket-here", tmp_path / "c3", settle_s=0).scan()
    text = caplog.text + str(err.value) + r.url
    assert "object store" in caplog.text and rh.SECRET not in text and "tok3n" not in text
    assert redact_url("az://user:pa55@acct/c/p?sig=abc#frag") == "az://acct/c/p"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"


# -- the real gateway (needs lifecycle to build RemoteRepository for s3:// locations) ------------------------
def test_gateway_follows_uploads_under_load(s3, prefix, tmp_path):
    client, server = s3
    rh.upload(client, prefix, {"scaled/1/model.onnx": rh.scaled_bytes(tmp_path, 1.0), "scaled/1/READY": b""})
    cache = tmp_path / "cache"
    config = rh.write_config(tmp_path / "gateway.yaml", f"registry:\n  cache_dir: {cache}\n  settle_s: 0.3\n"
                                                        "  retain_s: 1\n  marker: READY\n")
    args = ["--model-control-mode", "poll", "--repository-poll-secs", "0.25", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | rh.s3_env(server.url)
    gw = rh.start_gateway(f"s3://{rh.BUCKET}/{prefix}", args, env, "object store")
    try:
        with sh.Load(gw, "scaled") as load:
            timeline = sh.Timeline("1")
            load.wait_answers(10)
            v3 = rh.external_scaled(tmp_path, 3.0)
            rh.upload(client, prefix, {"scaled/3/model.onnx": v3["model.onnx"]})  # incomplete: never served
            timeline.mark("1", "2")
            rh.upload(client, prefix, {"scaled/2/model.onnx": rh.scaled_bytes(tmp_path, 2.0), "scaled/2/READY": b""})
            assert wait_until(lambda: sh.serving(gw, "scaled") == {"2"}, 30), sh.states(gw, "scaled")
            since = timeline.mark("2")
            load.wait_answers(20, since, "2")
            assert wait_until(lambda: not (cache / "scaled" / "1").exists(), 10), "v1 left the cache"
            time.sleep(1.0)
            assert sh.serving(gw, "scaled") == {"2"} and not (cache / "scaled" / "3").exists()
            timeline.mark("2", "3")
            rh.upload(client, prefix, {"scaled/3/weights.bin": v3["weights.bin"], "scaled/3/READY": b""})
            assert wait_until(lambda: sh.serving(gw, "scaled") == {"3"}, 30), sh.states(gw, "scaled")
            load.wait_answers(20, timeline.mark("3"), "3")
            calls = sh.assert_clean(load, timeline)
        assert {c.version for c in calls} == {"1", "2", "3"}
    finally:
        gw.stop()
    assert rh.SECRET not in gw.log


def test_gateway_pin_fetches_a_version_the_policy_left_out(s3, prefix, tmp_path):
    client, server = s3
    rh.upload(client, prefix, {f"scaled/{v}/model.onnx": rh.scaled_bytes(tmp_path, float(v)) for v in (1, 2)})
    config = rh.write_config(tmp_path / "gateway.yaml",
                             f"registry:\n  cache_dir: {tmp_path / 'cache'}\n  settle_s: 0\n")
    args = ["--model-control-mode", "explicit", "--load-model", "*", "--config", str(config)]
    gw = rh.start_gateway(f"s3://{rh.BUCKET}/{prefix}", args, rh.s3_env(server.url), "object store")
    try:
        assert sh.serving(gw, "scaled") == {"2"} and not (tmp_path / "cache" / "scaled" / "1").exists()
        with sh.Load(gw, "scaled") as load:
            timeline = sh.Timeline("2")
            load.wait_answers(10)
            timeline.mark("2", "1")
            assert sh.load_model(gw, "scaled", version=1)[0] == 200
            load.wait_answers(20, timeline.mark("1"), "1")
            sh.assert_clean(load, timeline)
        assert (tmp_path / "cache" / "scaled" / "1" / "model.onnx").is_file()
    finally:
        gw.stop()
