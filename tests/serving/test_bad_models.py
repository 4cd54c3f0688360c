"""One bad model never stops the gateway: whatever fails while loading it (a value ONNX Runtime
rejects, a warm-up too large to allocate, an unreadable directory) marks that model UNAVAILABLE
with its reason, and every other model serves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

import modelzoo
from gateway import GatewayProcess

WARMUP = """
max_batch_size: %d
model_warmup [{ name: "w", batch_size: %d, inputs { key: "x" value: { data_type: TYPE_FP32, dims: [16] %s } } }]
"""
BAD = {
    # ONNX Runtime's options take a C int: a huge value was a TypeError that ended the process.
    "threads": 'parameters { key: "intra_op_thread_count" value: { string_value: "99999999999999" } }\n',
    "negative_threads": 'parameters { key: "inter_op_thread_count" value: { string_value: "-3" } }\n',
    "instances": "instance_group [{ count: 100000, kind: KIND_CPU }]\n",
    # 2^30 rows of 16 floats: a 64 GiB warm-up batch was a MemoryError that ended the process.
    "warmup_huge": WARMUP % (1 << 30, 1 << 30, "zero_data: true"),
    "warmup_over_max_batch": WARMUP % (8, 64, "zero_data: true"),
    "warmup_outside": WARMUP % (8, 1, 'input_data_file: "../../ok/1/model.onnx"'),
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("bad_models")
    modelzoo.build_mlp(repo, "ok")
    for name, config in BAD.items():
        modelzoo.build_mlp(repo, name)
        modelzoo.write_config(repo / name, config)
    unreadable = repo / "unreadable"
    if os.geteuid() == 0:  # root reads any mode; this directory refuses even root
        unreadable.symlink_to("/proc/1/map_files", target_is_directory=True)
    else:
        modelzoo.build_mlp(repo, "unreadable")
        unreadable.chmod(0)
    try:
        with GatewayProcess(repo) as g:
            yield g
    finally:
        if not unreadable.is_symlink():
            unreadable.chmod(0o755)


def _index(gw) -> dict[str, dict]:
    return {m["name"]: m for m in httpclient.InferenceServerClient(gw.http_url).get_model_repository_index()}


@pytest.mark.parametrize("name", [*BAD, "unreadable"])
def test_the_bad_model_is_unavailable_with_its_reason(gw, name):
    entry = _index(gw)[name]
    assert entry["state"] == "UNAVAILABLE", entry
    assert entry.get("reason"), entry


def test_the_reasons_say_what_is_wrong(gw):
    index = _index(gw)
    assert "intra_op_thread_count" in index["threads"]["reason"]
    assert "inter_op_thread_count" in index["negative_threads"]["reason"]
    assert "instance" in index["instances"]["reason"]
    assert "warm-up limit" in index["warmup_huge"]["reason"]
    assert "max_batch_size" in index["warmup_over_max_batch"]["reason"]
    assert "inside the model's warmup directory" in index["warmup_outside"]["reason"]


def test_the_good_model_serves(gw):
    client = httpclient.InferenceServerClient(gw.http_url)
    assert client.is_server_ready()
    x = np.ones((2, 16), np.float32)
    inp = httpclient.InferInput("x", [2, 16], "FP32")
    inp.set_data_from_numpy(x)
    expected = modelzoo.reference_run(Path(gw.repository) / "ok/1/model.onnx", {"x": x})["y"]
    np.testing.assert_allclose(client.infer("ok", [inp]).as_numpy("y"), expected, rtol=1e-5)
    assert "Traceback" not in gw.log, gw.log[-4000:]
