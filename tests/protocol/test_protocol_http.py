"""The HTTP/REST front end through tritonclient.http (sync and aio) and plain urllib: outputs,
versions, metadata, config, health, statistics, compression, the binary extension's header,
plain JSON, percent-encoded names, ids and classification.

Statistics and the "my model" name use an extra repository served by this module's gateway.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gateway import GatewayProcess
from modelzoo import INT_TYPES
from protocol_helpers import (
    BIG_ELEMENTS,
    assert_classification,
    assert_stats_delta,
    assert_tensor_equal,
    binary_infer_body,
    build_extra_repo,
    http_request,
    infer,
    json_infer_body,
    json_outputs,
    make_inputs,
    make_outputs,
    reference,
    split_binary_reply,
    stats_entry,
    zoo_feeds,
)


@pytest.fixture(scope="module")
def extra(tmp_path_factory):
    repo = build_extra_repo(tmp_path_factory.mktemp("http_extra"))
    with GatewayProcess(repo) as gw:
        gw.repo = repo
        yield gw


@pytest.fixture
def client(gateway):
    c = httpclient.InferenceServerClient(gateway.http_url)
    yield c
    c.close()


# -- outputs, versions, ids -----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "http_json"])
@pytest.mark.parametrize(("model", "wanted"), [("add_sub", ["OUTPUT1"]), ("mixed_dtypes", ["i32_out", "flag_out"])])
def test_requested_outputs_subset(gateway, zoo_repo, transport, model, wanted):
    feeds = zoo_feeds(model, rows=2, seed=12)
    answer = infer(transport, gateway, model, feeds, outputs=wanted)
    assert sorted(answer.outputs) == sorted(wanted)
    expected = reference(zoo_repo, model, feeds)
    for name in wanted:
        assert_tensor_equal(answer.outputs[name], expected[name], name)


def test_binary_and_json_outputs_in_one_reply(client, zoo_repo):
    feeds = zoo_feeds("add_sub", rows=2)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]
    result = client.infer("add_sub", make_inputs("http", feeds), outputs=outputs)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert by_name["OUTPUT0"]["parameters"] == {"binary_data_size": 2 * 16 * 4}
    assert "data" not in by_name["OUTPUT0"]
    assert "parameters" not in by_name["OUTPUT1"], "JSON outputs carry no parameters (perf_analyzer)"
    expected = reference(zoo_repo, "add_sub", feeds)
    for name in ("OUTPUT0", "OUTPUT1"):
        assert_tensor_equal(result.as_numpy(name), expected[name], name)


def test_unknown_output_is_400(gateway):
    with pytest.raises(InferenceServerException) as err:
        infer("http", gateway, "add_sub", zoo_feeds("add_sub"), outputs=["OUTPUT9"])
    assert err.value.status() == "400" and "OUTPUT9" in str(err.value)


@pytest.mark.parametrize("transport", ["http", "http_json", "http_aio"])
def test_versions(gateway, transport):
    feeds = zoo_feeds("scaled", rows=3, seed=8)
    for version in ("1", "2", "3"):
        answer = infer(transport, gateway, "scaled", feeds, version=version)
        assert answer.model_version == version
        np.testing.assert_array_equal(answer.outputs["y"], feeds["x"] * np.float32(version))
    default = infer(transport, gateway, "scaled", feeds)
    assert default.model_version == "3", "without a version the highest ready version answers"


@pytest.mark.parametrize(
    ("path", "status"),
    [("scaled/versions/9", 404), ("scaled/versions/latest", 404), ("no_such_model", 404), ("broken", 503)],
)
def test_infer_errors_are_json(gateway, path, status):
    body = json_infer_body(zoo_feeds("scaled", rows=1))
    code, _, reply = http_request(gateway, "POST", f"/v2/models/{path}/infer", body)
    assert code == status
    assert isinstance(json.loads(reply)["error"], str)


@pytest.mark.parametrize("transport", ["http", "http_json", "http_aio"])
def test_request_id_is_echoed(gateway, transport):
    assert infer(transport, gateway, "mlp", zoo_feeds("mlp"), request_id="id-1").id == "id-1"
    assert infer(transport, gateway, "mlp", zoo_feeds("mlp")).id == ""


@pytest.mark.parametrize(
    "kwargs", [{"priority": 1}, {"timeout": 10_000_000}, {"parameters": {"s": "x", "i": 3, "f": 1.5, "b": True}}]
)
def test_request_parameters_are_accepted(client, zoo_repo, kwargs):
    feeds = zoo_feeds("mlp", rows=2)
    result = client.infer("mlp", make_inputs("http", feeds), **kwargs)
    assert_tensor_equal(result.as_numpy("y"), reference(zoo_repo, "mlp", feeds)["y"], "y")


# -- metadata, config, health ---------------------------------------------------------------


def test_model_metadata(client):
    meta = client.get_model_metadata("mlp")
    assert meta["name"] == "mlp" and meta["versions"] == ["1"] and meta["platform"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    no_batch = client.get_model_metadata("no_batch")
    assert no_batch["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 4]}]
    assert no_batch["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [3, 2]}]
    fp16 = client.get_model_metadata("fp16")
    assert fp16["inputs"][0]["datatype"] == "FP16" and fp16["inputs"][0]["shape"] == [-1, 8]
    ints = client.get_model_metadata("int_types")["inputs"]
    assert {t["name"]: t["datatype"] for t in ints} == {n: np_to_triton_dtype(d) for n, (d, _) in INT_TYPES.items()}
    assert sorted(client.get_model_metadata("scaled")["versions"]) == ["1", "2", "3"]
    assert client.get_model_metadata("scaled", model_version="1")["name"] == "scaled"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert err.value.status() == "404"


def test_model_config(client):
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp" and config["platform"] == "onnxruntime_onnx"
    assert isinstance(config["max_batch_size"], int) and config["max_batch_size"] > 0
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("x", "TYPE_FP32")]
    # Triton's /config writes 64-bit fields such as dims as JSON numbers.
    assert config["input"][0]["dims"] == [16], config["input"][0]
    assert config["output"][0]["dims"] == [10], config["output"][0]
    no_batch = client.get_model_config("no_batch")
    assert no_batch["max_batch_size"] == 0
    assert no_batch["input"][0]["dims"] == [3, 4]
    string = client.get_model_config("string")
    assert {o["name"]: o["data_type"] for o in string["output"]} == {"same": "TYPE_STRING", "upper": "TYPE_STRING"}
    # Config names are a subset of the metadata names.
    meta = client.get_model_metadata("string")
    assert {o["name"] for o in string["output"]} <= {t["name"] for t in meta["outputs"]}


def test_server_metadata_lists_only_implemented_extensions(client, gateway):
    meta = client.get_server_metadata()
    assert meta["name"] and meta["version"]
    extensions = set(meta["extensions"])
    assert {"binary_tensor_data", "classification", "model_configuration", "statistics"} <= extensions
    assert not extensions & {"system_shared_memory", "cuda_shared_memory", "sequence", "trace", "logging"}
    status, _, body = http_request(gateway, "GET", "/v2")
    assert status == 200 and json.loads(body) == meta


def test_health(client, gateway):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("scaled", "1")
    assert client.is_model_ready("no_such_model") is False
    assert client.is_model_ready("scaled", "9") is False
    assert client.is_model_ready("broken") is False
    status, _, body = http_request(gateway, "GET", "/v2/models/broken/ready")
    assert status != 200 and "error" in json.loads(body)


# -- statistics -----------------------------------------------------------------------------


def _counted(extra, rows: int, version: str = "", model: str = "counted") -> None:
    infer("http", extra, model, zoo_feeds("add_sub" if model == "counted" else "scaled", rows=rows), version=version)


def test_statistics_count_exactly(extra):
    client = httpclient.InferenceServerClient(extra.http_url)
    rows = [2, 1, 4, 4, 1, 3]
    before_model = stats_entry(client.get_inference_statistics("counted"), "counted", "1")
    before_version = stats_entry(client.get_inference_statistics("counted", "1"), "counted", "1")
    before_all = stats_entry(client.get_inference_statistics(), "counted", "1")
    for r in rows:
        _counted(extra, r)
    after_model = stats_entry(client.get_inference_statistics("counted"), "counted", "1")
    assert_stats_delta(before_model, after_model, rows)
    assert_stats_delta(
        before_version, stats_entry(client.get_inference_statistics("counted", "1"), "counted", "1"), rows
    )
    everything = client.get_inference_statistics()  # GET /v2/models/stats
    assert_stats_delta(before_all, stats_entry(everything, "counted", "1"), rows)
    assert {s["name"] for s in everything["model_stats"]} >= {"counted", "counted_scaled", "my model", "big"}
    client.close()


def test_statistics_json_types(extra):
    """perf_analyzer needs unsigned JSON numbers for every count and ns, and a numeric version."""
    _counted(extra, 1)
    status, _, body = http_request(extra, "GET", "/v2/models/stats")
    assert status == 200
    for entry in json.loads(body)["model_stats"]:
        assert isinstance(entry["version"], str) and entry["version"].isdigit()
        for key in ("last_inference", "inference_count", "execution_count"):
            assert isinstance(entry[key], int) and entry[key] >= 0, (entry["name"], key)
        for key, d in entry["inference_stats"].items():
            assert isinstance(d["count"], int) and isinstance(d["ns"], int), (entry["name"], key)
        for b in entry["batch_stats"]:
            assert isinstance(b["batch_size"], int) and b["batch_size"] >= 1


def test_statistics_per_version_and_failures(extra):
    client = httpclient.InferenceServerClient(extra.http_url)
    both = client.get_inference_statistics("counted_scaled")
    assert sorted(s["version"] for s in both["model_stats"]) == ["1", "2"]
    before = {v: stats_entry(both, "counted_scaled", v) for v in ("1", "2")}
    _counted(extra, 3, "1", "counted_scaled")
    _counted(extra, 2, "", "counted_scaled")
    one = client.get_inference_statistics("counted_scaled", "1")
    assert [s["version"] for s in one["model_stats"]] == ["1"]
    assert_stats_delta(before["1"], stats_entry(one, "counted_scaled", "1"), [3])
    two = client.get_inference_statistics("counted_scaled", "2")
    assert_stats_delta(before["2"], stats_entry(two, "counted_scaled", "2"), [2])
    bad = httpclient.InferInput("x", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("counted_scaled", [bad], model_version="1")
    after = stats_entry(client.get_inference_statistics("counted_scaled", "1"), "counted_scaled", "1")
    fail_before = stats_entry(one, "counted_scaled", "1")["inference_stats"]["fail"]["count"]
    assert after["inference_stats"]["fail"]["count"] == fail_before + 1
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics("no_such_model")
    assert err.value.status() == "404"
    client.close()


# -- compression ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "http_json"])
@pytest.mark.parametrize("request_alg", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_alg", [None, "gzip", "deflate"])
def test_compression(client, zoo_repo, transport, request_alg, response_alg):
    feeds = zoo_feeds("mlp", rows=64, seed=3)  # a reply big enough to be worth compressing
    outputs = make_outputs(transport, ["y"])
    result = client.infer(
        "mlp",
        make_inputs(transport, feeds),
        outputs=outputs,
        request_compression_algorithm=request_alg,
        response_compression_algorithm=response_alg,
    )
    assert_tensor_equal(result.as_numpy("y"), reference(zoo_repo, "mlp", feeds)["y"], "y")


ACCEPT = {"gzip": "gzip", "deflate": "deflate", "gzip, deflate, br": "gzip", "gzip;q=0, deflate": "deflate"}


@pytest.mark.parametrize(("accept", "used"), [*ACCEPT.items(), ("*", "gzip"), ("br", None), ("identity", None)])
def test_infer_reply_compression_on_the_wire(gateway, zoo_repo, accept, used):
    feeds = zoo_feeds("mlp", rows=64)
    body = json_infer_body(feeds)
    status, headers, reply = http_request(gateway, "POST", "/v2/models/mlp/infer", body, {"Accept-Encoding": accept})
    assert status == 200 and headers.get("content-encoding") == used
    reply = {"gzip": gzip.decompress, "deflate": zlib.decompress, None: bytes}[used](reply)
    assert_tensor_equal(json_outputs(json.loads(reply))["y"], reference(zoo_repo, "mlp", feeds)["y"], "y")


@pytest.mark.parametrize("path", ["/v2", "/v2/models/mlp", "/v2/models/mlp/config", "/v2/models/stats"])
def test_non_infer_replies_are_never_compressed(gateway, path):
    status, headers, body = http_request(gateway, "GET", path, headers={"Accept-Encoding": "gzip, deflate, br"})
    assert status == 200 and "content-encoding" not in headers
    json.loads(body)


def test_unknown_request_encoding_is_501(gateway):
    status, headers, body = http_request(gateway, "POST", "/v2/models/mlp/infer", b"xx", {"Content-Encoding": "br"})
    assert status == 501 and "error" in json.loads(body)
    assert "gzip" in headers.get("accept-encoding", "")


# -- Inference-Header-Content-Length and plain JSON -----------------------------------------


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate"])
def test_inference_header_content_length(gateway, zoo_repo, encoding):
    """The header counts the uncompressed JSON; the body may be compressed as a whole."""
    x = zoo_feeds("mlp", rows=2, seed=4)["x"]
    body, json_length = binary_infer_body(x)
    headers = {"Inference-Header-Content-Length": str(json_length)}
    if encoding:
        body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
        headers["Content-Encoding"] = encoding
    status, reply_headers, reply = http_request(gateway, "POST", "/v2/models/mlp/infer", body, headers)
    assert status == 200, reply
    doc, tail = split_binary_reply(reply_headers, reply)
    (out,) = doc["outputs"]
    assert out["parameters"] == {"binary_data_size": len(tail)}
    y = np.frombuffer(tail, dtype="<f4").reshape(out["shape"])
    assert_tensor_equal(y, reference(zoo_repo, "mlp", {"x": x})["y"], "y")


def test_inference_header_equal_to_a_pure_json_body(gateway, zoo_repo):
    """perf_analyzer always sends the header, equal to the body length when all is JSON."""
    feeds = zoo_feeds("mlp", rows=1)
    body = json_infer_body(feeds)
    headers = {"Inference-Header-Content-Length": str(len(body)), "Content-Type": "application/json", "Expect": ""}
    status, _, reply = http_request(gateway, "POST", "/v2/models/mlp/infer", body, headers)
    assert status == 200
    assert_tensor_equal(json_outputs(json.loads(reply))["y"], reference(zoo_repo, "mlp", feeds)["y"], "y")


@pytest.mark.parametrize("value", ["100000", "-1", "abc"])
def test_bad_inference_header_content_length_is_400(gateway, value):
    body, _ = binary_infer_body(np.zeros((1, 16), dtype=np.float32))
    status, _, reply = http_request(
        gateway, "POST", "/v2/models/mlp/infer", body, {"Inference-Header-Content-Length": value}
    )
    assert status == 400 and isinstance(json.loads(reply)["error"], str)


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("model", ["add_sub", "string", "mixed_dtypes"])
def test_plain_json_request(gateway, zoo_repo, layout, model):
    feeds = zoo_feeds(model, rows=3, seed=9)
    body = json_infer_body(feeds, flat=layout == "flat", id="curl-1")
    headers = {"Content-Type": "application/json"}
    status, headers, reply = http_request(gateway, "POST", f"/v2/models/{model}/infer", body, headers)
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(reply)
    assert doc["id"] == "curl-1" and doc["model_name"] == model and doc["model_version"] == "1"
    assert all("parameters" not in o for o in doc["outputs"])
    got, expected = json_outputs(doc), reference(zoo_repo, model, feeds)
    assert sorted(got) == sorted(expected)
    for name, arr in expected.items():
        assert_tensor_equal(got[name], arr, name)


# -- percent-encoded names, aio, classification, big bodies ---------------------------------


def test_percent_encoded_model_name(extra):
    client = httpclient.InferenceServerClient(extra.http_url)
    feeds = zoo_feeds("mlp", rows=2)
    assert client.is_model_ready("my model")
    assert client.get_model_metadata("my model")["name"] == "my model"
    assert client.get_model_config("my model")["name"] == "my model"
    result = client.infer("my model", make_inputs("http", feeds))
    assert result.get_response()["model_name"] == "my model"
    assert_tensor_equal(result.as_numpy("y"), reference(extra.repo, "my model", feeds)["y"], "y")
    stats = client.get_inference_statistics("my model")
    assert stats["model_stats"][0]["name"] == "my model"
    status, _, _ = http_request(extra, "GET", "/v2/models/my%20model/versions/1/ready")
    assert status == 200
    client.close()


def test_aio_client_non_infer_calls(gateway, zoo_repo):
    """aiohttp sends Accept-Encoding: gzip, deflate, br everywhere and decodes only infer replies."""

    async def run():
        c = httpaio.InferenceServerClient(gateway.http_url)
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready("mlp") and not await c.is_model_ready("broken")
            assert "statistics" in (await c.get_server_metadata())["extensions"]
            assert (await c.get_model_metadata("mlp"))["inputs"][0]["shape"] == [-1, 16]
            assert (await c.get_model_config("no_batch"))["max_batch_size"] == 0
            assert any(s["name"] == "mlp" for s in (await c.get_inference_statistics())["model_stats"])
            assert (await c.get_inference_statistics("scaled", "2"))["model_stats"][0]["version"] == "2"
            index = await c.get_model_repository_index()
            assert {m["name"] for m in index} >= {"mlp", "broken"}
            feeds = zoo_feeds("mlp", rows=64)  # a compressed reply
            item = httpaio.InferInput("x", [64, 16], "FP32")
            item.set_data_from_numpy(feeds["x"])
            result = await c.infer("mlp", [item], request_compression_algorithm="gzip")
            return feeds, result.as_numpy("y")
        finally:
            await c.close()

    feeds, y = asyncio.run(run())
    assert_tensor_equal(y, reference(zoo_repo, "mlp", feeds)["y"], "y")


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("k", [2, 10])
def test_classification(client, zoo_repo, binary, k):
    feeds = zoo_feeds("mlp", rows=5, seed=k)
    out = httpclient.InferRequestedOutput("y", binary_data=binary, class_count=k)
    result = client.infer("mlp", make_inputs("http", feeds), outputs=[out])
    (meta,) = result.get_response()["outputs"]
    assert meta["datatype"] == "BYTES" and meta["shape"] == [5, k]
    assert_classification(result.as_numpy("y"), reference(zoo_repo, "mlp", feeds)["y"], k)


def test_big_body_both_ways(extra):
    x = np.random.RandomState(3).rand(4, BIG_ELEMENTS).astype(np.float32)  # 16 MiB
    client = httpclient.InferenceServerClient(extra.http_url, network_timeout=120)
    result = client.infer("big", make_inputs("http", {"x": x}))
    assert_tensor_equal(result.as_numpy("y"), x, "y")
    client.close()
